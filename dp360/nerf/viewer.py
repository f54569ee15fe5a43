"""The interactive viewer of a run's fitted field: nerfstudio's viser viewer (the one `ns-viewer`
starts), served on a local port.

`dp360.serving.check_address` validates the host and port before any work, `start_viewer` loads the field with
dp360's checked loader (`load_field`: the same pipeline as nerfstudio's eval setup, rebuilt from
fit.json rather than from unpickling config.yml) and starts the viewer, and `RunningViewer.wait`
blocks until Ctrl-C or SIGTERM, then closes the server so that the port is free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import layout
from ..errors import Dp360Error, Terminated
from ..serving import DEFAULT_HOST, ServerAddress, check_address
from .checkpoint import run_folder
from .common import FIT_FILE

DEFAULT_PORT = 7007
MAKE_RUN = "`dp360 reconstruct PORTRAIT --out {run}`"
NERFSTUDIO_NOISE = "Using a non-tuple sequence"  # torch's deprecation note on nerfstudio's camera indexing
CLOSE_SECONDS = 10.0  # how long a stop waits for the server's connections to close
STOP_SECONDS = 1.0  # how long a stop waits for the render threads (daemons) before closing the server


def fitted_config(run_dir: str | Path) -> Path:
    """nerfstudio's config.yml of the run's fitted field; one sentence, naming the command that
    makes one, when `run_dir` is not a run or has no fitted field."""
    run = Path(run_dir)
    make = MAKE_RUN.format(run=run)
    if not run.is_dir():
        state = "is not a folder" if run.exists() else "does not exist"
        raise Dp360Error(f"Run folder '{run}' {state}; pass a folder written by {make}.")
    nerf = run / layout.NERF
    if not any((run / name).exists() for name in ("run.json", "views", "nerf")):
        raise Dp360Error(f"'{run}' is not a dp360 run folder (no run.json, views/ or nerf/); make one with {make}.")
    config = run_folder(nerf) / "config.yml"
    if not (nerf / FIT_FILE).is_file() or not config.is_file():
        raise Dp360Error(
            f"'{run}' has no fitted radiance field (nerf/{FIT_FILE} or {config.relative_to(run)} is missing); "
            f"fit one with {make} (it resumes the run)."
        )
    return config


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """nerfstudio and viser print banners (viser's repeats the URL), dataset notes and deprecation
    warnings while they start and stop; keep the console for the URL and real errors."""
    from nerfstudio.utils.rich_utils import CONSOLE

    was_quiet = CONSOLE.quiet
    CONSOLE.quiet = True
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=NERFSTUDIO_NOISE, category=UserWarning)
            yield
    finally:
        CONSOLE.quiet = was_quiet


@dataclass
class RunningViewer:
    """nerfstudio's viewer serving a run's field; `stop()` (or `wait()`'s end) closes it."""

    address: ServerAddress
    viewer: Any  # nerfstudio.viewer.viewer.Viewer
    config: Path

    @property
    def url(self) -> str:
        return self.address.url

    def wait(self) -> None:
        """Serves until Ctrl-C or SIGTERM, then stops the viewer."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        if main and previous in (signal.SIG_DFL, None):
            # a library caller without a handler: SIGTERM unwinds like Ctrl-C, so the port is closed
            signal.signal(signal.SIGTERM, _raise_terminated)
        stopped = threading.Event()
        try:
            # viser's connection log off stdout; torch's deprecation notes from nerfstudio's render threads hidden
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=NERFSTUDIO_NOISE, category=UserWarning)
                while not stopped.wait(0.5):
                    pass
        except KeyboardInterrupt:
            pass
        finally:
            if main and previous in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.stop()

    def stop(self) -> None:
        """Closes the server (its port is free afterwards) and ends the viewer's render threads."""
        server = self.viewer.viser_server
        machines = list(self.viewer.render_statemachines.values())
        for machine in machines:
            machine.running = False
            # a render in flight (seconds at full resolution on a CPU) is abandoned at its next
            # Python line: nerfstudio traces its renders to stop them when the camera moves
            machine.interrupt_render_flag = True
        deadline = time.monotonic() + STOP_SECONDS
        for machine in machines:  # idle ones wake every 0.2 s
            machine.join(max(deadline - time.monotonic(), 0.0))
        with _quiet():
            _close_server(server)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


async def _close_and_wait(websocket_server) -> threading.Thread:
    websocket_server.close()
    await websocket_server.wait_closed()
    return threading.current_thread()  # viser's server thread, which runs this loop


def _close_server(server) -> None:
    """viser 0.2's `stop()` asks the server's event loop to close from this thread without waking
    it, so the port can stay open; close it on its loop and wait, then let viser stop the rest."""
    websocket_server = getattr(getattr(server, "_websock_server", None), "_ws_server", None)
    loop = websocket_server.get_loop() if websocket_server is not None else None
    server_thread = None
    if loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            future = asyncio.run_coroutine_threadsafe(_close_and_wait(websocket_server), loop)
            server_thread = future.result(CLOSE_SECONDS)
    with contextlib.suppress(AssertionError):  # already stopped
        server.stop()
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
    # the thread ends with its loop: wait for it, so that the interpreter never exits under it
    # (a daemon thread still in native code at exit aborts the process)
    if server_thread is not None and server_thread is not threading.current_thread():
        server_thread.join(CLOSE_SECONDS)


# Where a new browser starts: half-way between two training cameras in yaw, above eye level and a
# little further out, so that it shows a render of the whole head and not a training camera's view
# (pulled back no further than the field's far plane allows: the head must stay inside it).
START_YAW, START_ELEVATION, START_PULL_BACK = 17.0, 10.0, 1.15


def _look_at_the_face(client) -> None:
    """A new browser starts looking at the head from START_* (viser's default camera sits inside the
    orbit, nearer than the field's near plane, so all background; a training camera's own pose would
    show its training image in front of the render)."""
    import numpy as np
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    from .. import cameras

    start = cameras.orbit_pose(START_YAW, START_ELEVATION)  # OpenCV cam2world in the run's world frame
    with client.atomic():
        client.camera.up_direction = -start[:3, 1]  # OpenCV's y axis points down the image
        client.camera.position = start[:3, 3] * START_PULL_BACK * VISER_NERFSTUDIO_SCALE_RATIO
        client.camera.look_at = np.zeros(3)
        # the views' vertical field of view: pulled back, the whole head fills the middle of the frame
        client.camera.fov = 2 * np.arctan(cameras.PRINCIPAL_NORMALIZED / cameras.FOCAL_NORMALIZED)


def _view_only_controls(viewer, iterations: int) -> None:
    """Hide what does nothing when a finished field is looked at (the training cameras' buttons,
    the training speed and share), and show the fit's step count rather than 0. nerfstudio has no
    view-only mode: its own handles are hidden, each only where this version has it."""
    for button in (getattr(viewer, "hide_images", None), getattr(viewer, "show_images", None)):
        if button is not None:
            button.visible = False
    panel = getattr(viewer, "control_panel", None)
    for element in (getattr(panel, "_train_speed", None), getattr(panel, "_train_util", None)):
        if element is not None and getattr(element, "gui_handle", None) is not None:
            element.set_hidden(True)
    with contextlib.suppress(Exception):  # the markdown's layout is nerfstudio's
        viewer.stats_markdown.content = viewer.make_stats_markdown(iterations, None)


def start_viewer(run_dir: str | Path, address: ServerAddress, device: str = "cpu") -> RunningViewer:
    """Loads the run's fitted field on `device` and serves nerfstudio's viewer of it at `address`
    (from `check_address`). Returns at once; call `wait()` or `stop()`."""
    config = fitted_config(run_dir)
    with _quiet():  # nerfstudio's imports warn too
        from nerfstudio.configs.base_config import LoggingConfig, ViewerConfig
        from nerfstudio.utils import writer
        from nerfstudio.viewer.viewer import Viewer

        from .fit import load_field

        viewer_config = ViewerConfig(
            websocket_host=address.host,
            websocket_port=address.port,
            num_rays_per_chunk=1 << 15,
            max_num_display_images=0,  # no training cameras drawn: the field is what is looked at
        )
        field = load_field(Path(run_dir) / layout.NERF, device, Path(run_dir) / layout.VIEWS)
        pipeline = field.pipeline
        # nerfstudio's render threads time themselves into its writer's buffer (it sizes the
        # preview by the measured speed): set the buffer up, without its console writer.
        logging = LoggingConfig()
        logging.local_writer.enable = False
        writer.setup_local_writer(logging, max_iter=max(field.settings.iterations, 1))
        # the render tab offers `ns-render` commands with the config next to the viewer's log file
        viewer = Viewer(
            viewer_config,
            log_filename=config.parent / viewer_config.relative_log_filename,
            datapath=pipeline.datamanager.get_datapath(),
            pipeline=pipeline,
            train_lock=threading.Lock(),
        )
        running = RunningViewer(address, viewer, config)
        try:
            if viewer.viser_server.get_port() != address.port:
                # viser moves on to the next port when the asked one is taken (it was free a moment ago)
                raise Dp360Error(
                    f"Port {address.port} on {address.host} was taken while the field loaded; choose another with "
                    "--port (0 picks a free one)."
                )
            viewer.init_scene(
                train_dataset=pipeline.datamanager.train_dataset,
                train_state="completed",
                eval_dataset=pipeline.datamanager.eval_dataset,
            )
            viewer.update_scene(step=int(field.meta.get("iterations", 0)))
            # a finished fit: nerfstudio's viewer offers to pause training when no trainer is given
            viewer.pause_train.visible = viewer.resume_train.visible = False
            _view_only_controls(viewer, int(field.meta.get("iterations", 0)))
            viewer.viser_server.on_client_connect(_look_at_the_face)
        except BaseException:
            running.stop()
            raise
    return running


def serve(run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto") -> None:
    """`dp360 view` as a library call: checks, starts the viewer, prints its URL and serves until
    Ctrl-C or SIGTERM."""
    from ..runtime import resolve_device

    address = check_address(host, port)
    fitted_config(run_dir)
    running = start_viewer(run_dir, address, resolve_device(device))
    print(running.url, flush=True)
    running.wait()
