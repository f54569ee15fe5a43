"""3D Gaussian splats (`--field splatfacto`) on the CPU: the method's configuration, the seed points,
the splat model built in code, the standard 3DGS PLY written from it (and from a checkpoint, as the
export stage does) and the refusals. The fit itself, through the plain-PyTorch rasteriser, is in
test_splat_raster.py; at real size it runs in benchmarks/nerf_quality.py on a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from dp360 import cameras
from dp360.manifest import new_manifest
from dp360.nerf.common import EXPERIMENT, FIT_FILE, SPLAT_METHOD, TIMESTAMP, FitSettings
from dp360.nerf.splat import (
    SEED_BALL_RADIUS,
    HeadSplatModel,
    SeedPoints,
    ball_seed_points,
    depth_seed_points,
    pick_seed_points,
    splat_config,
    splat_parameters,
    splat_parameters_of_checkpoint,
    splat_schedule,
    write_splat_ply,
)

SPHERE_CENTRE, SPHERE_RADIUS = np.array([0.08, 0.05, -0.04]), 0.25


def _splat_model(seeds: SeedPoints, sh_degree: int = 3) -> HeadSplatModel:
    from nerfstudio.data.scene_box import SceneBox

    config = splat_config(FitSettings.preset("test"), "cpu", None, [0.5, 0.5, 0.5]).pipeline.model
    config.sh_degree = sh_degree
    model = config.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])),
        num_train_data=4,
        metadata={},
        seed_points=(torch.from_numpy(seeds.points), torch.from_numpy(seeds.colours)),
    )
    return model


def test_the_schedule_is_splatfactos_own_at_its_length_and_fits_shorter_fits():
    from nerfstudio.models.splatfacto import SplatfactoModelConfig

    own = SplatfactoModelConfig()
    assert splat_schedule(30_000) == {name: getattr(own, name) for name in splat_schedule(30_000)}
    short = splat_schedule(2000)
    assert short["warmup_length"] == 200 and short["stop_split_at"] == 1000 and short["resolution_schedule"] == 200
    assert short["refine_every"] == 100 and short["stop_screen_size_at"] <= short["stop_split_at"]
    assert splat_schedule(1)["stop_split_at"] >= 1  # never zero or negative


def test_the_method_is_configured_for_the_head_orbit():
    settings = FitSettings.preset("gpu", iterations=5000, seed=7)
    config = splat_config(settings, "cuda", Path("/data/views"), [0.8, 0.7, 0.6])
    model = config.pipeline.model
    assert config.method_name == SPLAT_METHOD and config.max_num_iterations == 5000 and config.machine.seed == 7
    assert model.camera_optimizer.mode == "off"  # the cameras are exact
    assert model.background_rgb == (0.8, 0.7, 0.6)  # the views' colour, not a random one
    assert model.rasterize_mode == "classic" and model.seed == 7
    parser = config.pipeline.datamanager.dataparser
    # the views' world frame kept as is, in the bounded head box
    assert (parser.orientation_method, parser.center_method, parser.auto_scale_poses) == ("none", "none", False)
    assert parser.scale_factor == 1.0 and parser.scene_scale == settings.scene_half_size
    assert parser.data == Path("/data/views") and not parser.load_3D_points
    # lengths scaled from nerfstudio's unit-distance scenes to cameras at the orbit radius
    assert model.cull_scale_thresh == pytest.approx(0.5 * cameras.CAMERA_RADIUS)
    assert "camera_opt" not in config.optimizers and "bilateral_grid" not in config.optimizers
    # the images are cached on the training device: "cpu" would pin host memory, which needs CUDA
    assert splat_config(settings, "cpu").pipeline.datamanager.cache_images == "gpu"
    assert model.random_background  # behind the views' alpha in training (see test_splat_raster.py's fit)


def test_nerfstudio_lists_dp360_splat():
    from nerfstudio.plugins.registry import discover_methods

    methods, descriptions = discover_methods()
    assert SPLAT_METHOD in methods and "splat" in descriptions[SPLAT_METHOD]
    assert methods[SPLAT_METHOD] == splat_config(FitSettings())


def test_ball_seeds_are_seeded_and_inside_the_head_box():
    first, again, other = ball_seed_points(2000, 3), ball_seed_points(2000, 3), ball_seed_points(2000, 4)
    assert np.array_equal(first.points, again.points) and not np.array_equal(first.points, other.points)
    radii = np.linalg.norm(first.points, axis=1)
    assert radii.max() <= SEED_BALL_RADIUS + 1e-6
    assert 0.7 < np.median(radii) / SEED_BALL_RADIUS < 0.85  # uniform in volume: median at 2^(-1/3)


def _sphere_depth_file(folder: Path, views: int = 8, resolution: int = 24) -> Path:
    """What the noise stage writes (`depth.npz`), for a sphere whose surface is known exactly."""
    labels = cameras.orbit_labels(views)
    depth = np.full((views, resolution, resolution), 10.0, np.float32)
    opacity = np.zeros_like(depth)
    for index, label in enumerate(labels):
        cam2world, intrinsics = cameras.parse_panohead_label(label)
        origins, directions = cameras.pixel_rays(
            torch.from_numpy(cam2world[None]), torch.from_numpy(intrinsics[None]), resolution
        )
        origins, directions = origins[0].numpy(), directions[0].numpy()
        offset = origins - SPHERE_CENTRE
        half_b = (offset * directions).sum(1)
        discriminant = half_b**2 - ((offset**2).sum(1) - SPHERE_RADIUS**2)
        hit = discriminant > 0
        depth[index].reshape(-1)[hit] = -half_b[hit] - np.sqrt(discriminant[hit])
        opacity[index].reshape(-1)[hit] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "depth.npz", depth=depth, opacity=opacity, labels=labels)
    return folder / "depth.npz"


def test_depth_seeds_lie_on_the_rendered_surface(tmp_path):
    depth_file = _sphere_depth_file(tmp_path / "noise")
    seeds = depth_seed_points(depth_file, 1500, seed=1)
    distances = np.linalg.norm(seeds.points - SPHERE_CENTRE, axis=1)
    assert len(seeds.points) == 1500 and np.abs(distances - SPHERE_RADIUS).max() < 1e-4
    every = depth_seed_points(depth_file, 10**6, seed=1)  # at most one point per opaque pixel, none twice
    assert 1500 < len(every.points) < 8 * 24 * 24 and len(np.unique(every.points, axis=0)) == len(every.points)
    # seen from all around: points on every side of the sphere
    directions = (seeds.points - SPHERE_CENTRE) / SPHERE_RADIUS
    assert directions[:, 0].min() < -0.8 and directions[:, 0].max() > 0.8
    assert directions[:, 2].min() < -0.8 and directions[:, 2].max() > 0.8
    assert "PanoHead depth" in seeds.source
    # coloured by the noise frames where they exist (one colour per view here)
    frames = tmp_path / "noise" / "frames"
    frames.mkdir()
    from PIL import Image

    for index in range(8):
        Image.fromarray(np.full((48, 48, 3), (30 * index, 200, 10), np.uint8)).save(frames / f"{index:03d}.png")
    coloured = depth_seed_points(depth_file, 1500, seed=1)
    assert set(np.unique(coloured.colours[:, 0])) <= {30 * index for index in range(8)}
    assert len(np.unique(coloured.colours[:, 0])) == 8 and np.all(coloured.colours[:, 1] == 200)


def test_a_damaged_depth_file_is_one_sentence(tmp_path):
    from dp360.errors import Dp360Error

    bad = tmp_path / "depth.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(Dp360Error, match="is not a depth.npz of the noise stage"):
        depth_seed_points(bad, 10, 0)
    np.savez(bad, depth=np.zeros((2, 4, 4)), opacity=np.zeros((3, 4, 4)), labels=np.zeros((2, 25)))
    with pytest.raises(Dp360Error, match="different counts"):
        depth_seed_points(bad, 10, 0)


def test_seed_points_prefer_panohead_depth_then_the_nerfacto_field_then_a_ball(tmp_path, fitted):
    run = tmp_path / "run"
    assert "ball" in pick_seed_points(run, 0, "cpu", count=100).source
    views, nerf, _ = fitted
    shutil.copytree(views, run / "views")
    shutil.copytree(nerf, run / "nerf")
    from_field = pick_seed_points(run, 0, "cpu", count=500)
    assert "nerfacto density" in from_field.source and np.all(np.abs(from_field.points) <= 0.5)
    _sphere_depth_file(run / "noise")
    assert "PanoHead depth" in pick_seed_points(run, 0, "cpu", count=100).source


def _read_ply(path: Path) -> np.ndarray:
    data = PlyData.read(str(path))
    assert [element.name for element in data.elements] == ["vertex"]
    assert not data.text and data.byte_order == "<"  # binary little endian, as 3DGS writes
    return data["vertex"].data


def _three_dgs_names(rest: int) -> list[str]:
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{index}" for index in range(3 * rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def test_the_ply_holds_the_models_gaussians_in_the_3dgs_layout(tmp_path):
    model = _splat_model(ball_seed_points(300, 5))
    model.gauss_params["features_rest"].data = torch.randn_like(model.gauss_params["features_rest"])
    model.gauss_params["quats"].data = 3 * torch.randn_like(model.gauss_params["quats"])  # not unit yet
    parameters = splat_parameters(model)
    out = write_splat_ply(parameters, tmp_path / "head.splat.ply")
    vertices = _read_ply(out)
    assert list(vertices.dtype.names) == _three_dgs_names(15) and len(vertices) == 300
    assert all(vertices.dtype[name] == np.dtype("<f4") for name in vertices.dtype.names)
    assert np.allclose(np.stack([vertices[axis] for axis in "xyz"], 1), parameters["means"])
    assert np.all(vertices["nx"] == 0)
    assert np.allclose(vertices["opacity"], parameters["opacities"][:, 0])
    assert np.allclose(np.stack([vertices[f"scale_{i}"] for i in range(3)], 1), parameters["scales"])
    rotation = np.stack([vertices[f"rot_{i}"] for i in range(4)], 1)
    assert np.allclose(np.linalg.norm(rotation, axis=1), 1, atol=1e-5)
    assert np.allclose(rotation, parameters["quats"] / np.linalg.norm(parameters["quats"], axis=1, keepdims=True))
    # higher SH coefficients channel-major: all of red's, then green's, then blue's
    rest = parameters["features_rest"]  # (N, 15, 3)
    assert np.allclose(vertices["f_rest_0"], rest[:, 0, 0]) and np.allclose(vertices["f_rest_1"], rest[:, 1, 0])
    assert np.allclose(vertices["f_rest_15"], rest[:, 0, 1]) and np.allclose(vertices["f_rest_44"], rest[:, 14, 2])
    # the DC term holds the seed colour (mid-grey) as a degree-0 SH coefficient
    grey = (128 / 255 - 0.5) / 0.28209479177387814
    assert np.allclose(np.stack([vertices[f"f_dc_{i}"] for i in range(3)], 1), grey, atol=1e-5)


def test_non_finite_gaussians_are_left_out_and_an_existing_file_is_kept(tmp_path):
    from dp360.errors import Dp360Error

    parameters = splat_parameters(_splat_model(ball_seed_points(50, 1), sh_degree=0))
    parameters["means"][3] = np.nan
    out = write_splat_ply(parameters, tmp_path / "head.splat.ply")
    vertices = _read_ply(out)
    assert len(vertices) == 49 and list(vertices.dtype.names) == _three_dgs_names(0)
    before = out.read_bytes()
    with pytest.raises(Dp360Error, match="--overwrite"):
        write_splat_ply(parameters, out)
    assert out.read_bytes() == before
    parameters["opacities"][:] = np.inf
    with pytest.raises(Dp360Error, match="no Gaussian with finite values"):
        write_splat_ply(parameters, tmp_path / "none.splat.ply")
    assert not (tmp_path / "none.splat.ply").exists()


def _splat_run(root: Path, count: int = 120) -> tuple[Path, dict[str, np.ndarray]]:
    """A run folder whose nerf/ holds a splat field as `fit_splat` lays it out (checkpoint + fit.json)."""
    from dp360.nerf import synthetic

    synthetic.write_views(root / "views", size=32, view_count=8)
    model = _splat_model(ball_seed_points(count, 2))
    folder = root / "nerf" / EXPERIMENT / SPLAT_METHOD / TIMESTAMP / "nerfstudio_models"
    folder.mkdir(parents=True)
    state = {f"_model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"pipeline": state, "step": 9}, folder / "step-000000009.ckpt")
    record = {
        "method": SPLAT_METHOD,
        "settings": FitSettings.preset("test").key_dict(),
        "background": [0.8, 0.8, 0.8],
        "views_dir": str(root / "views"),
    }
    (root / "nerf" / FIT_FILE).write_text(json.dumps(record))
    return root, splat_parameters(model)


def test_the_export_reads_the_splats_from_the_checkpoint_without_cuda(cli, tmp_path):
    run, parameters = _splat_run(tmp_path / "run")
    read = splat_parameters_of_checkpoint(run / "nerf")
    assert all(np.array_equal(read[name], parameters[name]) for name in parameters)
    (run / "run.json").write_text(json.dumps(new_manifest()))  # dp360's export command wants a run folder it made
    code, _, stderr = cli("export", run)
    assert code == 0, stderr
    vertices = _read_ply(run / "export" / "head.splat.ply")
    assert len(vertices) == 120 and np.allclose(vertices["x"], parameters["means"][:, 0])
    code, _, stderr = cli("export", run, "--format", "obj")
    assert code == 2 and "splat field" in stderr and "--field nerfacto" in stderr
    assert not (run / "export" / "head.obj").exists()
    # rendering needs gsplat, which needs CUDA: one sentence
    code, _, stderr = cli("render", run, "--out", tmp_path / "turntable.mp4", "--device", "cpu")
    assert code == 2 and "needs a CUDA GPU" in stderr and not (tmp_path / "turntable.mp4").exists()


def test_the_export_stage_writes_the_splat_ply_and_says_why_there_is_no_mesh(tmp_path):
    from dp360.nerf.splat import SPLAT_FILE
    from dp360.nerf.stage import build_export

    run, parameters = _splat_run(tmp_path / "run", count=64)
    out = tmp_path / "staging"
    out.mkdir()
    summary = build_export(run, out, None, ("glb",), "cpu")
    assert summary["splats"] == 64 and "no density to mesh" in summary["mesh"]
    assert sorted(path.name for path in out.iterdir()) == [SPLAT_FILE]


def test_reconstruct_with_splats_is_refused_on_the_cpu_before_any_work(cli, tmp_path, astronaut_path):
    out = tmp_path / "head"
    code, stdout, stderr = cli("reconstruct", astronaut_path, "--out", out, "--field", "splatfacto", "--device", "cpu")
    assert code == 2 and not out.exists()
    assert "--field splatfacto needs a CUDA GPU" in stderr and "--field nerfacto" in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 2  # one sentence (wrapped at most once)


def test_a_fit_key_names_the_field_only_when_it_is_splats():
    from dp360.nerf.stage import FIT_STAGE, FieldStageSettings
    from dp360.pipeline.stage import StageContext

    def context(field_name):  # the fit stage sees the field's config only
        return StageContext(Path("run"), None, "cuda", "fp16", False, FieldStageSettings(field=field_name), seed=42)

    nerfacto, splats = FIT_STAGE.settings(context("nerfacto")), FIT_STAGE.settings(context("splatfacto"))
    assert "field" not in nerfacto  # runs fitted before the choice existed keep their key
    assert splats == {**nerfacto, "field": "splatfacto"}


def test_the_report_links_the_splats_and_says_why_there_is_no_mesh(tmp_path):
    from dp360.nerf.splat import SPLAT_FILE
    from dp360.nerf.stage import build_export
    from dp360.report import render_report

    run, _ = _splat_run(tmp_path / "run", count=32)
    (run / "export").mkdir()
    summary = build_export(run, run / "export", None, ("glb",), "cpu")
    size = (run / "export" / SPLAT_FILE).stat().st_size
    record = {"status": "done", "summary": summary, "outputs": {f"export/{SPLAT_FILE}": size}}
    page = render_report(run, {"stages": {"export": record}})
    mesh_section = page[page.index("id='mesh'") :]
    assert f'href="../export/{SPLAT_FILE}"' in mesh_section and "32 Gaussian splats" in mesh_section  # from export/
    assert "no density to mesh" in mesh_section and "<img" not in mesh_section.split("<h2")[0]
