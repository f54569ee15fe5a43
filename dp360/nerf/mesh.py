"""Mesh export from a fitted field: marching cubes (scikit-image) inside the head's box on the
field's depth at the training cameras, fused into a truncated signed distance (`fused_distance`;
a density iso-level, the usual choice, lands in a short fit's soft shell or in the hollow inside
of the head, which no view sees), or on the field's density at a given iso-level; the largest
connected component only, quadric decimation to a face budget
(trimesh + fast-simplification), vertex colours from the field, GLB / OBJ / PLY via trimesh.
The mesh is in the world frame of the cameras (PanoHead's: y up, the face towards +z)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import Dp360Error
from ..outputs import check_file_target
from .checkpoint import LoadedField

MESH_FORMATS = ("glb", "obj", "ply")
TEXTURE_SOURCES = ("views", "field", "vertex")  # `--texture`
HEAD_BOX_HALF = 0.5  # PanoHead renders heads inside [-0.5, 0.5]^3 (box_warp 1)
DEFAULT_DENSITY = 10.0


@dataclass
class MeshSettings:
    resolution: int = 256  # marching-cubes grid per axis
    faces: int = 200_000  # decimate to at most this many faces
    density: float | None = None  # a density iso-level; None = the surface the views see (`fused_distance`)
    box_half: float = HEAD_BOX_HALF
    # The colours: a UV texture baked from the views (texture.py), a UV texture of the field's own
    # colours, or the field's colours per vertex (no texture).
    texture: str = "views"
    texture_size: int = 2048

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        from ..checks import check_float, check_int

        check_int("--mesh-resolution", self.resolution, 16, 1024)
        check_int("--mesh-faces", self.faces, 100, 50_000_000)
        if self.density is not None:
            check_float("--mesh-density", self.density, 1e-6, 1e6)
        if self.texture not in TEXTURE_SOURCES:
            raise Dp360Error(f"--texture must be one of {', '.join(TEXTURE_SOURCES)}, not {self.texture!r}.")
        check_int("--texture-size", self.texture_size, 64, 8192)


@torch.no_grad()
def density_grid(field: LoadedField, resolution: int, box_half: float, chunk: int = 1 << 17) -> np.ndarray:
    axis = torch.linspace(-box_half, box_half, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = []
    for part in points.split(chunk):
        values.append(field.model.field.density_fn(part.to(field.device)).reshape(-1).float().cpu())
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


# Vertex colours are volume-rendered along a short ray through the vertex: the surface may sit in
# the field's faint outer layer, whose own colour is untrained.
COLOUR_RAY_LENGTH = 0.08  # a sixth of the head box: from outside the surface to inside it
COLOUR_RAY_SAMPLES = 48


def training_camera_centres(field: LoadedField) -> torch.Tensor:
    """(N, 3) where the training cameras are."""
    cameras = field.pipeline.datamanager.train_dataparser_outputs.cameras
    return cameras.camera_to_worlds[:, :, 3].float()


@torch.no_grad()
def field_colours(field: LoadedField, vertices: np.ndarray, normals: np.ndarray, chunk: int = 1 << 13) -> np.ndarray:
    """The colour the field shows at each vertex, seen from the training camera that faces its
    (outward) normal most squarely: a ray from that side, through the vertex, L/2 either side of
    it, composited over no background. The ray must come from where a view came from: the colour
    head is view-dependent, and a direction no view had (from above the head, for an orbit)
    gives an untrained colour."""
    from nerfstudio.cameras.rays import Frustums, RaySamples
    from nerfstudio.field_components.field_heads import FieldHeadNames

    centres = training_camera_centres(field).to(field.device)
    edges = torch.linspace(0, COLOUR_RAY_LENGTH, COLOUR_RAY_SAMPLES + 1, device=field.device)
    colours = []
    for start in range(0, len(vertices), chunk):
        points = torch.tensor(vertices[start : start + chunk], dtype=torch.float32, device=field.device)
        normal = torch.nn.functional.normalize(
            torch.tensor(normals[start : start + chunk], dtype=torch.float32, device=field.device), dim=-1
        )
        towards = torch.nn.functional.normalize(centres[None] - points[:, None], dim=-1)  # (count, cameras, 3)
        best = (towards * normal[:, None]).sum(-1).argmax(dim=1)
        outward = towards[torch.arange(len(points), device=field.device), best]
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
    """`field_colours` of this field as a function of (points, outward normals): the colours of a
    `--texture field` (texture.textured_mesh), one short volume render per texel."""
    return lambda points, normals: field_colours(field, np.asarray(points), np.asarray(normals))


VERTEX_NEIGHBOURS = 4


def vertex_colour_fn(mesh):
    """The field's colours at the vertices of `mesh` (`extract_mesh`'s vertex colours) as a function
    of (points, normals): inverse-distance weights of the nearest vertices. The colour of the texels
    no view sees, which may be millions: a volume render per texel would take minutes on a CPU."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.asarray(mesh.vertices))
    colours = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    neighbours = min(VERTEX_NEIGHBOURS, len(colours))

    def colour(points, normals):
        distance, index = tree.query(np.asarray(points, dtype=np.float64), k=neighbours)
        distance, index = distance.reshape(len(points), -1), index.reshape(len(points), -1)
        weight = 1.0 / np.maximum(distance, 1e-9)
        return (colours[index] * weight[..., None]).sum(axis=1) / weight.sum(axis=1, keepdims=True)

    return colour


def otsu_iso_level(grid: np.ndarray) -> float:
    """Otsu's split of log-density into empty space and head, capped at 10: the fallback when the
    views show no foreground to place the surface by (`surface_iso_level`)."""
    from skimage.filters import threshold_otsu

    logs = np.log(np.clip(grid, 1e-6, None))
    return float(min(DEFAULT_DENSITY, np.exp(threshold_otsu(logs))))


# The views the surface is read from, at most this many, rendered at most this size.
SURFACE_VIEWS, SURFACE_VIEW_SIZE = 16, 96
# A view sees the surface where its ray has absorbed this share of its light. A short fit's field
# is a soft shell a few centimetres deep, and its median depth (half the light) lies 2 cm inside
# the head (synthetic head, 250 steps at 48 px: 1.9 cm at 0.5, 0.3 cm at 0.1, 0.0 at 0.05); a
# sharp field has all its light in one sample, where every share gives the same depth.
SURFACE_LIGHT_SHARE = 0.1
# Pixel states of a `ViewDepth`
EMPTY, SURFACE, UNKNOWN = 0, 1, 2


@dataclass
class ViewDepth:
    """One training camera's view of the fitted head: nerfstudio's camera (OpenGL axes, rescaled
    to the rendered size) and, per pixel, its state (EMPTY: the view shows its background there;
    SURFACE: the head, at `depth` along the pixel's unit ray; UNKNOWN: the view shows the head but
    the field renders it transparent, so neither can be trusted)."""

    camera: Any
    depth: torch.Tensor  # (H, W), metres along the unit ray
    state: torch.Tensor  # (H, W) uint8
    origins: torch.Tensor  # (H, W, 3)
    directions: torch.Tensor  # (H, W, 3)


@torch.no_grad()
def surface_depth(field: LoadedField, bundle, share: float = SURFACE_LIGHT_SHARE, chunk: int = 4096):
    """(depth, accumulation) of each ray of a flat RayBundle: where the ray has absorbed `share` of
    its light, and how much it absorbs in all (nerfacto's collider, proposal sampler and field)."""
    from nerfstudio.field_components.field_heads import FieldHeadNames

    model = field.model
    depths, accumulations = [], []
    for start in range(0, len(bundle), chunk):
        rays = model.collider(bundle[start : start + chunk].to(field.device))
        samples, _, _ = model.proposal_sampler(rays, density_fns=model.density_fns)
        weights = samples.get_weights(model.field.forward(samples)[FieldHeadNames.DENSITY])[..., 0]
        absorbed = weights.cumsum(dim=-1)
        middles = ((samples.frustums.starts + samples.frustums.ends) / 2)[..., 0]
        index = torch.searchsorted(absorbed.contiguous(), torch.full_like(absorbed[:, :1], share))
        depths.append(middles.gather(1, index.clamp(max=middles.shape[1] - 1))[:, 0].float().cpu())
        accumulations.append(absorbed[:, -1].float().cpu())
    return torch.cat(depths), torch.cat(accumulations)


@torch.no_grad()
def view_depths(field: LoadedField, views: int = SURFACE_VIEWS, size: int = SURFACE_VIEW_SIZE) -> list[ViewDepth]:
    """The field's surface seen from a few training cameras, spread evenly over the orbit. A view
    with a plain background (`fit.foreground_alpha`) says where the head is not; one without says
    it where the field is transparent."""
    from PIL import Image

    from .common import foreground_alpha

    outputs = field.pipeline.datamanager.train_dataparser_outputs
    cameras_all, filenames = outputs.cameras, outputs.image_filenames
    picked = np.unique(np.linspace(0, len(filenames) - 1, min(views, len(filenames))).round().astype(int))
    result = []
    for index in picked:
        image = Image.open(filenames[index]).convert("RGB")
        camera = cameras_all[int(index) : int(index) + 1]
        camera.rescale_output_resolution(min(1.0, size / max(image.size)))
        height, width = int(camera.height.item()), int(camera.width.item())
        head = torch.from_numpy(foreground_alpha(np.asarray(image.resize((width, height), resample=Image.NEAREST))) > 0)
        bundle = camera.generate_rays(camera_indices=0).flatten()
        depth, accumulation = surface_depth(field, bundle)
        opaque = (accumulation > 0.5).reshape(height, width)
        state = torch.full((height, width), UNKNOWN, dtype=torch.uint8)
        if head.all():  # no plain background: only the field can say where the head is not
            state[~opaque] = EMPTY
        else:
            state[~head] = EMPTY
        state[head & opaque] = SURFACE
        result.append(
            ViewDepth(
                camera=camera,
                depth=depth.reshape(height, width),
                state=state,
                origins=bundle.origins.reshape(height, width, 3).float().cpu(),
                directions=bundle.directions.reshape(height, width, 3).float().cpu(),
            )
        )
    return result


def surface_points(depths: list[ViewDepth]) -> np.ndarray:
    """Where the training views see the head's surface: (N, 3) world points, one per SURFACE pixel."""
    points = []
    for view in depths:
        seen = view.state == SURFACE
        points.append((view.origins[seen] + view.directions[seen] * view.depth[seen][:, None]).numpy())
    return np.concatenate(points) if points else np.zeros((0, 3))


@torch.no_grad()
def fused_distance(depths: list[ViewDepth], points: torch.Tensor, truncation: float) -> torch.Tensor:
    """(N,) the views' depths fused into a truncated signed distance (Curless and Levoy's volumetric
    fusion, unweighted): positive outside the head, negative inside, zero on the surface.

    Each view whose picture holds a point votes: +truncation where it shows its background there;
    its depth minus the point's distance, clamped to +-truncation, where it shows the surface and
    the point lies in front of it or less than `truncation` behind; nothing where the point lies
    deeper (hidden from it) or the pixel is UNKNOWN. A point no view votes on but at least two hold
    in their pictures lies behind every view's surface, deep inside: -truncation. One no view
    holds is outside everything the views show: +truncation."""
    total = torch.zeros(len(points))
    votes = torch.zeros(len(points))
    pictured = torch.zeros(len(points))
    for view in depths:
        camera = view.camera
        cam2world = camera.camera_to_worlds[0].float()  # OpenGL axes: x right, y up, looking along -z
        offset = points - cam2world[:, 3]
        local = offset @ cam2world[:, :3]
        ahead = -local[:, 2]
        safe = torch.where(ahead > 1e-6, ahead, torch.ones_like(ahead))
        column = (camera.fx[0, 0] * local[:, 0] / safe + camera.cx[0, 0]).floor().long()
        row = (-camera.fy[0, 0] * local[:, 1] / safe + camera.cy[0, 0]).floor().long()
        height, width = view.depth.shape
        inside = (ahead > 1e-6) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
        column, row = column.clamp(0, width - 1), row.clamp(0, height - 1)
        state = view.state[row, column]
        signed = (view.depth[row, column] - offset.norm(dim=-1)).clamp(-truncation, truncation)
        empty = inside & (state == EMPTY)
        surface = inside & (state == SURFACE) & (signed > -truncation)
        total += torch.where(empty, truncation, 0.0) + torch.where(surface, signed, 0.0)
        votes += (empty | surface).float()
        pictured += inside.float()
    fused = total / votes.clamp_min(1)
    unvoted = votes == 0
    fused[unvoted] = torch.where(pictured[unvoted] >= 2, -truncation, truncation)
    return fused


def distance_grid(depths: list[ViewDepth], resolution: int, box_half: float) -> np.ndarray:
    """`fused_distance` on the marching-cubes grid, one x-plane at a time. The truncation spans
    three grid cells or three pixels at the head's distance (the larger), and at least 2 cm: more
    than a short fit's depth error, less than an ear's thickness."""
    axis = torch.linspace(-box_half, box_half, resolution)
    camera = depths[0].camera
    pixel = float(camera.camera_to_worlds[0, :, 3].norm()) / float(camera.fx[0, 0])
    truncation = max(0.02, 3 * pixel, 3 * 2 * box_half / (resolution - 1))
    planes = []
    for plane in axis:
        points = torch.stack(torch.meshgrid(plane[None], axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        planes.append(fused_distance(depths, points, truncation).reshape(resolution, resolution))
    return torch.stack(planes).numpy()


@torch.no_grad()
def surface_iso_level(field: LoadedField, grid: np.ndarray, depths: list[ViewDepth]) -> tuple[float, str]:
    """The iso-level that puts the mesh where the views see the surface: the median density of the
    field at `surface_points` (a level read off a density histogram lands in whatever haze the
    field has, outside the head). Otsu's split when the views show no opaque foreground."""
    points = surface_points(depths)
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


def orient_outward(mesh):
    """`mesh` with one winding over its whole surface and its faces facing outward. Marching cubes
    on an inside-positive grid gives inward faces, and a surface left open (by decimation, or where
    it meets the box) is no volume, for which trimesh's `fix_normals` keeps whatever it finds; the
    sign of the volume it encloses decides here, open or closed (a head's holes are small). Inward
    faces made the texture bake see almost no texel and viewers cull the head's outside."""
    import trimesh

    trimesh.repair.fix_winding(mesh)
    if trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).volume < 0:
        mesh.invert()
    return mesh


def extract_mesh(field: LoadedField, settings: MeshSettings):
    """The head as a trimesh.Trimesh with vertex colours."""
    import trimesh
    from skimage.measure import marching_cubes

    settings.check()
    depths = view_depths(field) if settings.density is None else []
    if any((view.state == SURFACE).any() for view in depths):
        # inside positive, so that one marching-cubes call serves both kinds of grid
        grid, level, surface_from = -distance_grid(depths, settings.resolution, settings.box_half), 0.0, "views"
    else:
        grid = density_grid(field, settings.resolution, settings.box_half)
        level, surface_from = (
            (settings.density, "given") if settings.density is not None else (otsu_iso_level(grid), "otsu")
        )
        if not (grid.min() < level < grid.max()):
            raise Dp360Error(
                f"The field's density never crosses {level:.3g} inside the head box (range {grid.min():.3g} .. {grid.max():.3g}); "
                "the fit probably failed, or another iso-level is needed (`dp360 export RUN_DIR --mesh-density LEVEL`)."
            )
        grid = fill_cavities(grid, level)
    if not (grid.min() < level < grid.max()):
        raise Dp360Error(
            "The views show no head surface inside the head box: the fit probably failed; refit the views."
        )
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
    mesh = orient_outward(mesh)
    # normals from the final faces (trimesh may keep normals cached from before the fix)
    fresh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    colours = field_colours(field, np.asarray(mesh.vertices), np.asarray(fresh.vertex_normals))
    mesh.visual.vertex_colors = np.concatenate(
        [(colours * 255).round(), np.full((len(colours), 1), 255)], axis=1
    ).astype(np.uint8)
    # the density iso-level where the surface is a level of the density, else None
    mesh.metadata["iso_level"] = None if surface_from == "views" else float(level)
    mesh.metadata["surface_from"] = surface_from
    return mesh


def coloured_mesh(field: LoadedField, settings: MeshSettings, views_dir: Path | None):
    """`extract_mesh`, then textured as `settings.texture` says: baked from the views in
    `views_dir` (texels no view sees get the field's colour, from the vertices), or from the field
    alone."""
    mesh = extract_mesh(field, settings)
    if settings.texture == "vertex":
        return mesh
    from .texture import textured_mesh

    if settings.texture == "views":
        textured = textured_mesh(mesh, views_dir, settings.texture_size, vertex_colour_fn(mesh))
    else:
        textured = textured_mesh(mesh, None, settings.texture_size, field_colour_fn(field))
    textured.metadata.update({key: value for key, value in mesh.metadata.items() if key not in textured.metadata})
    return textured


def is_textured(mesh) -> bool:
    return getattr(mesh.visual, "kind", None) == "texture"


def write_mesh(mesh, out: Path, mesh_format: str, overwrite: bool = False) -> list[Path]:
    """Write the mesh to `out` atomically; an existing file is refused unless `overwrite` (see
    dp360.outputs). A textured mesh: GLB with a PBR base-colour texture; OBJ with its MTL and PNG
    beside it; PLY (no texture in the format) with the texture sampled at the vertices. Returns
    the files written, `out` first."""
    if mesh_format not in MESH_FORMATS:
        raise Dp360Error(f"The mesh format must be one of {', '.join(MESH_FORMATS)}, not {mesh_format!r}.")
    if is_textured(mesh) and mesh_format == "obj":
        from .texture import write_textured_obj

        return write_textured_obj(mesh, out, overwrite)
    if is_textured(mesh) and mesh_format == "ply":
        mesh = mesh.copy()
        mesh.visual = mesh.visual.to_color()
    out = check_file_target(out, overwrite)
    with atomic_path(out) as temporary:
        data = mesh.export(file_type=mesh_format)
        Path(temporary).write_bytes(data if isinstance(data, bytes) else data.encode())
    return [out]
