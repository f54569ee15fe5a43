"""Mesh export from a fitted field: marching cubes (scikit-image) on the field's density inside
the head's box, the largest connected component only, quadric decimation to a face budget
(trimesh + fast-simplification), vertex colours from the field, GLB / OBJ / PLY via trimesh.
The mesh is in the world frame of the cameras (PanoHead's: y up, the face towards +z)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Dp360Error
from ..imaging import atomic_path
from ..outputs import check_file_target
from .fit import LoadedField

MESH_FORMATS = ("glb", "obj", "ply")
HEAD_BOX_HALF = 0.5  # PanoHead renders heads inside [-0.5, 0.5]^3 (box_warp 1)
DEFAULT_DENSITY = 10.0


@dataclass
class MeshSettings:
    resolution: int = 256  # marching-cubes grid per axis
    faces: int = 200_000  # decimate to at most this many faces
    density: float | None = None  # iso-level; None = automatic (see `surface_iso_level`)
    box_half: float = HEAD_BOX_HALF

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        from ..stage import check_float, check_int

        check_int("--mesh-resolution", self.resolution, 16, 1024)
        check_int("--mesh-faces", self.faces, 100, 50_000_000)
        if self.density is not None:
            check_float("--mesh-density", self.density, 1e-6, 1e6)


@torch.no_grad()
def density_grid(field: LoadedField, resolution: int, box_half: float, chunk: int = 1 << 17) -> np.ndarray:
    axis = torch.linspace(-box_half, box_half, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = []
    for part in points.split(chunk):
        values.append(field.model.field.density_fn(part.to(field.device)).reshape(-1).float().cpu())
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


# Vertex colours are volume-rendered along a short ray that arrives along the vertex's normal:
# the iso-level may sit in the field's faint outer layer, whose own colour is untrained.
COLOUR_RAY_LENGTH = 0.08  # a sixth of the head box: from outside the surface to inside it
COLOUR_RAY_SAMPLES = 48


@torch.no_grad()
def field_colours(field: LoadedField, vertices: np.ndarray, normals: np.ndarray, chunk: int = 1 << 13) -> np.ndarray:
    """The colour the field shows at each vertex when seen from outside along its (outward) normal:
    a ray from `vertex + normal * L/2` to `vertex - normal * L/2`, composited over no background."""
    from nerfstudio.cameras.rays import Frustums, RaySamples
    from nerfstudio.field_components.field_heads import FieldHeadNames

    edges = torch.linspace(0, COLOUR_RAY_LENGTH, COLOUR_RAY_SAMPLES + 1, device=field.device)
    colours = []
    for start in range(0, len(vertices), chunk):
        points = torch.tensor(vertices[start : start + chunk], dtype=torch.float32, device=field.device)
        outward = torch.nn.functional.normalize(
            torch.tensor(normals[start : start + chunk], dtype=torch.float32, device=field.device), dim=-1
        )
        count = len(points)
        origins = (points + outward * COLOUR_RAY_LENGTH / 2)[:, None].expand(count, COLOUR_RAY_SAMPLES, 3)
        directions = (-outward)[:, None].expand(count, COLOUR_RAY_SAMPLES, 3)
        starts = edges[:-1].reshape(1, -1, 1).expand(count, COLOUR_RAY_SAMPLES, 1)
        ends = edges[1:].reshape(1, -1, 1).expand(count, COLOUR_RAY_SAMPLES, 1)
        samples = RaySamples(
            frustums=Frustums(
                origins=origins.contiguous(),
                directions=directions.contiguous(),
                starts=starts.contiguous(),
                ends=ends.contiguous(),
                pixel_area=torch.ones_like(starts),
            ),
            camera_indices=torch.zeros_like(starts, dtype=torch.long),
            deltas=(ends - starts).contiguous(),
        )
        outputs = field.model.field(samples)
        weights = samples.get_weights(outputs[FieldHeadNames.DENSITY])  # (count, samples, 1)
        rgb = (weights * outputs[FieldHeadNames.RGB]).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-6)
        colours.append(rgb.clamp(0, 1).float().cpu().numpy())
    return np.concatenate(colours) if colours else np.zeros((0, 3))


def field_colour_fn(field: LoadedField):
    """`field_colours` of this field as a function of (points, outward normals): the colour of the
    texels no view sees (`texture.textured_mesh`)."""
    return lambda points, normals: field_colours(field, np.asarray(points), np.asarray(normals))


def otsu_iso_level(grid: np.ndarray) -> float:
    """Otsu's split of log-density into empty space and head, capped at 10: the fallback when the
    views show no foreground to place the surface by (`surface_iso_level`)."""
    from skimage.filters import threshold_otsu

    logs = np.log(np.clip(grid, 1e-6, None))
    return float(min(DEFAULT_DENSITY, np.exp(threshold_otsu(logs))))


# The views the iso-level is measured from, at most this many, rendered at most this size.
SURFACE_VIEWS, SURFACE_VIEW_SIZE = 8, 64


@torch.no_grad()
def surface_points(field: LoadedField, views: int = SURFACE_VIEWS, size: int = SURFACE_VIEW_SIZE) -> np.ndarray:
    """Where the training views see the head's surface: on each foreground ray of a few training
    cameras (the views' own alpha, `fit.foreground_alpha`), the point at the field's median depth
    (half the ray's light absorbed), for rays the field renders opaque. (N, 3) world points."""
    from .fit import foreground_alpha

    outputs = field.pipeline.datamanager.train_dataparser_outputs
    cameras_all, filenames = outputs.cameras, outputs.image_filenames
    picked = np.unique(np.linspace(0, len(filenames) - 1, min(views, len(filenames))).round().astype(int))
    points = []
    for index in picked:
        from PIL import Image

        image = Image.open(filenames[index]).convert("RGB")
        camera = cameras_all[int(index) : int(index) + 1]
        scale = min(1.0, size / max(image.size))
        camera.rescale_output_resolution(scale)
        height, width = int(camera.height.item()), int(camera.width.item())
        alpha = foreground_alpha(np.asarray(image.resize((width, height), resample=Image.NEAREST)))
        bundle = camera.to(field.device).generate_rays(camera_indices=0)
        rendered = field.model.get_outputs_for_camera_ray_bundle(bundle)
        depth = rendered["depth"].reshape(height, width).float().cpu()
        accumulation = rendered["accumulation"].reshape(height, width).float().cpu()
        keep = torch.from_numpy(alpha > 0) & (accumulation > 0.5)
        origins = bundle.origins.reshape(height, width, 3).float().cpu()[keep]
        directions = bundle.directions.reshape(height, width, 3).float().cpu()[keep]
        points.append((origins + directions * depth[keep][:, None]).numpy())
    return np.concatenate(points) if points else np.zeros((0, 3))


@torch.no_grad()
def surface_iso_level(field: LoadedField, grid: np.ndarray) -> tuple[float, str]:
    """The iso-level that puts the mesh where the views see the surface: the median density of the
    field at `surface_points` (a level read off a density histogram lands in whatever haze the
    field has, outside the head). Otsu's split when the views show no opaque foreground."""
    points = surface_points(field)
    if len(points) < 50:
        return otsu_iso_level(grid), "otsu"
    densities = []
    for part in torch.tensor(points, dtype=torch.float32).split(1 << 16):
        densities.append(field.model.field.density_fn(part.to(field.device)).reshape(-1).float().cpu())
    level = float(torch.cat(densities).median())
    if not (grid.min() < level < grid.max()):
        return otsu_iso_level(grid), "otsu"
    return level, "views"


def fill_cavities(grid: np.ndarray, level: float) -> np.ndarray:
    """The grid with every empty pocket enclosed by the head filled in: the inside of a head is never
    seen by a view, so the field's density there is arbitrary, and its pockets would become
    surfaces inside the mesh."""
    from scipy.ndimage import binary_fill_holes

    inside = grid > level
    pockets = binary_fill_holes(inside) & ~inside
    if not pockets.any():
        return grid
    return np.where(pockets, max(float(grid.max()), 2 * level), grid)


def extract_mesh(field: LoadedField, settings: MeshSettings):
    """The head as a trimesh.Trimesh with vertex colours."""
    import trimesh
    from skimage.measure import marching_cubes

    settings.check()
    grid = density_grid(field, settings.resolution, settings.box_half)
    level, chosen_by = (settings.density, "given") if settings.density is not None else surface_iso_level(field, grid)
    if not (grid.min() < level < grid.max()):
        raise Dp360Error(
            f"The field's density never crosses {level:.3g} inside the head box (range {grid.min():.3g} .. {grid.max():.3g}); "
            "the fit probably failed, or another iso-level is needed (`dp360 export RUN_DIR --mesh-density LEVEL`)."
        )
    grid = fill_cavities(grid, level)
    spacing = 2 * settings.box_half / (settings.resolution - 1)
    vertices, faces, _, _ = marching_cubes(grid, level=level, spacing=(spacing,) * 3)
    mesh = trimesh.Trimesh(vertices - settings.box_half, faces, process=True)
    if len(mesh.faces) > settings.faces:
        mesh = mesh.simplify_quadric_decimation(face_count=settings.faces)
        # Quadric placement can push a vertex a hair outside the sampled box; keep the box exact.
        mesh.vertices = np.clip(mesh.vertices, -settings.box_half, settings.box_half)
    # The largest piece after decimation (before it, decimation could split off slivers): no floaters.
    components = mesh.split(only_watertight=False)
    if len(components) > 1:
        mesh = max(components, key=lambda part: len(part.faces))
    mesh.fix_normals()
    # normals from the final faces (trimesh may keep normals cached from before the fix), outward
    fresh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    if fresh.is_volume and fresh.volume < 0:
        mesh.invert()
        fresh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    colours = field_colours(field, np.asarray(mesh.vertices), np.asarray(fresh.vertex_normals))
    mesh.visual.vertex_colors = np.concatenate(
        [(colours * 255).round(), np.full((len(colours), 1), 255)], axis=1
    ).astype(np.uint8)
    mesh.metadata["iso_level"] = float(level)
    mesh.metadata["iso_level_from"] = chosen_by
    return mesh


def write_mesh(mesh, out: Path, mesh_format: str, overwrite: bool = False) -> Path:
    """Write the mesh to `out` atomically; an existing file is refused unless `overwrite` (see dp360.outputs)."""
    if mesh_format not in MESH_FORMATS:
        raise Dp360Error(f"The mesh format must be one of {', '.join(MESH_FORMATS)}, not {mesh_format!r}.")
    out = check_file_target(out, overwrite)
    with atomic_path(out) as temporary:
        data = mesh.export(file_type=mesh_format)
        Path(temporary).write_bytes(data if isinstance(data, bytes) else data.encode())
    return out
