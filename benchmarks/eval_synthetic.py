"""`dp360 eval`'s protocol on a known scene: the synthetic textured head as both the "generated"
views and the ground truth.

    python benchmarks/eval_synthetic.py [--size 64] [--iterations 250] [--device auto]

Renders the procedural head (dp360.nerf.synthetic) at the 32 orbit cameras as a run's views and
fits a field to them (the "test" preset), then a ground-truth capture of the same head: the
front (the input's camera, the reference) and 16 cameras off the orbit (yaw 5.6 + 22.5 k
degrees, 10 degrees above eye level), at twice the views' size, with masks, in another world
frame (rotated, moved and scaled). It evaluates, as
`dp360 eval --table` does: the run (every truth camera but the front is off its views, so the
field is rendered there), the same views without the field (each truth frame meets its nearest
view) and the views put at the wrong cameras (turned by 45 degrees), and prints the comparison
table and the run's consistency score. LPIPS needs the VGG16 backbone in dp360's cache, CSIM a face
(the synthetic head has none) and FID the Inception weights: without them they read n/a.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dp360 import cameras
from dp360.eval.capture import write_capture
from dp360.eval.evaluate import evaluate_paths
from dp360.eval.truth import EvalSettings
from dp360.manifest import new_manifest
from dp360.nerf import synthetic
from dp360.runtime import resolve_device


def truth_capture(folder: Path, mesh, size: int) -> Path:
    """The front and 16 off-orbit cameras, in a world rotated 30 degrees about x, moved and scaled."""
    angle = np.radians(30.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    frames = []
    # frame 00: the input's camera (the front, the reference); then 16 cameras off the orbit
    poses = [cameras.orbit_pose(0.0)] + [cameras.orbit_pose(5.625 + 22.5 * k, 10.0) for k in range(16)]
    for index, pose in enumerate(poses):
        on_black = synthetic.render(mesh, pose, size, background=(0.0, 0.0, 0.0))
        on_white = synthetic.render(mesh, pose, size, background=(1.0, 1.0, 1.0))
        mask = np.all(np.abs(on_black - on_white) < 1e-6, axis=-1)
        name = f"{index:02d}"
        Image.fromarray((on_black * 255).round().astype(np.uint8)).save(folder / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}_mask.png")
        moved = np.eye(4)
        moved[:3, :3] = rotation @ pose[:3, :3]
        moved[:3, 3] = 0.4 * rotation @ pose[:3, 3] + np.array([1.0, 2.0, -0.5])
        pixel = cameras.pixel_intrinsics(cameras.normalized_intrinsics(), size, size)
        frames.append(
            {
                "file_path": f"{name}.png",
                "mask_path": f"{name}_mask.png",
                "cam2world": moved,
                "intrinsics": pixel,
                "width": size,
                "height": size,
            }
        )
    write_capture(folder, frames)
    return folder


def main() -> None:
    from dp360.nerf.common import FitSettings
    from dp360.nerf.fit import fit_field

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="the views' size in pixels")
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    mesh = synthetic.head_mesh()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        run = root / "run"
        views = synthetic.write_views(run / "views", size=args.size, mesh=mesh)
        (run / "nerf").mkdir()
        fit = fit_field(views, run / "nerf", FitSettings.preset("test", iterations=args.iterations), device, False)
        (run / "run.json").write_text(json.dumps(new_manifest()))  # a run dp360 can show it made
        # the views alone (a capture: no field, so each truth frame meets its nearest view), and the
        # views put at the wrong cameras (turned by 4 views, 45 degrees): what inconsistent views cost
        alone, turned = root / "views-only", root / "turned-45"
        shutil.copytree(views, alone)
        turned.mkdir()
        for index in range(32):
            shutil.copy(views / f"{(index + 4) % 32:03d}.png", turned / f"{index:03d}.png")
        (turned / "transforms.json").write_text((views / "transforms.json").read_text())
        truth = root / "truth"
        truth.mkdir()
        truth_capture(truth, mesh, 2 * args.size)
        settings = EvalSettings(size=args.size, framing="camera", device=device)
        results = evaluate_paths([run, alone, turned], truth, settings, table=root / "comparison")
        print(f"device {device}; views {args.size} px, fit {args.iterations} iterations in {fit['fit_seconds']} s")
        print((root / "comparison.md").read_text())
        score = results[0]["consistency"]["summary"]
        print(
            f"run consistency: PSNR {score['psnr']:.2f} dB at {score['resolution']} px over {score['views']} views, "
            f"LPIPS {score['lpips']}, CSIM {score['csim']}"
        )
        frames = results[0]["truth"]["frames"]
        print("run, per truth frame (yaw, source, PSNR):")
        print(", ".join(f"{f['yaw']:+.0f} {f['source']} {f['psnr']:.1f}" for f in frames))


if __name__ == "__main__":
    main()
