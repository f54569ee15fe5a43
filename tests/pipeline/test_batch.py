"""`dp360 batch` on a real local Ray cluster (2 CPUs, started once for the module) with the tiny
models: fault isolation, resume after an interrupted batch, a killed worker replaced, models
loaded once per worker; and the inputs, names and folder refusals without Ray."""

from __future__ import annotations

import _thread
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from dp360.batch import (
    BATCH_LOG,
    BatchRecipe,
    ClusterSettings,
    LogBatchReporter,
    collect_inputs,
    run_batch,
    run_names,
)
from dp360.diffusion.stage import ViewSettings
from dp360.errors import Dp360Error
from dp360.panohead.stage import NoiseSettings
from dp360.prepare import PrepareSettings
from dp360.run import RunOptions

from ..conftest import ASTRONAUT, TinyWeights

VIEWS = 8
# --no-crop with both angles: the prepare stage detects nothing (no detector to load in each worker)
TINY_VIEWS = ("--until", "views", "--views", str(VIEWS), "--steps", "1", "--invert-steps", "2", "--pti-steps", "1")
TINY_VIEWS += ("--no-crop", "--yaw", "0", "--pitch", "0", "--device", "cpu")
WAIT_SECONDS = 120  # every wait on a stage of a portrait gives up after this

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module: 2 CPUs, no dashboard; the batches join it."""
    import ray

    from dp360.batch import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tiny_weights) -> TinyWeights:
    return tiny_weights(VIEWS)


def _portraits(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(ASTRONAUT, folder / f"{name}.png")) for name in names]


def _recipe(tiny: TinyWeights) -> BatchRecipe:
    """`--until views` at the tiny settings, without the PanoHead stage (faster)."""
    return BatchRecipe.until_views(
        options=RunOptions(device="cpu", progress=False),
        prepare=PrepareSettings(no_crop=True, yaw=0.0, pitch=0.0),
        views=ViewSettings(steps=1, views=VIEWS, use_3d_noise=False),
        noise=NoiseSettings(invert_steps=2, pti_steps=1, views=VIEWS),
        weights_dir=tiny.weights_dir,
        camera_dir=tiny.cameras,
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / BATCH_LOG).read_text().splitlines()]


def _stage_status(run_dir: Path, stage: str) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text())["stages"].get(stage, {}).get("status")
    except (OSError, ValueError):
        return None  # not written yet


def _when_stage_runs(run_dir: Path, stage: str, action) -> threading.Thread:
    """Call `action` (in a thread) as soon as `stage` of the run in `run_dir` is running."""

    def watch():
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if _stage_status(run_dir, stage) == "running":
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- without Ray ---------------------------------------------------------------------------------


def test_inputs_from_files_folders_patterns_and_lists(tmp_path):
    folder = tmp_path / "set"
    a, b = _portraits(folder, "a", "b")
    (folder / "notes.md").write_text("not an image")
    other = _portraits(tmp_path / "other", "a")[0]
    (tmp_path / "list.txt").write_text(f"# portraits\nset/a.png\n\n{other}\n")
    (tmp_path / "list.csv").write_text("id,path\n1,set/b.png\n2,missing.png\n")

    assert collect_inputs([folder]) == [a, b]  # the folder's images only
    assert collect_inputs([str(tmp_path / "*" / "a.png")]) == [other, a]
    assert collect_inputs([tmp_path / "list.txt", a]) == [a, other]  # each once
    assert collect_inputs([tmp_path / "list.csv"]) == [b, tmp_path / "missing.png"]  # kept: fails as its own portrait
    for bad, fragment in ((tmp_path / "nope", "does not exist"), (str(tmp_path / "*.webp"), "matches no file")):
        with pytest.raises(Dp360Error, match=fragment):
            collect_inputs([bad])

    names = run_names([a, b, other])
    assert names[str(b)] == "b" and names[str(a)].startswith("a-") and names[str(other)].startswith("a-")
    assert names[str(a)] != names[str(other)] and run_names([other, a]) == {k: names[k] for k in (str(other), str(a))}
    kept = run_names([a, other], previous={str(a): "a"})  # a name given by an earlier run stays
    assert kept[str(a)] == "a" and kept[str(other)] not in ("a", "")


def test_folders_and_settings_are_refused_before_anything_starts(cli, tmp_path):
    image = _portraits(tmp_path / "in", "a")[0]
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "run.json").write_text("{}")
    cases = [
        (("--out", foreign), "not a dp360 batch"),
        (("--out", run_folder), "run folder of one portrait"),
        (("--out", image), "is a file"),
        (("--out", tmp_path / "new", "--retries", "101"), "--retries must be"),
        (("--out", tmp_path / "new", "--steps", "0"), "--steps must be"),
        (("--out", tmp_path / "new", "--gpus-per-task", "0"), "--gpus-per-task must be"),
        (("--out", tmp_path / "new", "--device", "cpu", "--dtype", "fp16"), "fp16 is not supported"),
        (("--out", tmp_path / "new", "--device", "cpu", "--dtype", "autocast"), "needs a CUDA GPU, not cpu workers"),
        (("--out", tmp_path / "new", "--field", "splatfacto"), "--field splatfacto needs a CUDA GPU"),
        (("--out", tmp_path / "new", "--address", "127.0.0.1:1"), "Cannot reach the Ray cluster at 127.0.0.1:1"),
    ]
    for extra, fragment in cases:
        code, _, stderr = cli("batch", image, *extra, "--device", "cpu")
        text = " ".join(stderr.split())
        assert code == 2 and text.startswith("error: ") and fragment in text, (extra, stderr)
    assert sorted(path.name for path in foreign.iterdir()) == ["thesis.tex"]
    assert not (tmp_path / "new").exists()


# -- on Ray --------------------------------------------------------------------------------------


def _kill_the_run_holder(run_dir: Path, killed: list[int]):
    """SIGKILL the process that holds the run's lock (it wrote its pid there): the worker."""

    def kill():
        pid = int((run_dir / ".dp360.lock").read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    return kill


@pytest.fixture(scope="module")
def four_portraits(ray_cluster, tiny, tmp_path_factory):
    """`dp360 batch --until views` on a folder of 3 portraits and a corrupt file, 2 workers, with
    the PanoHead stage (so that both model sets are loaded); the worker running the first portrait
    is killed with SIGKILL while it makes the views."""
    from typer.testing import CliRunner

    from cli.main import app

    root = tmp_path_factory.mktemp("four")
    images = _portraits(root / "in", "ann", "bob", "cy")
    (root / "in" / "broken.png").write_bytes(ASTRONAUT.read_bytes()[:200])  # a truncated PNG
    tiny.into_cache(root / "cache")
    out = root / "batch"
    killed: list[int] = []
    watcher = _when_stage_runs(out / "ann", "views", _kill_the_run_holder(out / "ann", killed))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DP360_CACHE", str(root / "cache"))
        patch.setenv("DP360_OFFLINE", "1")
        result = CliRunner().invoke(
            app, ["batch", str(root / "in"), "--out", str(out), *tiny.args(), *TINY_VIEWS, "--json"]
        )
    watcher.join(timeout=WAIT_SECONDS)
    return images, out, result, killed


def test_one_corrupt_file_fails_alone_with_its_reason(four_portraits):
    images, out, result, _ = four_portraits
    assert result.exit_code == 2, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"done": 3, "incomplete": 0, "failed": 1, "interrupted": 0}
    by_name = {Path(run["input"]).stem: run for run in summary["runs"]}
    assert "truncated" in by_name["broken"]["error"] and by_name["broken"]["attempts"] == 1  # not retried
    for image in images:
        run = by_name[image.stem]
        assert run["status"] == "done" and (Path(run["run"]) / "views" / "007.png").is_file()
        assert Path(run["run"]) == out / image.stem
    assert sorted(line["status"] for line in _log(out)) == ["done", "done", "done", "failed"]
    assert json.loads((out / "batch.json").read_text())["runs"][str(images[0])] == images[0].stem
    assert "broken.png" in result.stderr and "1 failed" in " ".join(result.stderr.split())


def test_a_killed_worker_is_replaced_and_its_portrait_completes(four_portraits):
    _, out, _, killed = four_portraits
    assert killed, "the worker was not killed"
    (ann,) = [line for line in _log(out) if Path(line["input"]).stem == "ann"]
    assert ann["status"] == "done" and ann["attempts"] == 2 and ann["worker"]["pid"] != killed[0]
    assert ann["reused"] == ["prepare", "noise"] and set(ann["seconds"]) == {"views"}  # kept what it had finished
    manifest = json.loads((out / "ann" / "run.json").read_text())
    assert any("took over the lock" in note for note in manifest["notes"])


def test_models_are_loaded_once_per_worker(four_portraits):
    _, out, _, killed = four_portraits
    ran = [line for line in _log(out) if line["status"] == "done"]
    workers = {line["worker"]["pid"] for line in ran}
    assert killed[0] not in workers and len(workers) < len(ran)  # a worker ran several portraits
    for line in ran:  # the loads so far of the worker that ran it: each model once (the restarted
        # worker may have reused its portrait's noise, and so not have loaded PanoHead)
        loads = line["worker"]["loads"]
        assert {"back", "main"} <= set(loads) <= {"back", "main", "panohead", "lpips"} and set(loads.values()) == {1}
    assert any(len(line["worker"]["loads"]) == 4 for line in ran)


def test_an_interrupted_batch_finishes_the_rest_without_redoing_finished_stages(ray_cluster, tiny, tmp_path):
    """Ctrl-C while the second of three portraits makes its views (one worker); the rerun (two
    workers) reuses the first whole and the second's prepare stage."""
    images = _portraits(tmp_path / "in", "first", "second", "third")
    out = tmp_path / "batch"

    class InterruptDuringSecond(LogBatchReporter):
        def portrait_started(self, task, worker, pid):
            if Path(task.input).stem == "second":
                _when_stage_runs(Path(task.run_dir), "views", _thread.interrupt_main)

    with pytest.raises(KeyboardInterrupt):
        run_batch(images, out, _recipe(tiny), ClusterSettings(workers=1), InterruptDuringSecond())
    assert [(Path(line["input"]).stem, line["status"]) for line in _log(out)] == [
        ("first", "done"),
        ("second", "interrupted"),
    ]
    assert _stage_status(out / "second", "prepare") == "done"
    # running: its worker was killed; done: on a loaded machine the tiny stage can end before the
    # interrupt reaches the driver (the portrait is still recorded as interrupted)
    views_status = _stage_status(out / "second", "views")
    assert views_status in ("interrupted", "running", "done")
    second_reused = ["prepare", "views"] if views_status == "done" else ["prepare"]

    summary = run_batch(images, out, _recipe(tiny), ClusterSettings(workers=2))
    by_name = {Path(result.input).stem: result for result in summary.results}
    assert summary.counts()["done"] == 3
    assert by_name["first"].reused == ["prepare", "views"] and by_name["first"].seconds == {}
    assert by_name["second"].reused == second_reused
    assert set(by_name["second"].seconds) == ({"views"} if views_status != "done" else set())
    assert set(by_name["third"].seconds) == {"prepare", "views"}
    assert len(_log(out)) == 5  # a line per ended portrait, appended by each batch


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_dp360_batch_process_records_it_and_exits_130(tiny, tmp_path):
    """A real SIGINT to `dp360 batch` (its own local Ray), sent once the first portrait has started:
    it exited 0 after running to completion, recording nothing (issue 21). Now it stops at once (the
    worker is killed: its run's lock is free), the portrait is recorded as interrupted, exit 130."""
    import fcntl
    import subprocess
    import sys

    from dp360.batch import BATCH_MANIFEST
    from dp360.manifest import LOCK_NAME

    images = _portraits(tmp_path / "in", "first", "second")
    before = {image: image.read_bytes() for image in images}
    out = tmp_path / "batch"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    dp360 = Path(sys.executable).with_name("dp360")
    command = [dp360, "batch", tmp_path / "in", "--out", out, *TINY_VIEWS, "--no-3d-noise", "--workers", "1"]
    command += ["--weights-dir", tiny.weights_dir, "--cameras", tiny.cameras]
    process = subprocess.Popen(
        [str(part) for part in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (out / "first" / "run.json").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()[1][-2000:]
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr and "rerun the same command to resume" in stderr
    assert stopped_after < 30, stopped_after
    # "first" is running when the signal is sent; on a very slow machine it may end first, "second" is then cut
    lines = {Path(line["input"]).stem: line["status"] for line in _log(out)}
    assert list(lines.values()) in (["interrupted"], ["done", "interrupted"]), lines
    assert json.loads((out / BATCH_MANIFEST).read_text())["last"]["interrupted"] == 1
    (cut,) = [name for name, status in lines.items() if status == "interrupted"]
    assert _stage_status(out / cut, "views") != "done"
    if (out / cut / LOCK_NAME).exists() or cut == "first":  # "second" may have been cut before its run began
        with open(out / cut / LOCK_NAME, "rb") as lock:  # no worker holds the run any more
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert {image: image.read_bytes() for image in images} == before


def test_splats_are_checked_against_the_workers_device_not_this_machines():
    from dp360.batch import BatchRecipe
    from dp360.errors import Dp360Error
    from dp360.nerf.stage import FieldStageSettings

    recipe = BatchRecipe.reconstruct(field=FieldStageSettings(field="splatfacto"))
    recipe.check()  # nothing device-bound: GPU workers elsewhere may fit splats
    with pytest.raises(Dp360Error, match="--field splatfacto needs a CUDA GPU"):
        recipe.check_device("cpu")
    assert recipe.field.field == "splatfacto"  # the check did not change the recipe
