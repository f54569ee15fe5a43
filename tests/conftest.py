"""Shared fixtures. Tests run offline on CPU: downloads are disabled and the dp360 cache is a
temporary folder, so nothing outside the test's own files is read or written."""

from __future__ import annotations

import os

# One compute thread per test process (subprocesses inherit it): `make test` runs two workers on
# two cores, and on a busy machine extra OpenMP threads only spin-wait for each other (a fit ran
# 1.4x slower with two threads than with one beside two CPU-bound processes).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import signal  # noqa: E402

# A suite started in the background (`make test &` in a script) inherits SIGINT ignored, and so
# would every dp360 process a test starts: the Ctrl-C tests would then see no interrupt at all.
# Python's own handler restores the behaviour of a terminal (children get the default again).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = REPO / "assets" / "astronaut.png"


def tiny_reconstruct_settings(fit_iterations: int, *extra: str) -> tuple[str, ...]:
    """`dp360 reconstruct` options for a tiny run on the CPU (2 denoising steps, a short inversion
    and fit, a 4-frame 32 px turntable, a 32^3 mesh with a 64 px texture), with a --json summary."""
    return (
        *("--detector", "dlib", "--device", "cpu", "--steps", "2", "--invert-steps", "2", "--pti-steps", "1"),
        *("--fit-preset", "test", "--fit-iterations", str(fit_iterations), "--frames", "4", "--resolution", "32"),
        *("--mesh-resolution", "32", "--mesh-faces", "2000", "--texture-size", "64", "--json"),
        *extra,
    )


@pytest.fixture(autouse=True)
def offline_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("dp360-cache")
    monkeypatch.setenv("DP360_CACHE", str(cache))
    monkeypatch.setenv("DP360_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DP360_FACEXLIB_DIR", raising=False)
    return cache


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return ASTRONAUT


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def roomy_disk(monkeypatch):
    """`dp360 doctor` FAILs when the disk cannot hold the missing weights (~40 GB): tests that
    need its other checks must not depend on this machine's free space."""
    import shutil

    from dp360 import doctor

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage._replace(free=500 * 2**30))


class TinyWeights:
    """Every tiny weight file a test needs, written once through the real converters: the
    official-layout checkpoints (`checkpoints["main"]`, `["back"]`) and their bundles (`bundles`),
    the PanoHead pickle and its converted generator, a random perceptual backbone, the
    camera-condition images, and a `--weights-dir` folder linking the bundles and the generator:
    what a tiny run reads instead of the real weights. Tests get it from `tiny_weights(view_count)`."""

    def __init__(self, root: Path, view_count: int):
        from dp360.diffusion.models.tiny import write_tiny_bundles
        from dp360.panohead.perceptual import VGG16_FILE, write_random_backbone
        from dp360.panohead.tiny import write_tiny_panohead

        self.root = Path(root)
        self.bundles = write_tiny_bundles(self.root / "bundles", view_count=view_count)
        self.checkpoints = {kind: self.root / "bundles" / f"{kind}.th" for kind in ("main", "back")}
        self.panohead = write_tiny_panohead(self.root / "panohead")
        self.panohead_pickle = self.root / "panohead" / "tiny-panohead.pkl"
        self.weights_dir = self.root / "weights"
        self.weights_dir.mkdir()
        for kind in ("main", "back"):
            (self.weights_dir / f"{kind}-fp32").symlink_to(self.bundles[kind], target_is_directory=True)
        (self.weights_dir / "panohead").symlink_to(self.panohead, target_is_directory=True)
        self.cameras = self.bundles["cameras"]
        self.backbone = write_random_backbone(self.root / VGG16_FILE)

    def args(self) -> tuple[str, ...]:
        return ("--weights-dir", str(self.weights_dir), "--cameras", str(self.cameras))

    def into_cache(self, cache: Path) -> None:
        """Link the perceptual backbone where the noise stage looks for it in dp360's cache `cache`."""
        from dp360.panohead.perceptual import VGG16_FILE

        link = Path(cache) / "perceptual" / VGG16_FILE
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(self.backbone)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """`tiny_weights(view_count)`: the module's TinyWeights for that view count (8 or 32), made once."""
    made: dict[int, TinyWeights] = {}

    def get(view_count: int) -> TinyWeights:
        if view_count not in made:
            made[view_count] = TinyWeights(tmp_path_factory.mktemp(f"tiny-weights-{view_count}"), view_count)
        return made[view_count]

    return get


def shared_session_folder(tmp_path_factory) -> Path:
    """A folder all xdist workers of this session share (the session's own one without xdist), for
    fixtures that are made once per session rather than once per worker (under a FileLock)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """The synthetic head's views (48 px) and a field fitted to them on the CPU (the "test" preset,
    250 iterations): (views folder, nerf folder, the fit's summary). Read it only; copy to change.
    Fitted once per session, whichever worker asks first (the seeded CPU fit is deterministic)."""
    import json

    from filelock import FileLock

    from dp360.nerf import synthetic

    shared = shared_session_folder(tmp_path_factory)
    root, done = shared / "fitted-field", shared / "fitted-field.json"
    with FileLock(str(shared / "fitted-field.lock")):
        if not done.is_file():
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            views, nerf, summary = synthetic.write_fitted_run(root, size=48, iterations=250)
            done.write_text(json.dumps({"views": str(views), "nerf": str(nerf), "summary": summary}))
    record = json.loads(done.read_text())
    return Path(record["views"]), Path(record["nerf"]), record["summary"]
