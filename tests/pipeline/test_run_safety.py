"""A run folder belongs to one run at a time and to one input; damaged manifests, filesystem
errors and bad settings end in one sentence and exit 2, before anything is written; SIGTERM
unwinds like Ctrl-C; temporaries of killed runs are removed."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dp360 import run as run_module
from dp360.errors import RunDirectoryError
from dp360.manifest import LOCK_NAME, RunLock
from dp360.pipeline.runner import LogReporter
from dp360.prepare import PrepareSettings
from dp360.run import RunOptions

from ..images import no_face

DLIB = ("--detector", "dlib")
pytestmark = pytest.mark.timeout(300)


def _assert_user_error(code, stdout, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    text = " ".join(line for line in stderr.strip().splitlines() if line.strip())
    assert text.startswith("error: ") and text.endswith("."), text
    for fragment in fragments:
        assert fragment in text, text


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A finished prepare run of the astronaut (made once; tests copy it)."""
    from ..conftest import ASTRONAUT

    out = tmp_path_factory.mktemp("prepared") / "run"
    summary = run_module.prepare(ASTRONAUT, out, PrepareSettings(detector="dlib"), RunOptions(device="cpu"))
    assert summary.status == "done"
    return out


def _copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


# -- the lock -------------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_at_once_and_left_alone(cli, tmp_path, astronaut_path, prepared_run):
    out = _copy_run(prepared_run, tmp_path / "run")
    before = _snapshot(out)
    lock = RunLock(out)
    lock.acquire()
    try:
        started = time.perf_counter()
        _assert_user_error(
            *cli("prepare", astronaut_path, "--out", out, *DLIB, "--force"), "Another dp360 run", str(os.getpid())
        )
        assert time.perf_counter() - started < 30
    finally:
        lock.release()
    assert _snapshot(out) == {**before, LOCK_NAME: b""}


def _while_a_run_holds_its_stage(image, out, attempt):
    """Start `prepare` of `image` into `out` in a thread, call `attempt()` once that run is inside
    its stage (holding the folder's lock), then let it finish. Returns the run's summary, or the
    exception it raised."""
    inside, attempted = threading.Event(), threading.Event()
    outcome: list[object] = []

    class HoldingReporter(LogReporter):
        def stage_started(self, name, description):
            inside.set()
            assert attempted.wait(120)

    def run():
        try:
            outcome.append(
                run_module.prepare(
                    image, out, PrepareSettings(detector="dlib"), RunOptions(device="cpu"), HoldingReporter()
                )
            )
        except Exception as error:  # noqa: BLE001 - returned to the test
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert inside.wait(120)
        attempt()
    finally:
        attempted.set()
        thread.join(120)
    return outcome[0]


def _refused_by_the_lock(image, out):
    with pytest.raises(RunDirectoryError, match="Another dp360 run"):
        run_module.prepare(image, out, PrepareSettings(detector="dlib"), RunOptions(device="cpu"))


def test_two_runs_started_together_one_refused_the_other_complete(tmp_path, astronaut_path):
    """Run A holds the folder inside its prepare stage while run B starts: B is refused at
    once and touches nothing; A then completes with all its files."""
    out = tmp_path / "run"
    first = _while_a_run_holds_its_stage(astronaut_path, out, lambda: _refused_by_the_lock(astronaut_path, out))
    assert first.status == "done"
    assert (out / "input.png").is_file() and (out / "prepared" / "crop.png").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_a_failing_first_run_and_a_second_run_into_the_same_new_folder(tmp_path, astronaut_path):
    """The reported data loss: run A (no face) is inside its stage when run B starts into the
    same new folder. B is refused by A's lock at once; A fails and removes only its own files;
    B, started again, completes."""
    out = tmp_path / "run"
    scene = no_face(tmp_path / "scene.png")
    first = _while_a_run_holds_its_stage(scene, out, lambda: _refused_by_the_lock(astronaut_path, out))
    assert isinstance(first, Exception) and "No face" in str(first)
    assert not out.exists()  # A leaves the new folder as it found it: absent
    summary = run_module.prepare(astronaut_path, out, PrepareSettings(detector="dlib"), RunOptions(device="cpu"))
    assert summary.status == "done" and (out / "input.png").is_file()


def test_a_lock_left_by_a_killed_process_is_taken_over(cli, tmp_path, astronaut_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from dp360.manifest import RunLock; RunLock({str(out)!r}).acquire(); print('held', flush=True); import time; time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        _assert_user_error(*cli("prepare", astronaut_path, "--out", out, *DLIB), "Another dp360 run", str(holder.pid))
    finally:
        holder.kill()
        holder.wait(30)
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", out, *DLIB, "--json")
    assert code == 0, stderr
    assert any(str(holder.pid) in note for note in json.loads(stdout)["notes"])


# -- one input per folder -------------------------------------------------------------------------


def test_another_input_is_refused_unless_forced(cli, tmp_path, astronaut_path, prepared_run):
    from PIL import Image

    out = _copy_run(prepared_run, tmp_path / "run")
    other = tmp_path / "other.png"
    Image.open(astronaut_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    before = _snapshot(out)
    _assert_user_error(*cli("prepare", other, "--out", out, *DLIB), "another input", "astronaut.png", "--force")
    assert _snapshot(out) == {**before, LOCK_NAME: b""}
    # --force replaces the run: the new input, a redone stage, and nothing left of the old one
    code, stdout, stderr = cli("prepare", other, "--out", out, *DLIB, "--force", "--json")
    assert code == 0, stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["input"]["path"].endswith("other.png")
    assert (out / "input.png").read_bytes() != before["input.png"]
    assert (out / "prepared" / "crop.png").read_bytes() != before["prepared/crop.png"]


# -- stale temporaries ----------------------------------------------------------------------------


def test_temporaries_of_a_killed_run_are_removed_and_user_files_kept(cli, tmp_path, astronaut_path, prepared_run):
    out = _copy_run(prepared_run, tmp_path / "run")
    stale = [out / ".prepared.k2j4h5g6.tmp", out / ".views.a1b2c3d4.tmp", out / "prepared" / ".crop.z9y8x7w6.tmp.png"]
    stale[0].mkdir()
    (stale[0] / "crop.png").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_bytes(b"half")
    kept = [out / "notes.tmp", out / "prepared" / "mine.txt"]
    for path in kept:
        path.write_text("user")
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", out, *DLIB, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "reused"
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "user" for path in kept)


# -- damaged manifests ----------------------------------------------------------------------------

DAMAGED_MANIFESTS = {
    "stages-list": lambda m: {**m, "stages": []},
    "stages-null": lambda m: {**m, "stages": None},
    "stages-string": lambda m: {**m, "stages": "done"},
    "outputs-list": lambda m: {
        **m,
        "stages": {"prepare": {**m["stages"]["prepare"], "outputs": ["prepared/crop.png"]}},
    },
    "record-string": lambda m: {**m, "stages": {"prepare": "done"}},
    "input-list": lambda m: {**m, "input": []},
    "top-list": lambda m: [m],
    "garbage": lambda m: "{not json",
    "deep": lambda m: "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(DAMAGED_MANIFESTS))
def test_a_damaged_manifest_is_refused_whatever_the_flags(cli, tmp_path, astronaut_path, prepared_run, case):
    """Without dp360's own record nothing in the folder can be shown to be dp360's: a damaged
    run.json is one sentence and exit 2, with or without --force, and every file stays as it was."""
    out = _copy_run(prepared_run, tmp_path / "run")
    damaged = DAMAGED_MANIFESTS[case](json.loads((out / "run.json").read_text()))
    (out / "run.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    before = _snapshot(out)
    for flags in ((), ("--force",)):
        _assert_user_error(*cli("prepare", astronaut_path, "--out", out, *DLIB, *flags), "run.json", "choose another")
        assert _snapshot(out) == before


# -- the filesystem -------------------------------------------------------------------------------


def test_out_below_a_file_is_one_sentence(cli, tmp_path, astronaut_path):
    (tmp_path / "afile").write_text("mine")
    _assert_user_error(
        *cli("prepare", astronaut_path, "--out", tmp_path / "afile" / "sub", *DLIB), "afile", "not a directory"
    )
    assert (tmp_path / "afile").read_text() == "mine"


def test_read_only_out_is_one_sentence(cli, astronaut_path):
    target = Path("/sys/dp360-run")  # sysfs refuses new folders, even to root
    _assert_user_error(*cli("prepare", astronaut_path, "--out", target, *DLIB), "dp360-run", "permissions")


def _cli_process(args, cwd, preexec_fn=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=preexec_fn,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
    )


def test_file_size_limit_is_one_sentence_and_leaves_no_folder(tmp_path, astronaut_path):
    from ..conftest import REPO

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # input.png is larger

    out = tmp_path / "run"
    process = _cli_process(["prepare", astronaut_path, "--out", out, *DLIB], REPO, preexec_fn=limit)
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith("error: ") and "ulimit" in process.stderr and "Traceback" not in process.stderr
    assert not out.exists()


def test_full_disk_is_one_sentence(tmp_path, astronaut_path):
    from ..conftest import REPO

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        process = _cli_process(["prepare", astronaut_path, "--out", mount / "run", *DLIB], REPO)
        assert process.returncode == 2, process.stderr
        assert process.stderr.startswith("error: ") and "disk space" in process.stderr
        assert "Traceback" not in process.stderr
        assert not (mount / "run").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- signals --------------------------------------------------------------------------------------


def _sigterm_inside_the_prepare_stage(astronaut_path, out, *extra) -> tuple[int, str]:
    """Run `dp360 prepare` in a subprocess whose prepare stage blocks after doing its work, send
    SIGTERM once it is inside the stage, and return (exit status, stderr)."""
    from ..conftest import REPO

    script = textwrap.dedent(
        f"""
        import sys, time
        import dp360.prepare.stage as stage
        real = stage.prepare_portrait
        def slow(*args, **kwargs):
            result = real(*args, **kwargs)
            print("in stage", flush=True)
            time.sleep(120)
            return result
        stage.prepare_portrait = slow
        from cli.main import main
        sys.argv = ["dp360", "prepare", {str(astronaut_path)!r}, "--out", {str(out)!r}, "--detector", "dlib", *{extra!r}]
        main()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "in stage"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stderr


def test_sigterm_is_handled_like_ctrl_c(tmp_path, astronaut_path):
    """SIGTERM in the middle of a first run's stage: exit 143 with a sentence, and the new folder
    left as it was found (absent), lock included."""
    out = tmp_path / "run"
    code, stderr = _sigterm_inside_the_prepare_stage(astronaut_path, out)
    assert code == 143, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_sigterm_in_a_rerun_records_the_interruption(tmp_path, astronaut_path, prepared_run):
    """SIGTERM in a rerun's stage: the stage and the run recorded as interrupted, the finished
    results kept, no temporaries left, the lock released."""
    out = _copy_run(prepared_run, tmp_path / "run")
    code, stderr = _sigterm_inside_the_prepare_stage(astronaut_path, out, "--force")
    assert code == 143, stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stages"]["prepare"]["status"] == "interrupted"
    assert (out / "prepared" / "crop.png").read_bytes() == (prepared_run / "prepared" / "crop.png").read_bytes()
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]
    lock = RunLock(out)
    lock.acquire()  # released by the interrupted run
    lock.release()


# -- settings are checked before anything is written ------------------------------------------------

BAD_SETTINGS = [
    ("views", ("--views", "0"), "--views"),
    ("views", ("--views", "-1"), "--views"),
    ("views", ("--views", "7"), "from 8 to 128"),
    ("views", ("--views", "1000"), "from 8 to 128"),
    ("views", ("--steps", "0"), "--steps"),
    ("views", ("--steps", "100000"), "--steps"),
    ("views", ("--steps", "1000"), "from 1 to 999"),
    ("views", ("--guidance", "nan"), "--guidance"),
    ("views", ("--guidance", "inf"), "--guidance"),
    ("views", ("--eta", "nan"), "--eta"),
    ("views", ("--eta", "2"), "--eta"),
    ("views", ("--back-camera", "99"), "--back-camera"),
    ("views", ("--seed", "-1"), "--seed"),
    ("views", ("--seed", str(2**64)), "--seed"),
    ("views", ("--invert-steps", "-1"), "--invert-steps"),
    ("views", ("--pti-steps", "-1"), "--pti-steps"),
    ("views", ("--dtype", "fp16", "--device", "cpu"), "fp16"),
    ("views", ("--dtype", "autocast", "--device", "cpu"), "--dtype autocast runs float32 weights under CUDA's"),
    ("reconstruct", ("--dtype", "autocast", "--device", "cpu"), "needs a CUDA GPU, not cpu"),
    ("views", ("--yaw", "nan"), "--yaw"),
    ("prepare", ("--yaw", "inf"), "--yaw"),
    ("prepare", ("--pitch", "nan"), "--pitch"),
    ("prepare", ("--pitch", "1000"), "--pitch"),
    ("prepare", ("--face-index", "-1"), "--face-index"),
    ("prepare", ("--max-pixels", "10"), "--max-pixels"),
    ("reconstruct", ("--fit-iterations", "0"), "--fit-iterations"),
    ("reconstruct", ("--fit-iterations", "-1"), "--fit-iterations"),
    ("reconstruct", ("--seed", "-1"), "--seed"),
    ("reconstruct", ("--views", "7"), "--views"),
    ("reconstruct", ("--elevation", "nan"), "--elevation"),
    ("reconstruct", ("--frames", "0"), "--frames"),
    ("reconstruct", ("--mesh-faces", "1"), "--mesh-faces"),
]


@pytest.mark.parametrize(
    ("command", "options", "fragment"), BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v
)
def test_bad_settings_are_refused_before_any_work(
    cli, tmp_path, astronaut_path, offline_cache, command, options, fragment
):
    out = tmp_path / "run"
    _assert_user_error(*cli(command, astronaut_path, "--out", out, *DLIB, *options), fragment)
    assert not out.exists()
    assert not list(offline_cache.rglob("*"))  # no camera images rendered, no weights read


@pytest.mark.parametrize(
    ("options", "fragment"),
    [(("--radius", "nan"), "--radius"), (("--radius", "inf"), "--radius"), (("--frames", "0"), "--frames")],
)
def test_bad_render_settings_are_refused_before_loading(cli, tmp_path, options, fragment):
    _assert_user_error(*cli("render", tmp_path / "missing-run", "--out", tmp_path / "t.mp4", *options), fragment)
    assert not (tmp_path / "t.mp4").exists()


def test_bad_mesh_density_is_refused(cli, tmp_path):
    _assert_user_error(*cli("export", tmp_path / "missing-run", "--mesh-density", "nan"), "--mesh-density")


HELP_RANGES = [
    ("views", "--views", "8 to 128"),
    ("views", "--steps", "1 to 999"),
    ("views", "--guidance", "1 to 30"),
    ("views", "--eta", "0 to 1"),
    ("views", "--seed", "0 to 4294967295"),
    ("views", "--invert-steps", "0 to 10000"),
    ("prepare", "--yaw", "-180 to 180"),
    ("prepare", "--pitch", "-89 to 89"),
    ("prepare", "--max-pixels", "1e6 to 1e9"),
    ("reconstruct", "--fit-iterations", "1 to 1000000"),
    ("reconstruct", "--frames", "1 to 10000"),
    ("render", "--radius", "0.6 to 100"),
]


@pytest.mark.parametrize(("command", "option", "text"), HELP_RANGES, ids=lambda v: v)
def test_help_states_the_ranges(command, option, text):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    line = next(line for line in result.stdout.splitlines() if f"{option} " in line)
    assert text in line, line


def test_an_interrupted_batch_says_what_finished_and_how_to_resume(cli, tmp_path, monkeypatch, astronaut_path):
    """Ctrl-C during the second of three portraits: exit 130, the finished one named, and the
    command to resume."""
    import shutil

    images = [shutil.copy(astronaut_path, tmp_path / f"{name}.png") for name in ("first", "second", "third")]
    calls = []

    def fake_reconstruct(image, target, *args, **kwargs):
        calls.append(Path(image).stem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_module.RunSummary(Path(target), "done", {}, {})

    monkeypatch.setattr(run_module, "reconstruct", fake_reconstruct)
    code, _, stderr = cli("reconstruct", *images, "--out", tmp_path / "out", *DLIB)
    assert code == 130 and calls == ["first", "second"]
    text = " ".join(stderr.split())
    assert "interrupted during" in text and "second.png" in text
    assert "1 of 3 portraits had finished" in text and str(tmp_path / "out" / "first") in text
    assert "1 not started" in text and "rerun the same command" in text


def test_export_into_a_run_is_refused_while_a_run_holds_it(cli, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        _assert_user_error(*cli("export", run_dir, "--device", "cpu"), "Another dp360 run")
    finally:
        lock.release()
    assert not (run_dir / "export").exists()
