"""Seconds per view and peak GPU memory of the 360-view pipeline with full-size random weights.

    python benchmarks/views_speed.py [--steps 50] [--views 32] [--dtype fp16] [--family sd15]

Runs the pipeline twice on the same inputs: dp360's configuration (one reference pass per
reference image per step, shared by every chunk; no ControlNet in the unconditional pass) and
the reference-faithful work pattern (reference network at batch 8 for every chunk and step),
and prints both and their ratio. Random weights: the timing is what matters, not the images.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import DDIMScheduler

from dp360.diffusion.models.components import MAIN_COMPONENTS, build_components
from dp360.diffusion.models.configs import FAMILIES
from dp360.diffusion.pipelines.portrait360 import Portrait360Pipeline
from dp360.runtime import DTYPES, resolve_device, torch_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--dtype", default="fp16", choices=DTYPES)
    parser.add_argument("--family", default="sd15", choices=list(FAMILIES))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype) if device != "cpu" else torch.float32
    family = FAMILIES[args.family]
    torch.manual_seed(0)
    components = {
        name: module.to(device=device, dtype=dtype).eval()
        for name, module in build_components(family, MAIN_COMPONENTS).items()
    }
    pipe = Portrait360Pipeline(scheduler=DDIMScheduler(**family.scheduler), **components)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    size = family.image_size
    image = lambda: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noqa: E731
    inputs = dict(
        front_image=image(),
        back_image=image(),
        camera_images=[image() for _ in range(args.views)],
        noise_frames=[image() for _ in range(args.views)],
        num_inference_steps=args.steps,
    )
    results = {}
    for label, shared in (("dp360", True), ("reference-faithful", False)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe(**inputs, generator=torch.Generator().manual_seed(0), share_reference_pass=shared, output_type="np")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        results[label] = seconds
        print(
            f"{label:>20}: {seconds / args.views:.3f} s/view ({seconds:.1f} s for {args.views} views, {args.steps} steps, {size}px, {args.dtype if device != 'cpu' else 'fp32'} on {device}), peak GPU memory {peak:.2f} GiB"
        )
    print(f"speed-up of dp360 over the reference work pattern: {results['reference-faithful'] / results['dp360']:.2f}x")


if __name__ == "__main__":
    main()
