"""dp360's method registered with nerfstudio (entry point `nerfstudio.method_configs`): nerfstudio's
own commands run as subprocesses on a tiny fitted run (CPU): `ns-export pointcloud` writes a PLY,
`ns-render interpolate` writes frames, and `ns-train dp360-head` trains on the run's views."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dp360.nerf import synthetic
from dp360.nerf.fit import EXPERIMENT, METHOD, TIMESTAMP, FitSettings, load_field
from dp360.nerf.render import render_pose

SIZE = 48
BIN = Path(sys.executable).parent  # the environment's ns-* commands


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with views/ and a (barely) fitted nerf/: nerfstudio's commands only need to load it."""
    root = tmp_path_factory.mktemp("run")
    synthetic.write_fitted_run(root, size=SIZE, iterations=20)
    return root


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    """Runs an ns-* command offline, one thread, with an `ffmpeg` on PATH (ns-render asks for one
    even to write images; imageio-ffmpeg's binary serves)."""
    import imageio_ffmpeg

    tools = tmp_path_factory.mktemp("tools")
    if shutil.which("ffmpeg") is None:
        (tools / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(tools), str(BIN), os.environ.get("PATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }

    def invoke(command: str, *args, cwd: Path) -> str:
        result = subprocess.run(
            [str(BIN / command), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{output[-4000:]}"
        return output

    return invoke


def _config(run: Path) -> Path:
    return run / "nerf" / EXPERIMENT / METHOD / TIMESTAMP / "config.yml"


def test_nerfstudio_lists_the_method_with_the_fit_settings(run):
    from nerfstudio.plugins.registry import discover_methods

    from dp360.nerf.method import HeadModelConfig, head_config

    methods, descriptions = discover_methods()
    assert METHOD in methods and descriptions[METHOD]
    registered = methods[METHOD]
    assert registered.method_name == METHOD and isinstance(registered.pipeline.model, HeadModelConfig)
    assert registered == head_config(FitSettings())  # the same builder as dp360's own fit (GPU preset)
    # A dp360 run's config names the registered method, and carries the views' background.
    config = yaml.load(_config(run).read_text(), Loader=yaml.Loader)  # our own file: the full loader is fine
    assert config.method_name == METHOD
    assert config.pipeline.model.background_rgb == pytest.approx((0.8, 0.8, 0.8), abs=0.01)


def test_ns_export_pointcloud_writes_a_ply_in_the_run_frame(run, ns, tmp_path):
    from plyfile import PlyData

    out = tmp_path / "cloud"
    ns(
        "ns-export",
        "pointcloud",
        "--load-config",
        _config(run),
        "--output-dir",
        out,
        "--num-points",
        1000,
        "--num-rays-per-batch",
        1024,
        "--normal-method",
        "open3d",  # dp360-head predicts no normals
        cwd=tmp_path,
    )
    vertex = PlyData.read(out / "point_cloud.ply")["vertex"]
    assert vertex.count > 0 and {"red", "green", "blue"} <= set(vertex.data.dtype.names)
    points = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    assert np.isfinite(points).all()
    # the world frame of views/transforms.json is kept: the head sits at the origin inside the +-1 box
    assert np.median(np.linalg.norm(points, axis=1)) < 1.0


def test_ns_render_interpolate_writes_frames_with_the_views_background(run, ns, tmp_path):
    out = tmp_path / "frames"
    ns(
        "ns-render",
        "interpolate",
        "--load-config",
        _config(run),
        "--output-path",
        out,
        "--output-format",
        "images",
        "--image-format",
        "png",
        "--interpolation-steps",
        1,
        "--frame-rate",
        8,
        "--downscale-factor",
        2,
        cwd=tmp_path,
    )
    frames = sorted(out.glob("*.png"))
    assert len(frames) >= 31  # the 32 views' cameras, interpolated
    images = [np.asarray(Image.open(frame).convert("RGB")) for frame in frames]
    assert all(image.shape == (SIZE // 2, SIZE // 2, 3) for image in images)
    corners = np.stack([image[[0, 0, -1, -1], [0, -1, 0, -1]] for image in images]).reshape(-1, 3)
    assert np.abs(np.median(corners, axis=0) - 0.8 * 255).max() < 20  # the views' grey, not nerfacto's white


def test_ns_train_dp360_head_trains_on_the_views(run, ns, tmp_path):
    out = tmp_path / "outputs"
    ns(
        "ns-train",
        METHOD,
        "--data",
        run / "views",
        "--output-dir",
        out,
        "--max-num-iterations",
        2,
        "--vis",
        "tensorboard",
        "--viewer.quit-on-train-completion",
        "True",
        "--machine.device-type",
        "cpu",
        # small sizes for a CPU test; the method's own are FitSettings' (GPU preset)
        "--pipeline.datamanager.train-num-rays-per-batch",
        256,
        "--pipeline.model.num-levels",
        8,
        "--pipeline.model.log2-hashmap-size",
        14,
        "--pipeline.model.max-res",
        128,
        cwd=tmp_path,
    )
    (config_path,) = out.glob(f"views/{METHOD}/*/config.yml")
    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)  # written by the test's own ns-train
    assert config.method_name == METHOD and config.pipeline.model.background_rgb is None  # from the views' borders
    assert config.pipeline.datamanager.data == run / "views"
    assert list((config_path.parent / "nerfstudio_models").glob("step-*.ckpt"))


def test_runs_made_before_the_registration_still_load(run, tmp_path):
    """Runs of earlier versions hold the field under dp360/nerfacto-head/fit/."""
    old = tmp_path / "old"
    shutil.copytree(run / "views", old / "views")
    shutil.copytree(run / "nerf", old / "nerf")
    (old / "nerf" / EXPERIMENT / METHOD).rename(old / "nerf" / EXPERIMENT / "nerfacto-head")
    pose = synthetic.held_out_poses(count=1)[0]
    before = render_pose(load_field(run / "nerf", "cpu", run / "views"), pose, 16)
    after = render_pose(load_field(old / "nerf", "cpu", old / "views"), pose, 16)
    np.testing.assert_array_equal(before, after)
