"""dp360's method registered with nerfstudio (entry point `nerfstudio.method_configs`): nerfstudio's
own commands run as subprocesses on a tiny fitted run (CPU): `ns-export pointcloud` writes a PLY,
`ns-render interpolate` writes frames, and `ns-train dp360-head` trains on the run's views."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dp360.nerf import synthetic
from dp360.nerf.common import EXPERIMENT, METHOD, TIMESTAMP, FitSettings
from dp360.nerf.fit import load_field
from dp360.nerf.render import render_pose

SIZE = 48
BIN = Path(sys.executable).parent  # the environment's ns-* commands


@pytest.fixture(scope="module")
def run(fitted):
    """The session's fitted run folder (views/ and nerf/ of the synthetic head, 48 px): read only."""
    views, nerf, _ = fitted
    assert views.parent == nerf.parent
    return nerf.parent


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


# -- dp360 view: nerfstudio's viewer on the run, over loopback -------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read_line(stream, seconds: float) -> str:
    """The first line of a subprocess's stream, or '' after `seconds`."""
    import threading

    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return line[0].strip() if line else ""


def test_dp360_view_serves_the_viewer_on_loopback_and_stops_on_the_first_ctrl_c(run, tmp_path):
    import urllib.request

    import psutil

    from dp360.serving import check_address

    from ..browser import CHROMIUM, chromium

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "viewer.log"
    with open(log, "w") as errors:
        viewer = subprocess.Popen(
            [str(BIN / "dp360"), "view", str(run), "--port", str(port), "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
        try:
            url = _read_line(viewer.stdout, 120)
            assert url == f"http://127.0.0.1:{port}", (url, log.read_text()[-2000:])
            # loopback only: the server is not bound to the machine's other addresses
            listening = [conn.laddr for conn in psutil.Process(viewer.pid).net_connections() if conn.status == "LISTEN"]
            assert listening and all(address.ip in ("127.0.0.1", "::1") for address in listening), listening
            page = urllib.request.urlopen(url, timeout=30).read().decode()
            assert "<html" in page.lower() and "<script" in page.lower()

            if CHROMIUM is not None:  # a person's look: the page connects and shows the fitted head
                shot = tmp_path / "viewer.png"
                result = chromium(
                    tmp_path / "profile",
                    "--use-gl=swiftshader",
                    "--enable-unsafe-swiftshader",
                    "--window-size=1000,700",
                    "--virtual-time-budget=10000",
                    f"--screenshot={shot}",
                    url,
                )
                assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
                assert "Connection opened" in log.read_text()  # the page's websocket reached our server
                pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
                viewport = pixels[100:600, 150:550]  # the 3D view, where the head is drawn
                # the first frame is a render of the head (no training image is drawn): darker than
                # the views' 0.8 grey background in the middle, the background at the view's edges
                centre, edge = pixels[250:450, 250:450].mean(), pixels[60:100, 10:60].mean()
                assert centre < 170 and edge > 190, (centre, edge)
                assert viewport.std() > 20
                # a browser left open: the viewer renders for it (seconds a frame on a CPU) when Ctrl-C comes
                browser = _open_browser(tmp_path / "profile-open", url)
                try:
                    deadline = time.monotonic() + 60
                    while log.read_text().count("Connection opened") < 2 and time.monotonic() < deadline:
                        time.sleep(0.1)
                    assert log.read_text().count("Connection opened") >= 2, log.read_text()[-2000:]
                    time.sleep(3)  # past the first low-resolution frames, into a full-resolution render
                    code, seconds = _interrupt(viewer)
                finally:
                    browser.kill()
                    browser.wait()
        finally:
            if viewer.poll() is None:
                code, seconds = _interrupt(viewer)
    assert code == 0, log.read_text()[-2000:]
    # the first Ctrl-C stops it at once (measured 0.2-0.3 s; it took 10 s with a render in flight)
    assert seconds < STOP_LIMIT, (seconds, log.read_text()[-2000:])
    assert check_address("127.0.0.1", port).port == port  # the port is free again for the next server


STOP_LIMIT = 2.0  # seconds from the first SIGINT to the viewer's exit


def _interrupt(process: subprocess.Popen) -> tuple[int, float]:
    """One real SIGINT; the exit status and the seconds until the process ended."""
    import signal

    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, time.monotonic() - started


def _open_browser(profile: Path, url: str) -> subprocess.Popen:
    """Headless Chromium showing `url` until killed (a debugging port keeps it open)."""
    from ..browser import CHROMIUM

    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    command += [f"--user-data-dir={profile}", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
    command += ["--window-size=1000,700", "--remote-debugging-port=0", url]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_dp360_view_refuses_bad_addresses_and_runs_without_a_field_before_loading(cli, run, tmp_path):
    import socket

    from dp360.serving import check_address

    code, _, stderr = cli("view", tmp_path / "missing")
    assert code == 2 and "does not exist" in stderr
    (tmp_path / "views-only" / "views").mkdir(parents=True)
    code, _, stderr = cli("view", tmp_path / "views-only", "--port", "0")
    assert code == 2 and "no fitted radiance field" in stderr and "dp360 reconstruct" in stderr
    code, _, stderr = cli("view", run, "--port", "70000")
    assert code == 2 and "--port must be 1 to 65535" in stderr
    code, _, stderr = cli("view", run, "--host", "no-such-host.invalid", "--port", "0")
    assert code == 2 and "--host no-such-host.invalid" in stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, stderr = cli("view", run, "--port", str(taken.getsockname()[1]))
        assert code == 2 and "already in use" in stderr
    assert check_address("127.0.0.1", 0).loopback and check_address("127.0.0.1", 0).network_note() is None
    everywhere = check_address("0.0.0.0", 0)
    assert not everywhere.loopback and "--host 127.0.0.1" in everywhere.network_note()
    assert everywhere.network_note().startswith("the viewer listens on 0.0.0.0")
    assert everywhere.network_note("the app").startswith("the app listens on 0.0.0.0")
    assert everywhere.url.startswith("http://127.0.0.1:")


def test_ctrl_c_while_the_viewer_loads_says_what_it_left(cli, run, monkeypatch):
    """Ctrl-C before the viewer serves: exit 130 and a sentence about the viewer, not the run's
    "finished stages are kept; rerun to resume" (nothing of the run was touched)."""
    from dp360.nerf import viewer

    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    before = sorted((path.relative_to(run).as_posix(), path.stat().st_mtime_ns) for path in run.rglob("*"))
    monkeypatch.setattr(viewer, "start_viewer", interrupted_while_loading)
    code, stdout, stderr = cli("view", run, "--port", "0")
    assert code == 130 and stdout == ""
    assert "interrupted: the viewer stopped while it loaded the field" in stderr and "resume" not in stderr
    assert sorted((path.relative_to(run).as_posix(), path.stat().st_mtime_ns) for path in run.rglob("*")) == before


class _RenderThread(__import__("threading").Thread):
    """Stands in for nerfstudio's RenderStateMachine: renders in Python lines until told to stop
    (`interrupt_render_flag`, which nerfstudio's traced render raises on), or, `stuck`, ignores it."""

    def __init__(self, stuck: bool = False):
        super().__init__(daemon=True)
        self.running, self.interrupt_render_flag, self.stuck = True, False, stuck
        self.release = __import__("threading").Event()

    def run(self):
        while self.running or self.stuck:
            while self.stuck or not self.interrupt_render_flag:  # a render of many lines
                if self.release.wait(0.01):
                    return


class _FakeServer:
    stopped = False

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("stuck", [False, True])
def test_stop_abandons_a_render_in_flight_and_closes_the_server_promptly(stuck):
    from types import SimpleNamespace

    from dp360.nerf.viewer import STOP_SECONDS, RunningViewer

    machine = _RenderThread(stuck)
    machine.start()
    server = _FakeServer()
    viewer = SimpleNamespace(viser_server=server, render_statemachines={0: machine})
    started = time.monotonic()
    RunningViewer(None, viewer, Path("config.yml")).stop()
    seconds = time.monotonic() - started
    assert server.stopped
    if stuck:  # a render stuck in native code is left to its daemon thread after a bounded wait
        assert STOP_SECONDS - 0.1 < seconds < STOP_SECONDS + 1.0 and machine.is_alive()
        machine.release.set()
    else:  # the render is interrupted, not waited for
        assert seconds < 0.5 and not machine.is_alive()


def test_the_viewer_draws_no_training_camera_and_starts_off_them(run):
    """A browser's first frame is a render of the head: no training camera (frustum and image) is
    drawn, and the start camera is none of the training cameras' poses (pulled back, to the side)."""
    import numpy as np

    from dp360 import cameras
    from dp360.nerf.viewer import START_PULL_BACK, START_YAW, start_viewer
    from dp360.serving import check_address

    running = start_viewer(run, check_address("127.0.0.1", 0), "cpu")
    try:
        assert running.viewer.camera_handles == {}
    finally:
        running.stop()
    start = cameras.orbit_pose(START_YAW, 10.0)[:3, 3] * START_PULL_BACK
    orbit = [pose[:3, 3] for pose in cameras.dp360_orbit(32)]
    assert min(np.linalg.norm(start - position) for position in orbit) > 0.5
