"""The command line: bad input gives one sentence, a non-zero exit and nothing on disk;
runs resume; help texts read; doctor works without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ..conftest import REPO
from ..images import no_face, png_with_size, truncated_copy

DLIB = ("--detector", "dlib")


def _without_weights(tmp_path):
    """Weights and camera images from the user's (empty) folders: nothing is fetched, the stages
    that need them are not available, and the run is incomplete."""
    return ("--weights-dir", tmp_path / "no-weights", "--cameras", tmp_path / "no-cameras")


def _assert_user_error(code, stdout, stderr, *fragments):
    assert code != 0
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error: ") and text.endswith(".")
    for fragment in fragments:
        assert fragment in text


def _written(path, data):
    path.write_bytes(data)
    return path


def _saved(path, image):
    image.save(path)
    return path


BAD_INPUTS = {
    "missing": (lambda d, a: d / "missing.png", "does not exist"),
    "folder": (lambda d, a: d, "is a folder"),
    "empty": (lambda d, a: _written(d / "empty.jpg", b""), "empty file"),
    "text": (lambda d, a: _written(d / "notes.png", b"hello\n" * 50), "not an image file"),
    "zero-size": (lambda d, a: png_with_size(d / "zero.png", 0, 0), "cannot be decoded"),
    "truncated": (lambda d, a: truncated_copy(a, d / "cut.png"), "truncated"),
    "tiny": (lambda d, a: _saved(d / "tiny.png", Image.new("RGB", (64, 64))), "at least 128 px"),
    "no-face": (lambda d, a: no_face(d / "scene.png"), "--no-crop"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["prepare", "reconstruct"])
def test_bad_input_is_one_sentence_and_writes_nothing(cli, tmp_path, astronaut_path, case, command):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make, fragment = BAD_INPUTS[case]
    path = make(inputs, astronaut_path)
    out = tmp_path / "run"
    extra = _without_weights(tmp_path) if command == "reconstruct" else ()
    code, stdout, stderr = cli(command, path, "--out", out, *DLIB, *extra)
    _assert_user_error(code, stdout, stderr, fragment)
    assert not out.exists()


def test_bad_input_in_a_real_process(tmp_path):
    """The installed console script: exit status 2, one line, no traceback, no output folder."""
    (tmp_path / "bad.png").write_text("not pixels")
    process = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "dp360"),
            "prepare",
            str(tmp_path / "bad.png"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0 and process.stderr.startswith("error: ")
    assert "Traceback" not in process.stderr and not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file_or_foreign(cli, tmp_path, astronaut_path):
    (tmp_path / "file").write_text("x")
    _assert_user_error(*cli("prepare", astronaut_path, "--out", tmp_path / "file", *DLIB), "is a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    _assert_user_error(*cli("prepare", astronaut_path, "--out", foreign, *DLIB), "not a dp360 run")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_bad_options(cli, tmp_path, astronaut_path):
    _assert_user_error(*cli("prepare", astronaut_path, "--out", tmp_path / "o", "--device", "tpu"), "Unknown device")
    if not torch.cuda.is_available():
        _assert_user_error(
            *cli("prepare", astronaut_path, "--out", tmp_path / "o", "--device", "cuda:0"), "CUDA is not available"
        )
    _assert_user_error(
        *cli("prepare", astronaut_path, "--out", tmp_path / "o", "--face-index", "3", *DLIB), "out of range"
    )
    assert not (tmp_path / "o").exists()
    code, _, stderr = cli("prepare", astronaut_path, "--out", tmp_path / "o", "--detector", "yolo")
    assert code == 2 and "yolo" in stderr


def test_prepare_writes_layout_and_resumes(cli, tmp_path, astronaut_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", out, *DLIB, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "done" and summary["stages"]["prepare"]["last_run"] == "ran"
    for rel in ("input.png", "run.json", "prepared/crop.png", "prepared/dataset.json", "prepared/overlay.png"):
        assert (out / rel).is_file(), rel
    assert Image.open(out / "prepared" / "crop.png").size == (512, 512)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["seed"] == 42
    assert manifest["input"]["sha256"] and manifest["environment"]["packages"]["torch"]
    assert manifest["environment"]["device"] == "cpu" and manifest["environment"]["dtype"] == "fp32"
    stage = manifest["stages"]["prepare"]
    assert (
        stage["settings"]["detector"] == "dlib"
        and stage["seconds"] > 0
        and stage["inputs"]["input"] == manifest["input"]["sha256"]
    )
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporaries left behind

    crop_mtime = (out / "prepared" / "crop.png").stat().st_mtime_ns
    code, stdout, _ = cli("prepare", astronaut_path, "--out", out, *DLIB, "--json")
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "reused"
    assert (out / "prepared" / "crop.png").stat().st_mtime_ns == crop_mtime

    # Changed settings, --force, or a damaged output each redo the stage.
    code, stdout, _ = cli("prepare", astronaut_path, "--out", out, *DLIB, "--yaw", "10", "--json")
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "ran"
    code, stdout, _ = cli("prepare", astronaut_path, "--out", out, *DLIB, "--yaw", "10", "--json")
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "reused"
    code, stdout, _ = cli("prepare", astronaut_path, "--out", out, *DLIB, "--yaw", "10", "--json", "--force")
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "ran"
    (out / "prepared" / "overlay.png").unlink()
    code, stdout, _ = cli("prepare", astronaut_path, "--out", out, *DLIB, "--yaw", "10", "--json")
    assert json.loads(stdout)["stages"]["prepare"]["last_run"] == "ran" and (out / "prepared" / "overlay.png").is_file()


def test_failed_rerun_keeps_the_finished_stage(cli, tmp_path, astronaut_path):
    out = tmp_path / "run"
    assert cli("prepare", astronaut_path, "--out", out, *DLIB)[0] == 0
    before = (out / "prepared" / "crop.png").read_bytes()
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", out, *DLIB, "--face-index", "4")
    _assert_user_error(code, stdout, stderr, "out of range")
    assert (out / "prepared" / "crop.png").read_bytes() == before
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["prepare"]["status"] == "failed"
    assert "out of range" in manifest["stages"]["prepare"]["error"]


def test_reconstruct_runs_what_exists_and_lists_the_rest(cli, tmp_path, astronaut_path):
    out = tmp_path / "head"
    code, stdout, stderr = cli(
        "reconstruct", astronaut_path, "--out", out, *DLIB, *_without_weights(tmp_path), "--json", "--seed", "7"
    )
    # No turntable and no mesh: the promise of `reconstruct` is not kept, so exit 3 (not 2: no bad input),
    # with each stage that did not run, its reason, and the commands that fix it.
    assert code == 3, stderr
    text = " ".join(stderr.split())
    assert "not run views:" in text and "dp360 weights download main" in text and "dp360 weights convert main" in text
    assert "not run noise:" in text and "dp360 weights download panohead" in text
    assert "incomplete: no render or export results" in text and "rerun the same command" in text
    summary = json.loads(stdout)
    assert summary["status"] == "incomplete"
    assert summary["stages"]["prepare"]["status"] == "done"
    missing = [name for name, stage in summary["stages"].items() if stage["status"] == "not_available"]
    assert missing == ["noise", "views", "fit", "render", "export", "consistency"]
    assert any("not run" in note for note in summary["notes"])
    assert json.loads((out / "run.json").read_text())["seed"] == 7


def test_reconstruct_several_inputs_reports_failures_and_keeps_the_rest(cli, tmp_path, astronaut_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    code, stdout, stderr = cli(
        "reconstruct", astronaut_path, bad, "--out", tmp_path / "out", *DLIB, *_without_weights(tmp_path), "--json"
    )
    assert code == 2 and "bad.png" in stderr and "Traceback" not in stderr
    runs = json.loads(stdout)["runs"]
    assert runs[0]["status"] == "incomplete" and runs[1]["status"] == "failed"
    assert "0 done, 1 incomplete, 1 failed of 2 portraits" in " ".join(stderr.split())
    assert (tmp_path / "out" / "astronaut" / "prepared" / "crop.png").is_file()
    assert not (tmp_path / "out" / "bad").exists()


def test_a_batch_of_incomplete_runs_exits_3_and_counts_them(cli, tmp_path, astronaut_path):
    import shutil

    images = [shutil.copy(astronaut_path, tmp_path / f"{name}.png") for name in ("a", "b")]
    code, _, stderr = cli("reconstruct", *images, "--out", tmp_path / "out", *DLIB, *_without_weights(tmp_path))
    text = " ".join(stderr.split())
    assert code == 3 and "0 done, 2 incomplete, 0 failed of 2 portraits" in text
    assert "not run views:" in text and "dp360 weights download main" in text


def test_quiet_prints_nothing(cli, tmp_path, astronaut_path):
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", tmp_path / "q", *DLIB, "--quiet")
    assert code == 0 and stdout == "" and stderr == ""


def test_help_texts(cli):
    code, stdout, _ = cli("--help")
    assert code == 0 and "360" in stdout
    for command in ("prepare", "reconstruct", "doctor"):
        assert command in stdout
        code, text, _ = cli(command, "--help")
        assert code == 0 and "Usage" in text and len(text.splitlines()) > 5
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout.startswith("dp360 ")


def test_doctor_runs_without_gpu(cli, roomy_disk):
    code, stdout, stderr = cli("doctor", "--json")
    checks = {check["name"]: check for check in json.loads(stdout)}
    assert code == 0, stderr
    assert {"python", "torch", "gpu", "packages", "opencv", "face detectors", "weight cache", "disk", "video"} <= set(
        checks
    )
    assert checks["video"]["status"] == "OK" and checks["packages"]["status"] == "OK"
    if not torch.cuda.is_available():
        assert checks["gpu"]["status"] == "WARN" and checks["gpu"]["advice"]
    code, _, stderr = cli("doctor")
    assert code == 0 and len([line for line in stderr.splitlines() if line[:4] in ("OK  ", "WARN", "FAIL")]) >= 9


def test_readme_commands_exist():
    readme = (REPO / "README.md").read_text()
    assert "make example" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_failure_in_an_empty_existing_folder_leaves_it_empty(cli, tmp_path):
    out = tmp_path / "made-by-user"
    out.mkdir()
    _assert_user_error(*cli("prepare", no_face(tmp_path / "scene.png"), "--out", out, *DLIB), "--no-crop")
    assert out.is_dir() and list(out.iterdir()) == []


WEIGHT_NAMES = ("main", "back", "panohead", "data", "perceptual")


def test_doctor_names_each_missing_weight_file_and_the_command_that_fetches_it(cli, offline_cache, roomy_disk):
    code, stdout, stderr = cli("doctor", "--json")
    assert code == 0, stderr
    checks = {check["name"]: check for check in json.loads(stdout)}
    for name in WEIGHT_NAMES:
        check = checks[f"weights {name}"]
        assert check["status"] == "WARN" and "missing" in check["detail"], check
        assert f"dp360 weights download {name}" in check["advice"]
    assert "GB" in checks["weights main"]["detail"]
    # A converted bundle in the cache turns its line OK, and only its line.
    from dp360.diffusion.models.tiny import write_tiny_bundles

    bundles = write_tiny_bundles(offline_cache / "tiny", view_count=8)
    (offline_cache / "bundles").mkdir()
    (offline_cache / "bundles" / "main-fp32").symlink_to(bundles["main"], target_is_directory=True)
    checks = {check["name"]: check for check in json.loads(cli("doctor", "--json")[1])}
    assert checks["weights main"]["status"] == "OK"
    assert all(checks[f"weights {name}"]["status"] == "WARN" for name in WEIGHT_NAMES[1:])


def test_doctor_fails_when_the_disk_cannot_hold_the_missing_weights(monkeypatch):
    import shutil

    from dp360 import doctor

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage._replace(free=5 * 2**30))
    check = doctor.check_disk()
    assert check.status == "FAIL" and "DP360_CACHE" in check.advice and "need" in check.detail
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage._replace(free=500 * 2**30))
    assert doctor.check_disk().status == "OK"


def test_doctor_prints_brackets_literally(cli, roomy_disk):
    code, _, stderr = cli("doctor")
    assert code == 0 and "[empty]" in stderr  # the empty cache's listing, not swallowed as markup
