"""UV texture baking (dp360.nerf.texture) on the synthetic head: the rasterizer, the uv and camera
conventions (a mirrored or flipped bake must lose), occlusion, the fallback colour, dilation, and
the GLB / OBJ + MTL + PNG files. Tiny sizes: 64 px views, 256 px textures."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import trimesh
from PIL import Image

from dp360 import cameras
from dp360.errors import Dp360Error
from dp360.nerf import synthetic, texture

VIEW_SIZE = 64
TEXTURE_SIZE = 256


def _psnr(image: np.ndarray, truth: np.ndarray) -> float:
    return float(-10.0 * np.log10(np.mean((image - truth) ** 2)))


def _mean_psnr(render, mesh, truth_mesh, poses) -> float:
    return float(
        np.mean([_psnr(render(mesh, pose, VIEW_SIZE), synthetic.render(truth_mesh, pose, VIEW_SIZE)) for pose in poses])
    )


def _with_texture(mesh, image: np.ndarray):
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(image))
    return trimesh.Trimesh(
        mesh.vertices,
        mesh.faces,
        visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material),
        process=False,
    )


def _texel_normals_and_positions(unwrapped, uv):
    """(covered mask, positions (size, size, 3), unit normals (size, size, 3)) of a TEXTURE_SIZE atlas."""
    face_index, barycentric = texture.rasterize_uv(uv, unwrapped.faces, TEXTURE_SIZE)
    covered = face_index >= 0
    corners = unwrapped.faces[np.where(covered, face_index, 0)]  # (size, size, 3)
    positions = np.einsum("hwk,hwkd->hwd", barycentric, unwrapped.vertices[corners])
    normals = np.einsum(
        "hwk,hwkd->hwd", barycentric, texture.smooth_vertex_normals(unwrapped.vertices, unwrapped.faces)[corners]
    )
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return covered, positions, normals


@pytest.fixture(scope="module")
def head():
    return synthetic.head_mesh(subdivisions=4)


@pytest.fixture(scope="module")
def views(head, tmp_path_factory):
    return synthetic.write_views(tmp_path_factory.mktemp("texture") / "views", size=VIEW_SIZE, mesh=head)


@pytest.fixture(scope="module")
def textured(head, views):
    return texture.textured_mesh(head, views, size=TEXTURE_SIZE)


# -- unwrap and rasterizer ------------------------------------------------------------------------


def test_unwrap_keeps_faces_and_outward_normals(head):
    unwrapped, uv = texture.unwrap(head, TEXTURE_SIZE)
    assert len(unwrapped.faces) == len(head.faces)
    assert uv.shape == (len(unwrapped.vertices), 2) and uv.min() >= 0.0 and uv.max() <= 1.0
    np.testing.assert_allclose(unwrapped.triangles, head.triangles, atol=1e-6)  # same faces, same winding
    assert unwrapped.volume > 0
    outward = np.einsum("fd,fd->f", unwrapped.face_normals, unwrapped.triangles_center)
    assert (outward > 0).mean() > 0.95


def test_box_charts_are_connected_patches_facing_one_direction(head):
    chart, direction = texture.box_charts(head)
    assert chart.shape == direction.shape == (len(head.faces),)
    facing = np.einsum("fd,fd->f", head.face_normals, texture.BOX_AXES[direction])
    assert facing.min() >= texture.MIN_PROJECTION_COSINE  # projections keep every triangle's winding
    for index in np.unique(chart):
        assert len(np.unique(direction[chart == index])) == 1
    assert 6 <= len(np.unique(chart)) <= 30  # a head's six sides (ears and nose may add a few), no confetti


def test_rasterizer_assigns_texels_inside_their_triangles(head):
    unwrapped, uv = texture.unwrap(head, TEXTURE_SIZE)
    face_index, barycentric = texture.rasterize_uv(uv, unwrapped.faces, TEXTURE_SIZE)
    assert face_index.shape == (TEXTURE_SIZE, TEXTURE_SIZE) and face_index.dtype == np.int32
    assert barycentric.shape == (TEXTURE_SIZE, TEXTURE_SIZE, 3) and barycentric.dtype == np.float32
    rows, columns = np.nonzero(face_index >= 0)
    weights = barycentric[rows, columns].astype(np.float64)
    assert weights.min() >= 0.0
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    # the barycentric point is the texel's centre, with v = 0 at the bottom row of the image
    centres = np.stack([(columns + 0.5) / TEXTURE_SIZE, 1.0 - (rows + 0.5) / TEXTURE_SIZE], axis=1)
    corners = uv[unwrapped.faces[face_index[rows, columns]]]  # (N, 3, 2)
    np.testing.assert_allclose(np.einsum("nk,nkd->nd", weights, corners), centres, atol=1e-5)
    assert np.all(barycentric[face_index < 0] == 0)
    # coverage follows the charts' area in uv space
    triangles = uv[unwrapped.faces]
    edges = triangles[:, 1:] - triangles[:, :1]
    uv_area = 0.5 * np.abs(edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]).sum()
    assert abs(len(rows) / TEXTURE_SIZE**2 - uv_area) < 0.05 * uv_area


def test_rasterizer_orientation_and_shared_edges():
    # two triangles (one of each winding) tiling the unit square: every texel once, no crack on the diagonal
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    face_index, _ = texture.rasterize_uv(uv, np.array([[0, 1, 2], [0, 3, 2]]), 16)
    assert np.all(face_index >= 0)
    # the triangle at small v is at the bottom of the image (trimesh's and OBJ's convention)
    assert face_index[15, 15] == 0 and face_index[0, 0] == 1
    # a small triangle near uv (0.1, 0.1) covers texels in the bottom-left corner only
    face_index, _ = texture.rasterize_uv(np.array([[0.05, 0.05], [0.2, 0.05], [0.05, 0.2]]), np.array([[0, 1, 2]]), 20)
    rows, columns = np.nonzero(face_index == 0)
    assert len(rows) > 0 and rows.min() >= 15 and columns.max() <= 4


def test_texture_sampling_matches_trimesh_uv_convention():
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ours = texture.sample_texture(image.astype(np.float32), corners)
    theirs = trimesh.visual.color.uv_to_color(corners, Image.fromarray(image))[:, :3]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# -- baking ---------------------------------------------------------------------------------------


def test_baked_texture_reproduces_held_out_views(head, views, textured, tmp_path):
    stats = textured.metadata["texture"]
    assert stats["views"] == 32 and stats["views_used"] == 32 and stats["seen_fraction"] > 0.9
    assert stats["seconds"] > 0 and 0.3 < stats["chart_fraction"] < 0.95
    poses = synthetic.held_out_poses(32, 8, 15.0)
    baked = _mean_psnr(texture.render_textured, textured, head, poses)
    # a constant texture (the baked texture's mean colour): shape right, colours wrong
    texels = np.asarray(textured.visual.material.baseColorTexture)
    flat = np.broadcast_to(texels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), texels.shape).copy()
    constant = _mean_psnr(texture.render_textured, _with_texture(textured, flat), head, poses)
    # the texture flipped in v (a wrong row convention)
    flipped = _mean_psnr(texture.render_textured, _with_texture(textured, texels[::-1].copy()), head, poses)
    # views mirrored left-right (a wrong camera convention)
    mirrored_views = tmp_path / "mirrored"
    shutil.copytree(views, mirrored_views)
    for frame in json.loads((views / "transforms.json").read_text())["frames"]:
        path = mirrored_views / frame["file_path"]
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    mirrored = _mean_psnr(
        texture.render_textured, texture.textured_mesh(head, mirrored_views, TEXTURE_SIZE), head, poses
    )
    assert baked > constant + 4.0, (baked, constant)
    assert baked > flipped + 3.0, (baked, flipped)
    assert baked > mirrored + 1.5, (baked, mirrored)


def test_vertex_coloured_render_interpolates_vertex_colours(head):
    # one colour everywhere: the render is that colour on the head and the background elsewhere
    uniform = head.copy()
    uniform.visual = trimesh.visual.ColorVisuals(
        uniform, vertex_colors=np.tile([[255, 0, 0, 255]], (len(head.vertices), 1))
    )
    pose = cameras.orbit_pose(30.0)
    image = texture.render_vertex_coloured(uniform, pose, 32, background=(0.0, 0.0, 1.0))
    red = np.all(np.isclose(image, [1.0, 0.0, 0.0], atol=1e-6), axis=-1)
    assert np.all(red | np.all(image == [0.0, 0.0, 1.0], axis=-1))
    on_head = synthetic.render_mask(head, pose, 32)
    assert (red == on_head).mean() > 0.99  # (ray casters may disagree on a grazing ray or two)


def test_hidden_texels_do_not_take_a_views_colour(tmp_path):
    # a ball hovering in front of a bigger one: seen from the front camera, it hides a disc of the
    # big ball that faces that camera squarely
    big = trimesh.creation.icosphere(subdivisions=4, radius=0.25)
    small = trimesh.creation.icosphere(subdivisions=3, radius=0.07)
    small.apply_translation([0.0, 0.0, 0.42])
    scene = trimesh.util.concatenate([big, small])
    scene.visual.face_colors = np.tile([120, 160, 200, 255], (len(scene.faces), 1))
    clean = synthetic.write_views(tmp_path / "clean", size=VIEW_SIZE, mesh=scene)
    painted = tmp_path / "painted"
    shutil.copytree(clean, painted)
    front_camera = cameras.dp360_orbit(32)[0]
    Image.fromarray(np.tile(np.array([255, 0, 255], np.uint8), (VIEW_SIZE, VIEW_SIZE, 1))).save(painted / "000.png")

    def grey(positions: np.ndarray, normals: np.ndarray) -> np.ndarray:  # the same in both bakes
        return np.full((len(positions), 3), 0.5)

    unwrapped, uv = texture.unwrap(scene, TEXTURE_SIZE)
    before, _ = texture.bake_from_views(unwrapped, uv, clean, TEXTURE_SIZE, fallback_colour_fn=grey)
    after, _ = texture.bake_from_views(unwrapped, uv, painted, TEXTURE_SIZE, fallback_colour_fn=grey)
    change = np.abs(after.astype(int) - before.astype(int)).sum(-1)

    covered, positions, normals = _texel_normals_and_positions(unwrapped, uv)
    camera = front_camera[:3, 3]
    to_camera = camera - positions
    facing = np.einsum("hwd,hwd->hw", normals, to_camera / np.linalg.norm(to_camera, axis=-1, keepdims=True))
    # how close the segment texel -> camera passes to the small ball's centre
    along = np.clip(np.einsum("hwd,hwd->hw", [0.0, 0.0, 0.42] - positions, to_camera) / (to_camera**2).sum(-1), 0, 1)
    miss = np.linalg.norm(positions + along[..., None] * to_camera - [0.0, 0.0, 0.42], axis=-1)
    on_big = np.linalg.norm(positions, axis=-1) < 0.26
    hidden = covered & on_big & (facing > 0.8) & (miss < 0.05)
    seen = covered & on_big & (facing > 0.8) & (miss > 0.12)
    assert hidden.sum() > 50 and seen.sum() > 50
    assert change[hidden].max() == 0  # the front view contributed nothing there
    assert change[seen].min() > 15  # ... but does where it sees the surface


def test_fallback_colours_texels_no_view_sees(head, views, tmp_path):
    front_only = tmp_path / "front"
    front_only.mkdir()
    transforms = json.loads((views / "transforms.json").read_text())
    transforms["frames"] = [
        frame for frame in transforms["frames"] if frame["file_path"] in ("000.png", "001.png", "031.png")
    ]
    for frame in transforms["frames"]:
        shutil.copy(views / frame["file_path"], front_only / frame["file_path"])
    (front_only / "transforms.json").write_text(json.dumps(transforms))
    asked = []

    def green(positions: np.ndarray, normals: np.ndarray) -> np.ndarray:
        asked.append((positions, normals))
        return np.tile([0.0, 1.0, 0.0], (len(positions), 1))

    unwrapped, uv = texture.unwrap(head, TEXTURE_SIZE)
    baked, stats = texture.bake_from_views(unwrapped, uv, front_only, TEXTURE_SIZE, fallback_colour_fn=green)
    assert stats["views"] == 3 and stats["seen_fraction"] < 0.6
    ((positions, normals),) = asked
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
    assert np.median(positions[:, 2]) < 0  # mostly the back of the head

    covered, positions, normals = _texel_normals_and_positions(unwrapped, uv)
    is_green = np.all(baked == [0, 255, 0], axis=-1)
    back, front = covered & (normals[..., 2] < -0.3), covered & (normals[..., 2] > 0.8)
    assert is_green[back].all()
    assert not is_green[front].any()


def test_atlas_is_dilated_past_chart_borders(head, textured):
    from scipy.ndimage import binary_dilation

    face_index, _ = texture.rasterize_uv(textured.visual.uv, textured.faces, TEXTURE_SIZE)
    covered = face_index >= 0
    border = binary_dilation(covered, iterations=2) & ~covered
    assert border.sum() > 100
    texels = np.asarray(textured.visual.material.baseColorTexture).astype(int)
    assert texels[~covered].sum(-1).min() > 0  # nothing black anywhere outside the charts
    # a border texel copies a chart texel within two texels of it
    padded = np.pad(texels, ((2, 2), (2, 2), (0, 0)))
    padded_covered = np.pad(covered, 2)
    for row, column in zip(*np.nonzero(border)):
        window = padded[row : row + 5, column : column + 5][padded_covered[row : row + 5, column : column + 5]]
        assert np.abs(window - texels[row, column]).sum(-1).min() == 0


# -- files ----------------------------------------------------------------------------------------


def test_glb_round_trip_keeps_texture_and_uv(head, textured):
    data = textured.export(file_type="glb")
    loaded = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    assert loaded.visual.uv is not None and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    assert texture.texture_image(loaded).size == (TEXTURE_SIZE, TEXTURE_SIZE)
    pose = synthetic.held_out_poses(32, 8, 15.0)[1]
    assert (
        _psnr(texture.render_textured(loaded, pose, VIEW_SIZE), texture.render_textured(textured, pose, VIEW_SIZE)) > 40
    )


def test_textured_obj_is_three_files_and_refuses_a_users_file(textured, tmp_path):
    out = tmp_path / "export" / "head.obj"
    written = texture.write_textured_obj(textured, out)
    assert written == [out, out.with_suffix(".mtl"), out.with_suffix(".png")]
    assert all(path.is_file() for path in written)
    assert "mtllib head.mtl" in out.read_text().splitlines()
    assert "map_Kd head.png" in out.with_suffix(".mtl").read_text().splitlines()
    assert sorted(path.name for path in out.parent.iterdir()) == ["head.mtl", "head.obj", "head.png"]  # no temporaries
    loaded = trimesh.load(out, force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    pose = synthetic.held_out_poses(32, 8, 15.0)[2]
    assert (
        _psnr(texture.render_textured(loaded, pose, VIEW_SIZE), texture.render_textured(textured, pose, VIEW_SIZE)) > 40
    )

    with pytest.raises(Dp360Error, match="--overwrite"):
        texture.write_textured_obj(textured, out)
    assert texture.write_textured_obj(textured, out, overwrite=True) == written  # our own files

    # a user's picture where the texture would go is never replaced, even with overwrite
    elsewhere = tmp_path / "photos" / "head.obj"
    elsewhere.parent.mkdir()
    photo = elsewhere.with_suffix(".png")
    photo.write_bytes(b"a user's photo")
    for overwrite in (False, True):
        with pytest.raises(Dp360Error, match="head.png"):
            texture.write_textured_obj(textured, elsewhere, overwrite=overwrite)
    assert photo.read_bytes() == b"a user's photo" and not elsewhere.exists()
    with pytest.raises(Dp360Error, match=".obj"):
        texture.write_textured_obj(textured, tmp_path / "head.glb")


def test_views_without_cameras_are_explained(head, tmp_path):
    unwrapped, uv = texture.unwrap(head, 64)
    with pytest.raises(Dp360Error, match="transforms.json"):
        texture.bake_from_views(unwrapped, uv, tmp_path, 64)
