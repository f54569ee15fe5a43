"""Radiance-field stage (nerfstudio, CPU, tiny sizes): camera convention, turntable, mesh, and
`dp360 reconstruct` end to end on the tiny bundles."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from dp360 import cameras
from dp360.nerf import synthetic
from dp360.nerf.fit import load_field
from dp360.nerf.mesh import MeshSettings, extract_mesh, write_mesh
from dp360.nerf.render import TurntableSettings, render_pose, render_turntable, write_frames
from dp360.video import read_mp4

from ..conftest import tiny_reconstruct_settings

SIZE = 48


def _structure_correlation(rendered, image):
    """Correlation of the colour layout on the head (blurred: the synthetic texture is finer
    than a 48-pixel view resolves), over pixels where both show the head."""
    from scipy.ndimage import gaussian_filter

    mask = (np.abs(image - synthetic.BACKGROUND).sum(-1) > 0.05) & (
        np.abs(rendered - synthetic.BACKGROUND).sum(-1) > 0.05
    )
    a, b = gaussian_filter(rendered, (2, 2, 0))[mask], gaussian_filter(image, (2, 2, 0))[mask]
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_field_follows_nerfstudio_camera_convention(fitted):
    views, nerf, summary = fitted
    assert summary["loss_first_last"][1] < summary["loss_first_last"][0] / 2
    assert summary["background"] == pytest.approx([0.8, 0.8, 0.8], abs=0.01)  # from the views' borders
    field = load_field(nerf, "cpu", views)
    for index in (0, 8, 28):  # front and sides, where the head is not left-right symmetric
        truth = np.asarray(Image.open(views / f"{index:03d}.png"), dtype=np.float64) / 255
        rendered = render_pose(field, cameras.dp360_orbit(32)[index], SIZE)
        right = _structure_correlation(rendered, truth)
        assert right > 0.6
        assert right > _structure_correlation(rendered, truth[:, ::-1]) + 0.2  # mirrored
        assert right > _structure_correlation(rendered, truth[::-1]) + 0.2  # upside down


def test_turntable_formats_decode(fitted, tmp_path):
    views, nerf, _ = fitted
    field = load_field(nerf, "cpu", views)
    settings = TurntableSettings(frames=5, resolution=32, fps=10)
    frames, fps = render_turntable(field, settings)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3) and fps > 0
    meta, decoded = read_mp4(write_frames(frames, tmp_path / "t.mp4", "mp4", 10))
    assert len(decoded) == 5 and tuple(meta["size"]) == (32, 32)
    gif = Image.open(write_frames(frames, tmp_path / "t.gif", "gif", 10))
    assert gif.n_frames == 5 and gif.size == (32, 32)
    assert len(list(write_frames(frames, tmp_path / "frames", "frames", 10).glob("*.png"))) == 5
    # a full turn: the first and the middle frame show different sides
    assert np.abs(frames[0].astype(int) - frames[2].astype(int)).mean() > 2


def test_mesh_is_one_head_inside_the_box_in_the_camera_frame(fitted, tmp_path):
    views, nerf, _ = fitted
    field = load_field(nerf, "cpu", views)
    mesh = extract_mesh(field, MeshSettings(resolution=48, faces=3000))
    assert len(mesh.faces) <= 3000 and len(mesh.split(only_watertight=False)) == 1
    # on the true surface, not in a haze around it (the fixture's short fit: 250 steps of 48 px views)
    truth = synthetic.head_mesh(subdivisions=5)
    _, distance, _ = trimesh.proximity.closest_point(truth, mesh.sample(2000, seed=0))
    assert distance.mean() < 0.01 and mesh.metadata["surface_from"] == "views"
    for fmt in ("glb", "obj", "ply"):
        (written,) = write_mesh(mesh, tmp_path / f"head.{fmt}", fmt)
        loaded = trimesh.load(written, force="mesh")
        assert len(loaded.vertices) > 100
        assert np.all(np.abs(loaded.vertices) <= 0.5 + 1e-4)
    # the synthetic head's extent (half-axes 0.22 x 0.27 x 0.24 plus nose and ears), roughly
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert 0.3 < extent[1] < 0.75 and extent[1] > extent[0] * 0.8
    assert mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)


def test_render_and_export_keys_follow_the_checkpoint(fitted, tmp_path):
    """The turntable and mesh stages hash the files `load_field` reads, so a changed field
    redoes them even when the fit's settings are unchanged."""
    import shutil

    from dp360.nerf.stage import field_hashes

    views, nerf, _ = fitted
    run_dir = tmp_path / "run"
    shutil.copytree(views, run_dir / "views")
    shutil.copytree(nerf, run_dir / "nerf")
    before = field_hashes(run_dir)
    assert {"nerf/fit.json", "views/transforms.json"} <= set(before)
    assert any(name.endswith(".ckpt") for name in before)
    (checkpoint,) = (run_dir / "nerf").rglob("step-*.ckpt")
    fit_record = json.loads((run_dir / "nerf" / "fit.json").read_text())
    (run_dir / "nerf" / "fit.json").write_text(json.dumps({**fit_record, "fit_seconds": 1e6}))
    assert field_hashes(run_dir) == before  # timings do not shape the field
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    after = field_hashes(run_dir)
    assert after != before and {k for k in after if after[k] != before[k]} == {
        checkpoint.relative_to(run_dir).as_posix()
    }


def test_bad_turntable_and_mesh_settings_are_refused():
    from dp360.errors import Dp360Error

    with pytest.raises(Dp360Error, match="--resolution"):
        TurntableSettings(resolution=33).check()
    with pytest.raises(Dp360Error, match="--mesh-faces"):
        MeshSettings(faces=3).check()


# -- the whole command on the tiny bundles ------------------------------------------------------


@pytest.fixture(scope="module")
def run_weights(tiny_weights):
    """(--weights-dir, --cameras, perceptual backbone) of the tiny weights at 32 views."""
    weights = tiny_weights(32)
    return weights.weights_dir, weights.cameras, weights.backbone


def _reconstruct(cli, out, image, run_weights, *extra):
    weights, camera_dir, vgg = run_weights
    perceptual = Path(os.environ["DP360_CACHE"]) / "perceptual"
    perceptual.mkdir(parents=True, exist_ok=True)
    if not (perceptual / vgg.name).exists():
        (perceptual / vgg.name).symlink_to(vgg)
    return cli(
        "reconstruct",
        image,
        "--out",
        out,
        "--weights-dir",
        weights,
        "--cameras",
        camera_dir,
        *tiny_reconstruct_settings(30, *extra),
    )


def test_reconstruct_runs_every_stage_and_resumes(cli, tmp_path, astronaut_path, run_weights):
    out = tmp_path / "head"
    code, stdout, stderr = _reconstruct(cli, out, astronaut_path, run_weights)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "done"
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == dict.fromkeys(
        ("prepare", "noise", "views", "fit", "render", "export", "consistency", "report"), "done"
    )
    for rel in (
        "input.png",
        "prepared/crop.png",
        "prepared/overlay.png",
        "prepared/dataset.json",
        "noise/frames/000.png",
        "noise/w.pt",
        "noise/depth.npz",
        "views/back_ref.png",
        "views/000.png",
        "views/031.png",
        "views/grid.png",
        "views/orbit.mp4",
        "views/transforms.json",
        "nerf/fit.json",
        "nerf/dp360/dp360-head/fit/config.yml",
        "export/turntable.mp4",
        "export/head.glb",
        "run.json",
    ):
        assert (out / rel).is_file(), rel
    assert list((out / "nerf" / "dp360" / "dp360-head" / "fit" / "nerfstudio_models").glob("step-*.ckpt"))
    import yaml

    config_text = (out / "nerf" / "dp360" / "dp360-head" / "fit" / "config.yml").read_text()
    assert (
        Path(yaml.load(config_text, Loader=yaml.Loader).output_dir) == out / "nerf"
    )  # our own file: the full loader is fine
    meta, frames = read_mp4(out / "export" / "turntable.mp4")
    assert len(frames) == 4 and tuple(meta["size"]) == (32, 32)
    assert np.all(np.abs(trimesh.load(out / "export" / "head.glb", force="mesh").vertices) <= 0.5 + 1e-4)
    # the inversion's head, as a splat field would start from it: the orbit's cameras, points inside the head
    # box coloured by the noise frames (the random tiny generator renders a faint fog, hence the low threshold)
    from dp360.nerf.splat import depth_seed_points

    with np.load(out / "noise" / "depth.npz") as depth:
        assert np.allclose(depth["labels"], cameras.orbit_labels(32)) and depth["depth"].shape[0] == 32
    seeds = depth_seed_points(out / "noise" / "depth.npz", 500, seed=0, opacity_threshold=0.1)
    assert len(seeds.points) > 50 and np.all(np.abs(seeds.points) <= 0.5)
    assert len(np.unique(seeds.colours, axis=0)) > 10

    code, stdout, _ = _reconstruct(cli, out, astronaut_path, run_weights)
    assert code == 0 and all(stage["last_run"] == "reused" for stage in json.loads(stdout)["stages"].values())
    # Only the turntable changes with its own settings; the mesh is kept.
    code, stdout, _ = _reconstruct(cli, out, astronaut_path, run_weights, "--frames", "6")
    runs = {name: stage["last_run"] for name, stage in json.loads(stdout)["stages"].items()}
    assert runs["render"] == "ran" and runs["export"] == "reused" and runs["fit"] == "reused"
    assert (out / "export" / "head.glb").is_file() and len(read_mp4(out / "export" / "turntable.mp4")[1]) == 6

    # A deleted checkpoint is refitted; a seeded fit on a CPU reproduces it bit for bit, so the
    # turntable and the mesh, whose keys hash the checkpoint, still match it and are kept.
    checkpoints = out / "nerf" / "dp360" / "dp360-head" / "fit" / "nerfstudio_models"
    (checkpoint,) = checkpoints.glob("step-*.ckpt")
    original = checkpoint.read_bytes()
    checkpoint.unlink()
    code, stdout, stderr = _reconstruct(cli, out, astronaut_path, run_weights, "--frames", "6")
    assert code == 0, stderr
    runs = {name: stage["last_run"] for name, stage in json.loads(stdout)["stages"].items()}
    assert runs["fit"] == "ran" and runs["views"] == "reused"
    assert checkpoint.read_bytes() == original
    assert runs["render"] == "reused" and runs["export"] == "reused"

    # render and export commands on the finished run
    code, _, stderr = cli(
        "render", out, "--out", tmp_path / "spin", "--frames", "3", "--resolution", "32", "--device", "cpu", "--quiet"
    )
    assert code == 0, stderr
    assert len(list((tmp_path / "spin").glob("*.png"))) == 3
    # (GIF encoders merge identical consecutive frames, which a tiny random field can render.)
    code, _, stderr = cli(
        "render",
        out,
        "--out",
        tmp_path / "spin.gif",
        "--frames",
        "3",
        "--resolution",
        "32",
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0 and Image.open(tmp_path / "spin.gif").size == (32, 32), stderr
    code, _, stderr = cli(
        "export",
        out,
        "--format",
        "ply",
        "--mesh-resolution",
        "32",
        "--mesh-faces",
        "1000",
        "--texture-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0 and len(trimesh.load(out / "export" / "head.ply").faces) <= 1000, stderr


def test_render_and_export_explain_bad_input(cli, tmp_path):
    code, _, stderr = cli("render", tmp_path, "--out", tmp_path / "t.mp4", "--device", "cpu")
    assert (
        code == 2
        and stderr.startswith("error: ")
        and "dp360 reconstruct" in stderr
        and not (tmp_path / "t.mp4").exists()
    )
    code, _, stderr = cli("render", tmp_path, "--out", tmp_path / "t.avi", "--device", "cpu")
    assert code == 2 and "format" in stderr
    code, _, stderr = cli("export", tmp_path, "--format", "stl", "--device", "cpu")
    assert code == 2 and "stl" in stderr and all(f"'{name}'" in stderr for name in ("glb", "obj", "ply"))


def test_mesh_colours_are_the_heads_surface_colours(fitted):
    """Vertex colours match the known scene's colour at the nearest surface point: the broad
    left/right and top colour casts (the fine texture is below a 48-pixel view's resolution)."""
    views, nerf, _ = fitted
    mesh = extract_mesh(load_field(nerf, "cpu", views), MeshSettings(resolution=48, faces=3000))
    truth = synthetic.head_mesh(subdivisions=4)
    _, _, nearest = trimesh.proximity.closest_point(truth, mesh.vertices)
    expected = truth.visual.face_colors[nearest, :3] / 255.0
    found = mesh.visual.vertex_colors[:, :3] / 255.0
    assert abs(found.mean() - expected.mean()) < 0.12  # neither black nor the background
    for channel, axis in ((0, 0), (2, 1)):  # red cast follows x, blue cast follows y
        assert np.corrcoef(found[:, channel], mesh.vertices[:, axis])[0, 1] > 0.2


def _psnr(images, truths):
    return float(-10 * np.log10(np.mean([((image - truth) ** 2).mean() for image, truth in zip(images, truths)])))


def test_textured_mesh_from_the_views_is_as_sharp_as_the_field(fitted, tmp_path):
    """The UV texture baked from the views, ray-cast at held-out cameras, scores at least the field's
    own PSNR less 1 dB and more than the field's colours per vertex; the field-coloured texture is
    the head's colours too; OBJ + MTL + PNG and PLY are written as well."""
    from dp360.nerf.mesh import coloured_mesh
    from dp360.nerf.texture import render_textured, render_vertex_coloured, texture_image

    views, nerf, _ = fitted
    field = load_field(nerf, "cpu", views)
    settings = MeshSettings(resolution=48, faces=3000, texture_size=256)
    textured = coloured_mesh(field, settings, views)
    vertex = coloured_mesh(field, MeshSettings(resolution=48, faces=3000, texture="vertex"), views)
    from_field = coloured_mesh(field, MeshSettings(resolution=48, faces=3000, texture="field", texture_size=128), views)
    assert texture_image(textured).size == (256, 256) and textured.metadata["texture"]["seen_fraction"] > 0.7
    assert from_field.metadata["texture"]["views_used"] == 0 and vertex.visual.kind == "vertex"
    truth_mesh = synthetic.head_mesh(subdivisions=5)
    poses = synthetic.held_out_poses(32, 4, 0.0)
    truths = [synthetic.render(truth_mesh, pose, SIZE) for pose in poses]
    scores = {
        "field": _psnr([render_pose(field, pose, SIZE) for pose in poses], truths),
        "views texture": _psnr([render_textured(textured, pose, SIZE) for pose in poses], truths),
        "field texture": _psnr([render_textured(from_field, pose, SIZE) for pose in poses], truths),
        "vertex": _psnr([render_vertex_coloured(vertex, pose, SIZE) for pose in poses], truths),
    }
    assert scores["views texture"] > scores["field"] - 1.0, scores
    assert scores["views texture"] > scores["vertex"] and scores["field texture"] > 15.0, scores
    written = write_mesh(textured, tmp_path / "head.obj", "obj")
    assert [path.name for path in written] == ["head.obj", "head.mtl", "head.png"]
    reloaded = trimesh.load(tmp_path / "head.obj", force="mesh")
    assert reloaded.visual.kind == "texture" and texture_image(reloaded).size == (256, 256)
    (glb,) = write_mesh(textured, tmp_path / "head.glb", "glb")
    assert trimesh.load(glb, force="mesh").visual.material.baseColorTexture.size == (256, 256)
    (ply,) = write_mesh(textured, tmp_path / "head.ply", "ply")
    colours = trimesh.load(ply, force="mesh").visual.vertex_colors[:, :3]
    assert colours.std() > 10  # the texture's colours per vertex, not one flat colour


# -- the fit keeps its colours on any background, and says so when it does not ------------------------


@pytest.mark.parametrize("background", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)], ids=["white", "black"])
def test_fit_converges_on_a_white_and_a_black_background(background, tmp_path):
    """The head is opaque and coloured, not a black or hazy shape, whether the views' background is
    brighter or darker than every head pixel."""
    from dp360.nerf.common import FitSettings
    from dp360.nerf.fit import fit_field

    views = synthetic.write_views(tmp_path / "views", size=32, background=background)
    (tmp_path / "nerf").mkdir()
    settings = FitSettings.preset("test", iterations=150)
    summary = fit_field(views, tmp_path / "nerf", settings, "cpu", progress=False)
    assert summary["background"] == pytest.approx(list(background), abs=0.01)
    assert summary["health"]["foreground_opacity"] > 0.9 and summary["health"]["saturated_share"] < 0.05
    field = load_field(tmp_path / "nerf", "cpu", views)
    mesh = synthetic.head_mesh(subdivisions=5)
    errors = []
    for pose in synthetic.held_out_poses(32, 4, 15.0):
        truth = synthetic.render(mesh, pose, 32, background=background)
        errors.append(((render_pose(field, pose, 32) - truth) ** 2).mean())
    psnr = -10 * np.log10(np.mean(errors))
    assert psnr > 17.0, psnr  # a black head on white scores about 11 dB, a transparent one about 12


def test_health_check_fails_a_fit_whose_colour_head_collapses(tmp_path):
    """nerfacto's own start (an almost empty field, the learning rate at full size from step 0) on
    views brighter than the head saturates the colour head: the fit stops with the numbers."""
    from dp360.errors import Dp360Error
    from dp360.nerf.common import FitSettings
    from dp360.nerf.fit import fit_field

    views = synthetic.write_views(tmp_path / "views", size=32, background=(1.0, 1.0, 1.0))
    (tmp_path / "nerf").mkdir()
    collapsing = FitSettings.preset(
        "test",
        iterations=100,
        init_density=0.01,
        random_background=False,
        lr_decay_steps=100,
        lr_warmup_steps=0,
        hull_prime_steps=0,
    )
    with pytest.raises(Dp360Error, match=r"collapsed at step \d+ of 100: its colour head is saturated on \d+%"):
        fit_field(views, tmp_path / "nerf", collapsing, "cpu", progress=False)
    assert not list((tmp_path / "nerf").rglob("step-*.ckpt"))  # no field written to render or mesh


def test_health_of_a_field_made_to_collapse(fitted):
    """The health numbers of the fixture's field, then of the same field with its colour head pinned
    to black (the last layer's bias at -100) and with its density scaled down to a haze."""
    import torch

    from dp360.errors import Dp360Error
    from dp360.nerf.train import check_health, field_health

    views, nerf, summary = fitted
    field = load_field(nerf, "cpu", views)
    outputs = field.pipeline.datamanager.train_dataparser_outputs
    healthy = field_health(field.model, outputs, field.background)
    assert healthy["foreground_opacity"] > 0.9 and healthy["saturated_share"] < 0.05
    assert healthy == pytest.approx(summary["health"], abs=0.02)
    check_health(healthy, 250, 250, final=True)
    last = [module for module in field.model.field.mlp_head.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(-100.0)
    black = field_health(field.model, outputs, field.background)
    assert black["saturated_share"] > 0.9
    with pytest.raises(Dp360Error, match="saturated"):
        check_health(black, 100, 250, final=False)
    field = load_field(nerf, "cpu", views)
    field.model.field.average_init_density *= 1e-3
    hazy = field_health(field.model, outputs, field.background)
    assert hazy["foreground_opacity"] < 0.5
    check_health(hazy, 100, 250, final=False)  # a young field may be transparent
    with pytest.raises(Dp360Error, match="hazy"):
        check_health(hazy, 250, 250, final=True)


@pytest.mark.parametrize("share", [0.0, 0.75, 1.0])
def test_ray_batches_draw_their_foreground_share(share):
    import torch

    from dp360.nerf.method import ForegroundPixelSamplerConfig

    # two 32 px views, each with a 6 x 6 px foreground square (36 + a 2 px dilation ring = 100 px)
    image = torch.zeros(2, 32, 32, 4)
    image[:, 10:16, 10:16, 3] = 1.0
    sampler = ForegroundPixelSamplerConfig(foreground_share=share).setup(num_rays_per_batch=20_000)
    torch.manual_seed(0)
    batch = sampler.collate_image_dataset_batch({"image": image, "image_idx": torch.arange(2)}, 20_000)
    rows, cols = batch["indices"][:, 1], batch["indices"][:, 2]
    near_head = ((rows >= 8) & (rows < 18) & (cols >= 8) & (cols < 18)).float().mean().item()
    expected = share + (1 - share) * 100 / 1024
    assert abs(near_head - expected) < 0.02
    assert batch["image"].shape == (20_000, 4)


def test_a_foreground_share_outside_0_to_1_is_refused():
    from dp360.errors import Dp360Error
    from dp360.nerf.common import FitSettings

    with pytest.raises(Dp360Error, match="foreground share of the rays must be between 0 and 1"):
        FitSettings.preset("test", foreground_ray_share=1.5).check()


@pytest.mark.parametrize("hole", [False, True], ids=["closed", "open"])
@pytest.mark.parametrize("inward", [False, True], ids=["outward", "inward"])
def test_meshes_face_outward_whether_closed_or_open(hole, inward):
    """Marching cubes gives inward faces; an open surface (decimation, the box's faces) is no volume,
    and trimesh's fix_normals left such a head inward (the texture bake then saw 4 % of its texels)."""
    import trimesh

    from dp360.nerf.mesh import orient_outward

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    faces = sphere.faces[:, ::-1] if inward else sphere.faces
    faces = faces[8:] if hole else faces
    mesh = orient_outward(trimesh.Trimesh(sphere.vertices + [0.01, -0.02, 0.0], faces, process=False))
    assert mesh.is_watertight is not hole
    outwardness = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - mesh.vertices.mean(axis=0))
    assert (outwardness > 0).all()
