"""A synthetic ground truth for the field stage: a procedurally built, textured, closed,
head-sized mesh, rendered with trimesh's ray caster (Embree) at the DP360 orbit cameras and at
held-out cameras between them. No diffusion model is involved, so fit quality is measurable.

The head: an ellipsoid (half-axes 0.22 x 0.27 x 0.24, like PanoHead's heads inside the unit
box at camera radius 2.7) with a nose, two ears and a chin, coloured per face with a
high-frequency pattern (stripes and checkers at ~1.5 cm) so that blur shows in PSNR, and lit
by a fixed world-space light (Lambertian, so colours do not depend on the viewpoint).

Renders are antialiased (`SUPERSAMPLE`^2 rays per pixel, box-filtered), as a camera or a
generated view integrates over its pixels: the pattern is finer than a 64 px view's pixel
(~1 cm at the orbit), and point-sampled it aliases differently in every view, which no single
3D field can reproduce (it cost the benchmark's fits about 2 dB of held-out PSNR).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import cameras, layout
from ..atomic import write_json_atomic
from ..imaging import save_image_atomic

BACKGROUND = (0.8, 0.8, 0.8)
# rays per pixel side in `render`: 4 x 4 samples per pixel, averaged
SUPERSAMPLE = 4
LIGHT = np.array([0.3, 0.6, 0.75]) / np.linalg.norm([0.3, 0.6, 0.75])


def head_mesh(subdivisions: int = 6):
    """The synthetic head as a trimesh.Trimesh with per-face colours (closed, one component)."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    unit = sphere.vertices.copy()
    radius = np.ones(len(unit))

    def bump(direction, width, height):
        direction = np.asarray(direction, dtype=np.float64)
        direction = direction / np.linalg.norm(direction)
        return height * np.exp(-(1 - unit @ direction) / width)

    radius += bump([0, -0.05, 1], 0.012, 0.28)  # nose
    radius += bump([1, 0.05, -0.05], 0.01, 0.18) + bump([-1, 0.05, -0.05], 0.01, 0.18)  # ears
    radius += bump([0, -0.75, 0.65], 0.03, 0.08)  # chin
    vertices = unit * radius[:, None] * np.array([0.22, 0.27, 0.24])
    mesh = trimesh.Trimesh(vertices, sphere.faces, process=False)
    centres = mesh.triangles_center
    stripes = 0.5 + 0.5 * np.sin(centres[:, 1] * 2 * np.pi / 0.03)
    checker = ((np.floor(centres[:, 0] / 0.015) + np.floor(centres[:, 2] / 0.015)) % 2).astype(np.float64)
    base = np.stack([0.85 * stripes + 0.1, 0.3 + 0.5 * checker, 0.6 - 0.4 * stripes * checker], axis=1)
    # a distinct left/right and top colour cast so that mirrored renders are wrong
    base[:, 0] += 0.15 * np.tanh(centres[:, 0] / 0.1)
    base[:, 2] += 0.15 * np.tanh(centres[:, 1] / 0.1)
    shade = 0.35 + 0.65 * np.clip(mesh.face_normals @ LIGHT, 0, 1)
    colours = np.clip(base * shade[:, None], 0, 1)
    mesh.visual.face_colors = np.concatenate([(colours * 255).round(), np.full((len(colours), 1), 255)], axis=1).astype(
        np.uint8
    )
    return mesh


def render(
    mesh,
    cam2world: np.ndarray,
    size: int,
    intrinsics: np.ndarray | None = None,
    background=BACKGROUND,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """(size, size, 3) float image in [0, 1] of `mesh` seen by an OpenCV cam2world camera, each
    pixel the mean of `supersample` x `supersample` rays spread over it."""
    import torch

    intrinsics = cameras.normalized_intrinsics() if intrinsics is None else intrinsics
    fine = size * supersample  # normalized intrinsics: the same camera at a finer pixel grid
    origins, directions = cameras.pixel_rays(
        torch.tensor(cam2world, dtype=torch.float64)[None], torch.tensor(intrinsics, dtype=torch.float64)[None], fine
    )
    origins, directions = origins[0].numpy(), directions[0].numpy()
    triangles = mesh.ray.intersects_first(origins, directions)
    image = np.tile(np.asarray(background, dtype=np.float64), (fine * fine, 1))
    hit = triangles >= 0
    image[hit] = mesh.visual.face_colors[triangles[hit], :3] / 255.0
    return image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))


def render_mask(mesh, cam2world: np.ndarray, size: int, intrinsics: np.ndarray | None = None) -> np.ndarray:
    """(size, size) bool: the pixels where `mesh` is seen by an OpenCV cam2world camera."""
    import torch

    intrinsics = cameras.normalized_intrinsics() if intrinsics is None else intrinsics
    origins, directions = cameras.pixel_rays(
        torch.tensor(cam2world, dtype=torch.float64)[None], torch.tensor(intrinsics, dtype=torch.float64)[None], size
    )
    return (mesh.ray.intersects_first(origins[0].numpy(), directions[0].numpy()) >= 0).reshape(size, size)


def held_out_poses(view_count: int = 32, count: int = 8, elevation: float = 0.0) -> list[np.ndarray]:
    """Cameras half-way between consecutive training views (the hardest yaws to interpolate)."""
    step = 360.0 / view_count
    yaws = [step / 2 + k * 360.0 / count for k in range(count)]
    return [cameras.orbit_pose(yaw, elevation) for yaw in yaws]


def write_views(folder: str | Path, size: int = 256, view_count: int = 32, mesh=None, background=BACKGROUND) -> Path:
    """PNG views at the DP360 orbit + `transforms.json`, the layout the fit stage reads, on a plain
    `background` colour (0..1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else head_mesh()
    entries = []
    for index, pose in enumerate(cameras.dp360_orbit(view_count)):
        name = f"{index:03d}.png"
        save_image_atomic(
            folder / name, (render(mesh, pose, size, background=background) * 255).round().astype(np.uint8)
        )
        entries.append(cameras.ViewCamera(name, pose, cameras.normalized_intrinsics()))
    write_json_atomic(folder / "transforms.json", cameras.to_nerfstudio_transforms(entries, size, size))
    return folder


def write_fitted_run(root: str | Path, size: int = 48, iterations: int = 250, seed: int = 42):
    """A run's `views/` (the synthetic head at `size` px) and `nerf/` (a field fitted on a CPU with
    the "test" preset and `iterations`) under `root`: the tests' tiny fitted run. Returns
    (views folder, nerf folder, the fit's summary)."""
    from .common import FitSettings
    from .fit import fit_field

    root = Path(root)
    views = write_views(root / layout.VIEWS, size=size)
    nerf = root / layout.NERF
    nerf.mkdir(parents=True)
    settings = FitSettings.preset("test", iterations=iterations, seed=seed)
    return views, nerf, fit_field(views, nerf, settings, "cpu", progress=False)
