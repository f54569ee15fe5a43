"""UV-textured head meshes: a box-projection unwrap of the extracted mesh (packed by xatlas) and a
texture baked by projecting the generated views onto it (the field's own colours are blurrier than
the views it was fitted to).

A texel's colour is a weighted average over the views that see it: visibility comes from the
mesh's own depth in each view (ray-cast at the view's resolution), the weight from the viewing
angle (cos^4, nothing for grazing or back-facing views) and the distance to the view's silhouette
edges, so neighbouring views blend across seams. Texels no view sees get a fallback colour (the
field's, when the caller passes it), and the atlas is dilated so bilinear filtering at chart
borders does not pull in empty texels.

UV convention (trimesh's and OBJ's): v = 0 is the bottom row of the texture image, texel (row r,
column c) of a `size`^2 texture has its centre at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size.
trimesh flips v itself when it writes glTF, whose origin is the top-left corner.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import cameras
from ..atomic import atomic_path
from ..errors import Dp360Error
from ..outputs import check_file_target
from ..safety import read_json_object

DEFAULT_TEXTURE_SIZE = 2048
BACKGROUND = (0.8, 0.8, 0.8)

# Charts: the six projection directions, the least cosine between a face's normal and its chart's
# direction (a projection keeps a triangle's winding when positive), and how small a chart may be
# before its faces join a neighbour (rounds of that, each moving a one-face-wide border).
BOX_AXES = np.concatenate([np.eye(3), -np.eye(3)])
MIN_PROJECTION_COSINE = 0.15
SMALL_CHART_FACES = 32
SMALL_CHART_ROUNDS = 8
# Packing: texels between charts (plus xatlas's one for bilinear filtering) and the part of the
# atlas the charts are scaled to fill (xatlas packs heads' charts to about 65-70%).
ATLAS_PADDING = 2
PACKED_FRACTION = 0.6
# View weight cos(angle)^VIEW_ANGLE_POWER: a frontal view dominates, an oblique one (sharper
# foreshortening, more resampling blur) only fills in; below MIN_VIEW_COSINE (~84 degrees) a
# view is ignored: its pixels smear over a large surface.
VIEW_ANGLE_POWER = 4
MIN_VIEW_COSINE = 0.1
# A texel is visible in a view when its distance to the camera matches the view's depth map within
# this fraction of the distance (0.005 at the orbit, a fortieth of the head's half-width) plus two pixel footprints
# (bilinear depth across a pixel on an oblique surface) and the texel's own size.
DEPTH_TOLERANCE_FRACTION = 0.002
DEPTH_TOLERANCE_PIXELS = 2.0
# Pixels near a silhouette or a depth jump mix two surfaces: their weight ramps up over this
# fraction of the image size (at least one pixel) and never drops below SILHOUETTE_FLOOR (a texel
# seen only near silhouettes still prefers a view's colour to the fallback).
SILHOUETTE_RAMP = 0.01
SILHOUETTE_FLOOR = 0.05
# Candidate texels tested at once by the rasterizer (memory: ~10 float64 arrays of this length).
RASTER_CHUNK = 1 << 21

FallbackColourFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Unwrapping and UV rasterization
# --------------------------------------------------------------------------------------------


def _components(face_count: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component id of every face, joined by the face pairs (P, 2) given."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(face_count, face_count))
    return connected_components(graph, directed=False)[1]


def box_charts(mesh) -> tuple[np.ndarray, np.ndarray]:
    """(chart id, projection direction index into BOX_AXES) of every face: a chart is a connected
    patch of faces that all face one of the six axis directions, so projecting it onto the plane
    across that direction keeps every triangle's winding (no flipped texels) and shrinks it at most
    1 / MIN_PROJECTION_COSINE times. (A patch facing one way could still fold over itself in the
    projection; heads' smooth surfaces hardly do, and `rasterize_uv`'s coverage would show it.)
    Directions come from normals smoothed over each face's corners
    (marching-cubes noise would make confetti), and charts smaller than SMALL_CHART_FACES give
    their faces to a neighbouring chart where that keeps the winding."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    alignment = np.asarray(mesh.face_normals) @ BOX_AXES.T  # (F, 6) cosines of the faces' own normals
    smoothed = smooth_vertex_normals(mesh.vertices, faces)[faces].sum(axis=1) @ BOX_AXES.T
    direction = np.argmax(smoothed, axis=1)
    rows = np.arange(len(faces))
    badly_aligned = alignment[rows, direction] < MIN_PROJECTION_COSINE
    direction[badly_aligned] = np.argmax(alignment[badly_aligned], axis=1)
    pairs = np.asarray(mesh.face_adjacency, dtype=np.int64).reshape(-1, 2)
    for _ in range(SMALL_CHART_ROUNDS):
        chart = _components(len(faces), pairs[direction[pairs[:, 0]] == direction[pairs[:, 1]]])
        small = np.bincount(chart)[chart] < SMALL_CHART_FACES
        if not small.any():
            break
        moved = direction.copy()
        for face, neighbour in (pairs.T, pairs[:, ::-1].T):
            take = small[face] & ~small[neighbour] & (direction[face] != direction[neighbour])
            take &= alignment[face, direction[neighbour]] >= MIN_PROJECTION_COSINE
            moved[face[take]] = direction[neighbour[take]]
        if np.array_equal(moved, direction):
            break
        direction = moved
    chart = _components(len(faces), pairs[direction[pairs[:, 0]] == direction[pairs[:, 1]]])
    return chart, direction


def unwrap(mesh, texture_size: int = DEFAULT_TEXTURE_SIZE):
    """(a new trimesh.Trimesh cut along its chart seams, its per-vertex uv (V, 2) in [0, 1]).

    Charts are `box_charts` (orthographic projections); xatlas packs them into one square-ish
    atlas with room for bilinear filtering between charts. (xatlas's own chart search took 12
    minutes on a 200k-face head on two cores, most charts ending in its slow piecewise fallback;
    this takes seconds.) Faces keep their order and winding, so outward normals stay outward (xatlas
    may mirror a chart in uv while packing, which a colour texture does not mind); seam vertices
    are duplicated, one copy per chart. The mesh carries `TextureVisuals(uv=uv)` and the
    input's metadata; `metadata["unwrap"]` holds the chart count and seconds."""
    import trimesh
    import xatlas

    if len(mesh.faces) == 0:
        raise Dp360Error("The mesh has no faces, so there is nothing to texture; extract the mesh again.")
    start = time.perf_counter()
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    chart, direction = box_charts(mesh)
    # one vertex per (chart, input vertex): a vertex on a seam gets a uv in each chart
    corner_keys = chart[:, None] * len(vertices) + faces
    keys, split_faces = np.unique(corner_keys.reshape(-1), return_inverse=True)
    split_faces = split_faces.reshape(-1, 3)
    split_vertices = vertices[keys % len(vertices)]
    vertex_direction = np.zeros(len(keys), dtype=np.int64)
    vertex_direction[split_faces.reshape(-1)] = np.repeat(direction, 3)
    # plane axes (u, v) with u x v = the direction, so projected triangles keep their winding
    axis = BOX_AXES[vertex_direction]
    helper = np.where(np.abs(axis[:, 1:2]) > 0.5, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    u_axis = np.cross(axis, helper)
    v_axis = np.cross(axis, u_axis)
    projected = np.stack(
        [np.einsum("vd,vd->v", split_vertices, u_axis), np.einsum("vd,vd->v", split_vertices, v_axis)], 1
    )
    corners = projected[split_faces]
    edges = corners[:, 1:] - corners[:, :1]
    chart_area = 0.5 * np.abs(edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]).sum()

    atlas = xatlas.Atlas()
    atlas.add_mesh(
        np.ascontiguousarray(split_vertices, dtype=np.float32),
        np.ascontiguousarray(split_faces, dtype=np.uint32),
        uvs=np.ascontiguousarray(projected - projected.min(axis=0), dtype=np.float32),
    )
    options = xatlas.ChartOptions()
    options.use_input_mesh_uvs = True  # xatlas only packs our charts
    pack = xatlas.PackOptions()
    pack.padding = ATLAS_PADDING
    pack.bilinear = True
    # the scale that fills about PACKED_FRACTION of a texture_size^2 atlas
    pack.texels_per_unit = float(texture_size * math.sqrt(PACKED_FRACTION / max(chart_area, 1e-12)))
    atlas.generate(chart_options=options, pack_options=pack)
    if atlas.atlas_count != 1:
        raise Dp360Error(f"The mesh's charts did not fit one texture atlas ({atlas.atlas_count}); this is a bug.")
    vertex_map, packed_faces, uv = atlas.get_mesh(0)
    vertex_map = vertex_map.astype(np.int64)
    uv = np.asarray(uv, dtype=np.float64)
    unwrapped = trimesh.Trimesh(
        split_vertices[vertex_map],
        packed_faces.astype(np.int64),
        visual=trimesh.visual.TextureVisuals(uv=uv),
        process=False,
        metadata=dict(mesh.metadata),
    )
    unwrapped.metadata["unwrap"] = {
        "charts": int(atlas.chart_count),
        "atlas_utilization": round(
            float(atlas.utilization[0]) if np.ndim(atlas.utilization) else float(atlas.utilization), 4
        ),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return unwrapped, uv


def _size_classes(limit: int) -> np.ndarray:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to `limit`: bounding-box sizes rounded up to one of these
    waste at most half of the candidates, and few classes mean few vectorised batches."""
    classes, power = [1, 2, 3], 2
    while classes[-1] < limit:
        classes += [2 * power, 3 * power]
        power *= 2
    return np.array(classes, dtype=np.int64)


def _texel_space(uv: np.ndarray, size: int) -> np.ndarray:
    """uv (..., 2) to texture-image coordinates (x along the columns, y down the rows, in texels;
    texel (r, c) spans [c, c + 1] x [r, r + 1]): v = 0 is the bottom row."""
    return np.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], axis=-1)


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a `size`^2 texture, and where.

    Returns face_index (size, size) int32 (-1 where no triangle covers the texel's centre) and
    barycentric (size, size, 3) float32 coordinates of the centre in that triangle (zeros where
    empty). Triangles are batched by bounding-box size so every batch is one numpy computation."""
    uv = np.asarray(uv, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    face_index = np.full((size, size), -1, dtype=np.int32)
    barycentric = np.zeros((size, size, 3), dtype=np.float32)
    if len(faces) == 0:
        return face_index, barycentric
    corners = _texel_space(uv[faces], size)  # (F, 3, 2)
    first, edge1, edge2 = corners[:, 0], corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    double_area = edge1[:, 0] * edge2[:, 1] - edge1[:, 1] * edge2[:, 0]
    # texel centres sit at integer + 0.5: the first and last centre inside each bounding box
    low = np.clip(np.ceil(corners.min(axis=1) - 0.5), 0, size - 1).astype(np.int64)
    high = np.clip(np.floor(corners.max(axis=1) - 0.5), -1, size - 1).astype(np.int64)
    extent = high - low + 1
    usable = np.all(extent > 0, axis=1) & (np.abs(double_area) > 1e-12)
    classes = _size_classes(size)
    width_class = classes[np.searchsorted(classes, np.maximum(extent[:, 0], 1))]
    height_class = classes[np.searchsorted(classes, np.maximum(extent[:, 1], 1))]
    keys = np.where(usable, width_class * (classes[-1] + 1) + height_class, -1)
    order = np.argsort(keys, kind="stable")
    boundaries = np.flatnonzero(np.diff(keys[order])) + 1
    for group in np.split(order, boundaries):
        if keys[group[0]] < 0:
            continue
        box_width, box_height = int(width_class[group[0]]), int(height_class[group[0]])
        offset_y, offset_x = np.divmod(np.arange(box_width * box_height), box_width)
        per_chunk = max(1, RASTER_CHUNK // (box_width * box_height))
        for start in range(0, len(group), per_chunk):
            triangles = group[start : start + per_chunk, None]
            columns = low[triangles, 0] + offset_x  # (T, candidates)
            rows = low[triangles, 1] + offset_y
            dx = columns + 0.5 - first[triangles, 0]
            dy = rows + 0.5 - first[triangles, 1]
            weight1 = (dx * edge2[triangles, 1] - dy * edge2[triangles, 0]) / double_area[triangles]
            weight2 = (edge1[triangles, 0] * dy - edge1[triangles, 1] * dx) / double_area[triangles]
            weight0 = 1.0 - weight1 - weight2
            # a centre exactly on an edge shared by two triangles goes to one of them, not neither
            tolerance = -1e-9
            inside = (weight0 >= tolerance) & (weight1 >= tolerance) & (weight2 >= tolerance)
            inside &= (columns <= high[triangles, 0]) & (rows <= high[triangles, 1])
            hit_rows, hit_columns = rows[inside], columns[inside]
            weights = np.clip(np.stack([weight0[inside], weight1[inside], weight2[inside]], axis=-1), 0.0, 1.0)
            face_index[hit_rows, hit_columns] = np.broadcast_to(triangles, inside.shape)[inside]
            barycentric[hit_rows, hit_columns] = weights / weights.sum(axis=-1, keepdims=True)
    return face_index, barycentric


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (H, W, C) or (H, W) image at continuous pixel coordinates where pixel
    (r, c) has its centre at (x, y) = (c, r); outside the image the edge pixels are repeated."""
    height, width = image.shape[:2]
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, width - 1.0)
    y = np.clip(np.asarray(y, dtype=np.float32), 0.0, height - 1.0)
    left = np.clip(x.astype(np.int64), 0, max(width - 2, 0))  # x >= 0, so truncation is floor
    top = np.clip(y.astype(np.int64), 0, max(height - 2, 0))
    step_right, step_down = min(1, width - 1), (width if height > 1 else 0)
    fx, fy = x - left, y - top
    flat = image.reshape(height * width, -1)
    fx, fy = fx[:, None], fy[:, None]
    first = top * width + left
    upper = np.take(flat, first, axis=0) * (1 - fx) + np.take(flat, first + step_right, axis=0) * fx
    lower = (
        np.take(flat, first + step_down, axis=0) * (1 - fx) + np.take(flat, first + step_down + step_right, axis=0) * fx
    )
    sampled = upper * (1 - fy) + lower * fy
    return sampled if image.ndim == 3 else sampled[:, 0]


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) of an (H, W, C) texture at uv (N, 2) (OpenGL's texel centres, edges clamped)."""
    height, width = texture.shape[:2]
    uv = np.asarray(uv, dtype=np.float64)
    return _bilinear(texture, uv[:, 0] * width - 0.5, (1.0 - uv[:, 1]) * height - 0.5)


def smooth_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals shared by all copies of a position, so the duplicated
    seam vertices of an unwrapped mesh get the normal of the whole surface around them."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    _, position_of = np.unique(vertices, axis=0, return_inverse=True)
    position_of = position_of.reshape(-1)
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # length = 2 * area
    sums = np.zeros((position_of.max() + 1, 3))
    for corner in range(3):
        np.add.at(sums, position_of[faces[:, corner]], face_normals)
    normals = sums[position_of]
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# The views
# --------------------------------------------------------------------------------------------


def _read_views(views_dir: Path) -> list[tuple[cameras.ViewCamera, np.ndarray]]:
    """(camera, float32 RGB image in 0..1) of every frame of the views folder's transforms.json."""
    from PIL import Image

    advice = "generate views first (`dp360 views`), or point at a folder of images with nerfstudio cameras"
    transforms = read_json_object(Path(views_dir) / "transforms.json", advice)
    try:
        views = cameras.from_nerfstudio_transforms(transforms)
    except (KeyError, TypeError, ValueError):
        raise Dp360Error(
            f"'{Path(views_dir) / 'transforms.json'}' lacks a camera's pose or intrinsics; {advice}."
        ) from None
    loaded = []
    for view in views:
        path = Path(views_dir) / view.file_path
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as error:
            raise Dp360Error(f"The view '{path}' cannot be read ({error.strerror or error}); {advice}.") from None
        if pixels.shape[0] != pixels.shape[1]:
            raise Dp360Error(
                f"The view '{path}' is {pixels.shape[1]}x{pixels.shape[0]} pixels; texture baking needs square views like dp360's."
            )
        loaded.append((view, pixels))
    if not loaded:
        raise Dp360Error(f"'{Path(views_dir) / 'transforms.json'}' lists no frames; {advice}.")
    return loaded


def _ray_cast(mesh, cam2world: np.ndarray, intrinsics: np.ndarray, size: int):
    """First hits of the rays through the pixel centres of a `size`^2 view of `mesh`:
    (pixel index, triangle index, hit location, ray origins, ray directions)."""
    import torch

    origins, directions = cameras.pixel_rays(
        torch.tensor(np.asarray(cam2world), dtype=torch.float64)[None],
        torch.tensor(np.asarray(intrinsics), dtype=torch.float64)[None],
        size,
    )
    origins, directions = origins[0].numpy(), directions[0].numpy()
    triangles, pixels, locations = mesh.ray.intersects_id(
        origins, directions, multiple_hits=False, return_locations=True
    )
    return pixels, triangles, locations, origins, directions


def _depth_map(mesh, cam2world: np.ndarray, intrinsics: np.ndarray, size: int) -> np.ndarray:
    """(size, size) distance from the camera centre to the first surface along each pixel's ray (inf: no hit)."""
    pixels, _, locations, origins, _ = _ray_cast(mesh, cam2world, intrinsics, size)
    depth = np.full(size * size, np.inf)
    depth[pixels] = np.linalg.norm(locations - origins[pixels], axis=1)
    return depth.reshape(size, size)


def _edge_distance(depth: np.ndarray, jump: np.ndarray) -> np.ndarray:
    """Pixels from each pixel to the nearest background pixel or depth jump larger than `jump`."""
    from scipy.ndimage import distance_transform_edt

    hit = np.isfinite(depth)
    smooth = hit.copy()
    finite = np.where(hit, depth, 0.0)
    for axis in (0, 1):
        step = np.abs(np.diff(finite, axis=axis)) > np.minimum(
            np.delete(jump, -1, axis=axis), np.delete(jump, 0, axis=axis)
        )
        step |= np.diff(hit.astype(np.int8), axis=axis) != 0
        if axis == 0:
            smooth[:-1] &= ~step
            smooth[1:] &= ~step
        else:
            smooth[:, :-1] &= ~step
            smooth[:, 1:] &= ~step
    return distance_transform_edt(smooth)


# --------------------------------------------------------------------------------------------
# Baking
# --------------------------------------------------------------------------------------------


def _texel_surface(mesh, face_index: np.ndarray, barycentric: np.ndarray):
    """(rows, columns, positions (N, 3), unit normals (N, 3)) of the covered texels."""
    rows, columns = np.nonzero(face_index >= 0)
    corners = np.asarray(mesh.faces, dtype=np.int64)[face_index[rows, columns]]
    weights = barycentric[rows, columns]
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    vertex_normals = smooth_vertex_normals(mesh.vertices, mesh.faces).astype(np.float32)
    positions = np.zeros((len(rows), 3), dtype=np.float32)
    normals = np.zeros((len(rows), 3), dtype=np.float32)
    for corner in range(3):
        positions += weights[:, corner, None] * vertices[corners[:, corner]]
        normals += weights[:, corner, None] * vertex_normals[corners[:, corner]]
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return rows, columns, positions, normals


def _texel_world_size(mesh, covered_texels: int) -> float:
    """The side of one texel on the surface, on average (the surface area shared by the texels)."""
    return math.sqrt(float(mesh.area) / max(covered_texels, 1))


def _dilate(texture: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Fill every texel outside the charts with the colour of the nearest chart texel."""
    from scipy.ndimage import distance_transform_edt

    if covered.all() or not covered.any():
        return texture
    rows, columns = distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return texture[rows, columns]


def bake_from_views(
    mesh_with_uv,
    uv: np.ndarray,
    views_dir: str | Path | None,
    size: int = DEFAULT_TEXTURE_SIZE,
    fallback_colour_fn: FallbackColourFn | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A (size, size, 3) uint8 texture for `mesh_with_uv` (world frame of the views' cameras, with
    per-vertex `uv`) from the views in `views_dir` (nerfstudio layout), and coverage statistics.

    `fallback_colour_fn(positions (N, 3), unit normals (N, 3)) -> (N, 3) colours in 0..1` colours
    the texels no view sees; without it they get the mean colour of the seen texels. Without
    `views_dir`, every texel gets the fallback colour (`--texture field`)."""
    start = time.perf_counter()
    views = _read_views(Path(views_dir)) if views_dir is not None else []
    face_index, barycentric = rasterize_uv(uv, mesh_with_uv.faces, size)
    rows, columns, positions, normals = _texel_surface(mesh_with_uv, face_index, barycentric)
    texel_size = _texel_world_size(mesh_with_uv, len(rows))
    colour_sum = np.zeros((len(rows), 3), dtype=np.float32)
    weight_sum = np.zeros(len(rows), dtype=np.float32)
    views_used = 0
    # per-view dot products come from these with one matrix-vector product each (no (N, 3) temporaries)
    squared_norm = np.einsum("nd,nd->n", positions, positions)
    normal_dot_position = np.einsum("nd,nd->n", normals, positions)
    for view, image in views:
        resolution = image.shape[0]
        cam2world = np.asarray(view.cam2world, dtype=np.float64)
        focal_pixels = float(view.intrinsics[0, 0]) * resolution
        centre = cam2world[:3, 3].astype(np.float32)
        distance = np.sqrt(np.maximum(squared_norm - 2.0 * (positions @ centre) + float(centre @ centre), 1e-12))
        cosine = (normals @ centre - normal_dot_position) / distance
        # OpenCV camera axes: the third column of cam2world is the viewing direction
        forward = cam2world[:3, 2].astype(np.float32)
        in_front = positions @ forward > float(centre @ forward) + 1e-6
        candidates = np.flatnonzero((cosine > MIN_VIEW_COSINE) & in_front)
        if len(candidates) == 0:
            continue
        pixel = cameras.project_points(positions[candidates], cam2world, view.intrinsics, resolution, resolution)
        inside = np.all((pixel >= 0) & (pixel < resolution), axis=1)
        candidates, pixel = candidates[inside], pixel[inside]
        depth = _depth_map(mesh_with_uv, cam2world, view.intrinsics, resolution)
        tolerance_map = DEPTH_TOLERANCE_FRACTION * depth + DEPTH_TOLERANCE_PIXELS * depth / focal_pixels
        edges = _edge_distance(depth, 2.0 * np.where(np.isfinite(tolerance_map), tolerance_map, 0.0) + texel_size)
        # bilinear depth: a far value where a neighbour misses the mesh, so silhouettes are not visible
        sampled_depth = _bilinear(np.where(np.isfinite(depth), depth, 1e6).astype(np.float32), *(pixel.T - 0.5))
        seen_distance = distance[candidates]
        tolerance = (
            DEPTH_TOLERANCE_FRACTION * seen_distance
            + DEPTH_TOLERANCE_PIXELS * seen_distance / focal_pixels
            + texel_size
        )
        visible = np.abs(sampled_depth - seen_distance) < tolerance
        candidates, pixel = candidates[visible], pixel[visible]
        if len(candidates) == 0:
            continue
        views_used += 1
        nearest = np.minimum(pixel.astype(np.int64), resolution - 1)
        ramp = max(1.0, SILHOUETTE_RAMP * resolution)
        edge_weight = np.clip((edges[nearest[:, 1], nearest[:, 0]] - 0.5) / ramp, SILHOUETTE_FLOOR, 1.0)
        weight = (cosine[candidates] ** VIEW_ANGLE_POWER * edge_weight).astype(np.float32)
        colour_sum[candidates] += weight[:, None] * _bilinear(image, *(pixel.T - 0.5))
        weight_sum[candidates] += weight
    seen = weight_sum > 1e-8
    colours = colour_sum / np.maximum(weight_sum, 1e-8)[:, None]
    unseen = np.flatnonzero(~seen)
    if len(unseen):
        if fallback_colour_fn is not None:
            fallback = np.asarray(fallback_colour_fn(positions[unseen], normals[unseen]), dtype=np.float32)
            if fallback.shape != (len(unseen), 3):
                raise Dp360Error(
                    f"The fallback colours have shape {fallback.shape}, not ({len(unseen)}, 3); this is a bug in the caller."
                )
            colours[unseen] = fallback
        else:
            colours[unseen] = colours[seen].mean(axis=0) if seen.any() else 0.5
    texture = np.zeros((size, size, 3), dtype=np.float32)
    texture[rows, columns] = np.clip(colours, 0.0, 1.0)
    texture = _dilate(texture, face_index >= 0)
    stats = {
        "size": int(size),
        "chart_fraction": round(len(rows) / float(size * size), 4),  # of the atlas
        "seen_fraction": round(float(seen.mean()) if len(rows) else 0.0, 4),  # of the chart texels
        "views": len(views),
        "views_used": views_used,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return (texture * 255.0).round().astype(np.uint8), stats


def textured_mesh(
    mesh,
    views_dir: str | Path | None,
    size: int = DEFAULT_TEXTURE_SIZE,
    fallback_colour_fn: FallbackColourFn | None = None,
):
    """`mesh` unwrapped and textured from the views (from `fallback_colour_fn` alone without
    `views_dir`): a trimesh.Trimesh with TextureVisuals (a PBR
    material whose baseColorTexture is the baked image) and `metadata["texture"]` statistics."""
    import trimesh
    from PIL import Image

    if not 16 <= size <= 16384:
        raise Dp360Error(f"The texture size must be between 16 and 16384 pixels, not {size}.")
    unwrapped, uv = unwrap(mesh, size)
    texture, stats = bake_from_views(unwrapped, uv, views_dir, size, fallback_colour_fn)
    stats["unwrap"] = unwrapped.metadata.pop("unwrap")
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0
    )
    result = trimesh.Trimesh(
        unwrapped.vertices,
        unwrapped.faces,
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
        metadata=dict(unwrapped.metadata),
    )
    result.metadata["texture"] = stats
    return result


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def texture_image(mesh):
    """The mesh's base-colour texture as a PIL image (PBR or OBJ-style material)."""
    material = getattr(getattr(mesh, "visual", None), "material", None)
    image = getattr(material, "baseColorTexture", None)
    if image is None:
        image = getattr(material, "image", None)
    if image is None or getattr(mesh.visual, "uv", None) is None:
        raise Dp360Error("The mesh has no UV texture; bake one first (`textured_mesh`).")
    return image


def _written_by_us(companion: Path, owner: Path, directive: str) -> bool:
    """Whether `owner` (the OBJ or MTL of an earlier export) names `companion` in its `directive`
    line: only then is an existing companion ours to replace."""
    try:
        with open(owner, "rb") as handle:
            head = handle.read(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return False
    return re.search(rf"^{directive}\s+{re.escape(companion.name)}\s*$", head, flags=re.MULTILINE) is not None


def _check_companion(path: Path, owner: Path, directive: str, overwrite: bool) -> None:
    """The MTL and PNG beside an OBJ may be replaced only when an earlier export of this OBJ wrote them."""
    if not path.exists() and not path.is_symlink():
        check_file_target(path, overwrite)
        return
    if path.is_dir() or path.is_symlink():
        raise Dp360Error(f"'{path}' is in the way of the mesh's texture files; choose another --out.")
    if not overwrite:
        raise Dp360Error(f"'{path}' already exists; pass --overwrite to replace it, or choose another --out.")
    if not _written_by_us(path, owner, directive):
        raise Dp360Error(f"'{path}' already exists and was not written with this mesh; choose another --out.")


def write_textured_obj(mesh, out_path: str | Path, overwrite: bool = False) -> list[Path]:
    """Write `head.obj`, `head.mtl` and `head.png` side by side (the OBJ names the MTL and the MTL
    the PNG by bare name), each atomically. Returns the three paths, OBJ first."""
    from trimesh.exchange.obj import export_obj

    out = Path(out_path)
    if out.suffix.lower() != ".obj":
        raise Dp360Error(f"A textured OBJ needs a file name ending in .obj, not '{out.name}'.")
    mtl_path, png_path = out.with_suffix(".mtl"), out.with_suffix(".png")
    image = texture_image(mesh)
    check_file_target(out, overwrite)
    _check_companion(mtl_path, out, "mtllib", overwrite)
    _check_companion(png_path, mtl_path, "map_Kd", overwrite)
    text, files = export_obj(
        mesh,
        include_normals=False,
        include_texture=True,
        return_texture=True,
        write_texture=False,
        mtl_name=mtl_path.name,
    )
    mtl = files.get(mtl_path.name, b"").decode("utf-8")
    if "map_Kd" not in mtl:
        raise Dp360Error("trimesh wrote no texture reference into the MTL file; this trimesh version is not supported.")
    # trimesh names the image after the material; ours sits beside the OBJ with the OBJ's name
    mtl = re.sub(r"^map_Kd\s+.*$", f"map_Kd {png_path.name}", mtl, flags=re.MULTILINE)
    with atomic_path(png_path) as temporary:
        image.convert("RGB").save(temporary, format="PNG")
    with atomic_path(mtl_path) as temporary:
        temporary.write_text(mtl)
    with atomic_path(out) as temporary:  # the OBJ last: once it is there, what it names is complete
        temporary.write_text(text)
    return [out, mtl_path, png_path]


# --------------------------------------------------------------------------------------------
# Rendering (quality checks): ray casting like `synthetic.render`
# --------------------------------------------------------------------------------------------


def _render_hits(mesh, cam2world_opencv: np.ndarray, size: int, intrinsics: np.ndarray | None):
    """(pixel index, triangle index, barycentric (N, 3)) of the first hit along each pixel's ray."""
    import trimesh

    intrinsics = cameras.normalized_intrinsics() if intrinsics is None else np.asarray(intrinsics)
    pixels, triangles, locations, _, _ = _ray_cast(mesh, cam2world_opencv, intrinsics, size)
    weights = np.clip(trimesh.triangles.points_to_barycentric(mesh.triangles[triangles], locations), 0.0, 1.0)
    return pixels, triangles, weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)


def render_textured(
    mesh,
    cam2world_opencv: np.ndarray,
    size: int,
    intrinsics: np.ndarray | None = None,
    background=BACKGROUND,
) -> np.ndarray:
    """(size, size, 3) float image in 0..1 of a UV-textured mesh seen by an OpenCV cam2world
    camera (normalised intrinsics, PanoHead's by default); bilinear texture filtering."""
    texture = np.asarray(texture_image(mesh).convert("RGB"), dtype=np.float32) / 255.0
    pixels, triangles, weights = _render_hits(mesh, cam2world_opencv, size, intrinsics)
    uv = np.asarray(mesh.visual.uv, dtype=np.float64)
    corners = np.asarray(mesh.faces)[triangles]
    hit_uv = sum(weights[:, corner, None] * uv[corners[:, corner]] for corner in range(3))
    image = np.tile(np.asarray(background, dtype=np.float64), (size * size, 1))
    image[pixels] = sample_texture(texture, hit_uv) if len(pixels) else 0.0
    return image.reshape(size, size, 3)


def render_vertex_coloured(
    mesh,
    cam2world_opencv: np.ndarray,
    size: int,
    intrinsics: np.ndarray | None = None,
    background=BACKGROUND,
) -> np.ndarray:
    """`render_textured` for a mesh with vertex colours (interpolated across each triangle)."""
    colours = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    pixels, triangles, weights = _render_hits(mesh, cam2world_opencv, size, intrinsics)
    corners = np.asarray(mesh.faces)[triangles]
    image = np.tile(np.asarray(background, dtype=np.float64), (size * size, 1))
    if len(pixels):
        image[pixels] = sum(weights[:, corner, None] * colours[corners[:, corner]] for corner in range(3))
    return image.reshape(size, size, 3)
