"""Held-out quality of the radiance-field stage on a synthetic textured head.

    python benchmarks/nerf_quality.py [--size 256] [--preset gpu|cpu|test] [--iterations N]
        [--device auto] [--json PATH]

Renders the procedural head (dp360.nerf.synthetic) at the 32 DP360 orbit cameras, fits the
field on them with dp360's nerfacto-head method (the "gpu" preset on CUDA, "cpu" otherwise;
256 x 256 views by default), and evaluates it at 8 held-out cameras half-way between training
views (and 8 more at +15 degrees elevation). Prints held-out PSNR and SSIM, fit seconds and
render frames per second (after one warm-up render), peak GPU memory, and the issue's target
(held-out PSNR >= 30 dB at 256 px).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import benchlib
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dp360.nerf import synthetic
from dp360.nerf.fit import FitSettings, fit_field, load_field
from dp360.nerf.render import render_pose
from dp360.runtime import resolve_device

TARGET_PSNR, TARGET_SIZE = 30.0, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=TARGET_SIZE)
    parser.add_argument("--preset", default=None, help="gpu on CUDA, cpu otherwise")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    preset = args.preset or ("gpu" if benchlib.is_cuda(device) else "cpu")
    settings = FitSettings.preset(preset, **({"iterations": args.iterations} if args.iterations else {}))
    mesh = synthetic.head_mesh()
    print(f"{benchlib.device_description(device)}")
    with tempfile.TemporaryDirectory() as folder:
        views = synthetic.write_views(Path(folder) / "views", size=args.size, mesh=mesh)
        nerf = Path(folder) / "nerf"
        nerf.mkdir()
        benchlib.reset_peak(device)
        summary = fit_field(views, nerf, settings, device, progress=False)
        fit_peak = benchlib.peak_gib(device)
        field = load_field(nerf, device, views)
        poses = synthetic.held_out_poses(32, 8, 0.0) + synthetic.held_out_poses(32, 8, 15.0)
        render_pose(field, poses[0], args.size)  # warm-up
        with benchlib.Stopwatch(device) as clock:
            renders = [render_pose(field, pose, args.size) for pose in poses]
        psnr, ssim = [], []
        for pose, rendered in zip(poses, renders):
            truth = synthetic.render(mesh, pose, args.size)
            psnr.append(peak_signal_noise_ratio(truth, rendered.astype(np.float64), data_range=1.0))
            ssim.append(structural_similarity(truth, rendered.astype(np.float64), channel_axis=2, data_range=1.0))
    level = np.array(psnr[:8]), np.array(psnr[8:])
    fit_seconds = summary["fit_seconds"]
    print(
        f"device {device}, preset {preset}, {settings.iterations} iterations, {args.size} x {args.size}, 32 training views"
    )
    print(f"fit: {fit_seconds:.1f} s ({fit_seconds / max(settings.iterations, 1):.3f} s/iteration)")
    print(
        f"held-out PSNR {np.mean(psnr):.2f} dB (eye level {level[0].mean():.2f}, +15 deg {level[1].mean():.2f}), "
        f"SSIM {np.mean(ssim):.3f}"
    )
    fps = len(poses) / clock.seconds
    print(f"render: {fps:.2f} frames/s at {args.size} x {args.size}")
    if fit_peak is not None:
        print(f"peak GPU memory of the fit: {fit_peak:.2f} GiB")
    judged = args.size == TARGET_SIZE and preset == "gpu"
    if judged:
        verdict = "met" if np.mean(psnr) >= TARGET_PSNR else "NOT met"
        print(f"target held-out PSNR >= {TARGET_PSNR} dB at {TARGET_SIZE} px: {np.mean(psnr):.2f} dB -> {verdict}")
    else:
        print(f"target (PSNR >= {TARGET_PSNR} dB at {TARGET_SIZE} px, gpu preset) not judged: other settings")
    benchlib.write_json(
        args.json,
        {
            "benchmark": "nerf_quality",
            "device": benchlib.device_description(device),
            "settings": {**vars(args), "preset": preset, "iterations": settings.iterations},
            "psnr": float(np.mean(psnr)),
            "psnr_eye_level": float(level[0].mean()),
            "psnr_elevated": float(level[1].mean()),
            "ssim": float(np.mean(ssim)),
            "fit_seconds": fit_seconds,
            "render_fps": fps,
            "fit_peak_gib": fit_peak,
            "target_judged": judged,
        },
    )


if __name__ == "__main__":
    main()
