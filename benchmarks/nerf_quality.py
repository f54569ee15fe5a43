"""Held-out quality of the radiance-field stage on a synthetic textured head.

    python benchmarks/nerf_quality.py [--size 256] [--preset gpu|cpu|test] [--iterations N] [--device auto]

Renders the procedural head (dp360.nerf.synthetic) at the 32 DP360 orbit cameras, fits the
field on them with dp360's nerfacto-head method, and evaluates it at 8 held-out cameras
half-way between training views (and 8 more at +15 degrees elevation). Prints held-out PSNR
and SSIM, fit seconds and render frames per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dp360.nerf import synthetic
from dp360.nerf.fit import FitSettings, fit_field, load_field
from dp360.nerf.render import render_pose
from dp360.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default=None, help="gpu on CUDA, cpu otherwise")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    settings = FitSettings.preset(preset, **({"iterations": args.iterations} if args.iterations else {}))
    mesh = synthetic.head_mesh()
    with tempfile.TemporaryDirectory() as folder:
        views = synthetic.write_views(Path(folder) / "views", size=args.size, mesh=mesh)
        nerf = Path(folder) / "nerf"
        nerf.mkdir()
        summary = fit_field(views, nerf, settings, device, progress=True)
        field = load_field(nerf, device, views)
        poses = synthetic.held_out_poses(32, 8, 0.0) + synthetic.held_out_poses(32, 8, 15.0)
        psnr, ssim = [], []
        start = time.perf_counter()
        renders = [render_pose(field, pose, args.size) for pose in poses]
        render_seconds = time.perf_counter() - start
        for pose, rendered in zip(poses, renders):
            truth = synthetic.render(mesh, pose, args.size)
            psnr.append(peak_signal_noise_ratio(truth, rendered.astype(np.float64), data_range=1.0))
            ssim.append(structural_similarity(truth, rendered.astype(np.float64), channel_axis=2, data_range=1.0))
    level = np.array(psnr[:8]), np.array(psnr[8:])
    print(
        f"device {device}, preset {preset}, {settings.iterations} iterations, {args.size} x {args.size}, 32 training views"
    )
    print(
        f"fit: {summary['fit_seconds']:.1f} s ({summary['fit_seconds'] / max(settings.iterations, 1):.3f} s/iteration)"
    )
    print(
        f"held-out PSNR {np.mean(psnr):.2f} dB (eye level {level[0].mean():.2f}, +15 deg {level[1].mean():.2f}), SSIM {np.mean(ssim):.3f}"
    )
    print(f"render: {len(poses) / render_seconds:.2f} frames/s at {args.size} x {args.size}")


if __name__ == "__main__":
    main()
