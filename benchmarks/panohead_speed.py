"""Seconds and peak memory of the PanoHead stage with a full-size generator (random weights).

    python benchmarks/panohead_speed.py [--invert-steps 200] [--pti-steps 5] [--renders 32] [--device auto]

Times the W+ inversion (LPIPS-VGG16 + pixel MSE, the reference's schedule), the PTI steps and
the orbit renders at 512 x 512, and prints seconds per step, totals and peak GPU memory.
Random weights and a random VGG backbone: only the timing is meaningful.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dp360 import cameras
from dp360.panohead.generator import PanoHeadGenerator, describe, released_config
from dp360.panohead.inversion import InversionSettings, invert, render_views
from dp360.panohead.perceptual import load_lpips, write_random_backbone
from dp360.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invert-steps", type=int, default=200)
    parser.add_argument("--pti-steps", type=int, default=5)
    parser.add_argument("--renders", type=int, default=32)
    parser.add_argument("--w-samples", type=int, default=10000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    generator = PanoHeadGenerator(released_config()).to(device).eval().requires_grad_(False)
    print(describe(generator), "on", device, torch.cuda.get_device_name() if device.startswith("cuda") else "")
    with tempfile.TemporaryDirectory() as folder:
        lpips = load_lpips(device, write_random_backbone(Path(folder) / "vgg16.pth"))
    target = torch.rand(1, 3, 512, 512) * 2 - 1
    camera = torch.from_numpy(cameras.orbit_labels(1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    settings = InversionSettings(invert_steps=args.invert_steps, pti_steps=0, w_avg_samples=args.w_samples)
    start = time.perf_counter()
    result = invert(generator, target, camera, lpips, settings, progress=False)
    sync()
    inversion_s = time.perf_counter() - start
    start = time.perf_counter()
    invert(
        generator,
        target,
        camera,
        lpips,
        InversionSettings(invert_steps=0, pti_steps=args.pti_steps, w_avg_samples=16),
        progress=False,
    )
    sync()
    pti_s = time.perf_counter() - start
    start = time.perf_counter()
    render_views(result.generator, result.ws, torch.from_numpy(cameras.orbit_labels(args.renders)))
    sync()
    render_s = time.perf_counter() - start
    print(
        f"inversion: {args.invert_steps} steps in {inversion_s:.1f} s ({inversion_s / max(args.invert_steps, 1):.3f} s/step, incl. W statistics of {args.w_samples} samples)"
    )
    print(f"PTI: {args.pti_steps} steps in {pti_s:.1f} s ({pti_s / max(args.pti_steps, 1):.3f} s/step)")
    print(f"renders: {args.renders} at 512 x 512 in {render_s:.1f} s ({render_s / max(args.renders, 1):.3f} s/render)")
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
