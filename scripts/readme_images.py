"""The README's pictures of the radiance-field stage, made by dp360 from the synthetic-head benchmark.

    .venv/bin/python scripts/readme_images.py [--out docs/images] [--size 128] [--iterations 400]
        [--frames 8] [--elevation 15] [--mesh-size 224] [--mesh-resolution 128] [--mesh-faces 60000]
        [--texture-size 1024] [--device auto] [--work DIR]

No diffusion model and no real weights are involved: the synthetic head of `dp360.nerf.synthetic`
(a known, procedurally textured mesh, the ground truth of `benchmarks/nerf_quality.py`) is rendered
at the 32 DP360 orbit cameras, and dp360's own field code does the rest, as the fit, render and
export stages of `dp360 reconstruct` call it: `fit_field` (nerfacto-head, the "cpu" preset with
`--iterations`), `render_turntable` and `coloured_mesh` + `write_mesh` (a GLB UV-textured from the
views, `--texture views`). Writes into `--out`:

- `synthetic-turntable.png`: `--frames` evenly spaced turntable frames at `--elevation` degrees
  above the training orbit (so none is a training view); top row the known scene at those
  cameras, bottom row the fitted field's turntable;
- `synthetic-mesh.png`: the exported GLB, read back with trimesh and ray cast (Embree) from three
  angles; top row the known scene, middle row the GLB with its texture, bottom row its geometry in
  grey with a headlight.

Seeded; about 6 minutes on 2 CPU cores with the defaults. PNGs are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from dp360 import cameras
from dp360.nerf import synthetic
from dp360.nerf.common import FIT_FILE, FitSettings
from dp360.nerf.fit import fit_field, load_field
from dp360.nerf.mesh import MeshSettings, coloured_mesh, write_mesh
from dp360.nerf.render import TurntableSettings, render_turntable, turntable_poses
from dp360.nerf.texture import render_textured
from dp360.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
MESH_YAWS = (0.0, 60.0, 150.0)  # front, three-quarter, back three-quarter
MESH_ELEVATION = 10.0
GAP = 4  # pixels between tiles


def montage(rows: list[list[np.ndarray]], background: int = 255) -> np.ndarray:
    """Tiles (H, W, 3 uint8, all the same size) in rows, GAP pixels apart."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * height + (len(rows) - 1) * GAP, columns * width + (columns - 1) * GAP, 3), background, np.uint8
    )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = r * (height + GAP), c * (width + GAP)
            canvas[top : top + height, left : left + width] = tile
    return canvas


def save_png(path: Path, pixels: np.ndarray) -> int:
    """A palette PNG (256 colours, no dithering: smooth shading stays smooth); returns its size."""
    image = Image.fromarray(pixels).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return path.stat().st_size


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def ray_cast_grey(mesh, cam2world: np.ndarray, size: int, background=synthetic.BACKGROUND) -> np.ndarray:
    """Grey headlight shading of `mesh` from an OpenCV camera."""
    origins, directions = cameras.pixel_rays(
        torch.tensor(cam2world, dtype=torch.float64)[None],
        torch.tensor(cameras.normalized_intrinsics(), dtype=torch.float64)[None],
        size,
    )
    origins, directions = origins[0].numpy(), directions[0].numpy()
    locations, ray_index, triangle = mesh.ray.intersects_location(origins, directions, multiple_hits=False)
    weights = trimesh.triangles.points_to_barycentric(mesh.triangles[triangle], locations)
    corners = mesh.faces[triangle]
    normals = np.einsum("nk,nkc->nc", weights, mesh.vertex_normals[corners])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.clip(-(normals * directions[ray_index]).sum(axis=1), 0, 1)
    grey = np.tile(np.asarray(background, dtype=np.float64), (size * size, 1))
    grey[ray_index] = (0.15 + 0.8 * light)[:, None] * np.array([0.85, 0.85, 0.88])
    return grey.reshape(size, size, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--size", type=int, default=128, help="pixels of the training views and the turntable frames")
    parser.add_argument("--iterations", type=int, default=400, help="fit iterations (the cpu preset otherwise)")
    parser.add_argument("--frames", type=int, default=8, help="turntable frames in the strip")
    parser.add_argument(
        "--elevation", type=float, default=15.0, help="turntable degrees above the training orbit (novel views)"
    )
    parser.add_argument("--mesh-size", type=int, default=224, help="pixels of each mesh view")
    parser.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid per axis")
    parser.add_argument("--mesh-faces", type=int, default=60_000, help="decimate the mesh to at most this many faces")
    parser.add_argument("--texture-size", type=int, default=1024, help="side of the UV texture in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the views, fit and GLB here (a fit found there is reused)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="dp360-readme-") as folder:
            make_images(args, device, Path(folder))
    else:
        make_images(args, device, args.work)


def make_images(args: argparse.Namespace, device: str, work: Path) -> None:
    start = time.perf_counter()
    head = synthetic.head_mesh()
    views, nerf = work / "views", work / "nerf"
    if (nerf / FIT_FILE).is_file():
        print(f"reusing the fit in {nerf}")
    else:
        synthetic.write_views(views, size=args.size, mesh=head)
        nerf.mkdir(parents=True)
        settings = FitSettings.preset("cpu", iterations=args.iterations, seed=0)
        summary = fit_field(views, nerf, settings, device, progress=True)
        print(f"fit: {settings.iterations} iterations in {summary['fit_seconds']:.0f} s on {device}")
    field = load_field(nerf, device, views)

    turntable = TurntableSettings(frames=args.frames, resolution=args.size, elevation=args.elevation)
    frames, _ = render_turntable(field, turntable)
    truth = [to_uint8(synthetic.render(head, pose, args.size)) for pose in turntable_poses(turntable)]
    strip = args.out / "synthetic-turntable.png"
    strip_bytes = save_png(strip, montage([truth, frames]))
    print(f"{strip}: {strip_bytes / 1024:.0f} KiB")

    settings = MeshSettings(resolution=args.mesh_resolution, faces=args.mesh_faces, texture_size=args.texture_size)
    (exported,) = write_mesh(coloured_mesh(field, settings, views), work / "head.glb", "glb", overwrite=True)
    mesh = trimesh.load(exported, force="mesh")  # what a user opens: the GLB as written
    print(f"mesh: {len(mesh.faces)} faces, {exported.stat().st_size / 1e6:.1f} MB as GLB")
    poses = [cameras.orbit_pose(yaw, MESH_ELEVATION) for yaw in MESH_YAWS]
    rows = [
        [to_uint8(synthetic.render(head, pose, args.mesh_size)) for pose in poses],
        [to_uint8(render_textured(mesh, pose, args.mesh_size)) for pose in poses],
        [to_uint8(ray_cast_grey(mesh, pose, args.mesh_size)) for pose in poses],
    ]
    mesh_png = args.out / "synthetic-mesh.png"
    mesh_bytes = save_png(mesh_png, montage(rows))
    print(f"{mesh_png}: {mesh_bytes / 1024:.0f} KiB")
    print(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
