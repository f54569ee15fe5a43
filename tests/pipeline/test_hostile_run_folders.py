"""What a run folder holds cannot turn dp360 against its user (issue 21): nothing is written,
removed or locked through a symbolic link planted in a run, a folder is taken for a run only when
its run.json carries dp360's own mark, and `--force` replaces only what dp360's record lists.

Each case asserts the exit status, one error sentence, and byte-identical user files; the
mutation checks at the end show that, with the guard turned off, the same plants destroy them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dp360 import manifest as manifest_module
from dp360 import run as run_module
from dp360.manifest import LOCK_NAME, MANIFEST_FORMAT, RunLock, check_no_links, new_manifest
from dp360.pipeline import runner as runner_module
from dp360.prepare import PrepareSettings
from dp360.run import RunOptions

DLIB = ("--detector", "dlib")
pytestmark = pytest.mark.timeout(300)


def _assert_user_error(code, stdout, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    text = " ".join(line for line in stderr.strip().splitlines() if line.strip())
    assert text.startswith("error: ") and text.endswith("."), text
    assert text.count("error: ") == 1, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links not followed) with its bytes; a link as its target."""
    found = {}
    for where, dirs, names in os.walk(folder):
        for name in [*names, *(d for d in dirs if Path(where, d).is_symlink())]:
            path = Path(where) / name
            key = path.relative_to(folder).as_posix()
            found[key] = ("-> " + os.readlink(path)).encode() if path.is_symlink() else path.read_bytes()
    return found


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A finished prepare run of the astronaut (made once; tests copy it)."""
    from ..conftest import ASTRONAUT

    out = tmp_path_factory.mktemp("prepared") / "run"
    summary = run_module.prepare(ASTRONAUT, out, PrepareSettings(detector="dlib"), RunOptions(device="cpu"))
    assert summary.status == "done"
    return out


@pytest.fixture
def run(tmp_path, prepared_run) -> Path:
    return Path(shutil.copytree(prepared_run, tmp_path / "run", symlinks=True))


@pytest.fixture
def mine(tmp_path) -> Path:
    """The user's own folder, with files a run must never touch."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "diary.txt").write_text("dear diary\n")
    (folder / "report.html").write_text("<p>my own report</p>\n")
    (folder / "head.glb").write_bytes(b"my own mesh")
    (folder / "crop.png").write_bytes(b"my own crop")
    return folder


def _plant(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())


# -- 1. the lock ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--force",)])
def test_a_lock_planted_as_a_link_to_a_user_file_is_refused_and_the_file_kept(cli, run, mine, astronaut_path, flags):
    _plant(run / LOCK_NAME, mine / "diary.txt")
    before, run_before = _snapshot(mine), _snapshot(run)
    _assert_user_error(*cli("prepare", astronaut_path, "--out", run, *DLIB, *flags), LOCK_NAME, "link")
    assert _snapshot(mine) == before and _snapshot(run) == run_before


def test_a_lock_planted_as_a_hard_link_is_refused(cli, run, mine, astronaut_path):
    (run / LOCK_NAME).unlink()
    os.link(mine / "diary.txt", run / LOCK_NAME)
    before = _snapshot(mine)
    _assert_user_error(*cli("prepare", astronaut_path, "--out", run, *DLIB, "--force"), LOCK_NAME)
    assert _snapshot(mine) == before


def test_the_lock_is_never_opened_through_a_link(tmp_path, mine):
    (tmp_path / LOCK_NAME).symlink_to(mine / "diary.txt")
    lock = RunLock(tmp_path)
    for attempt in (lock.acquire, lock.check_free):
        with pytest.raises(run_module.RunDirectoryError, match="not dp360's lock file"):
            attempt()
    assert (mine / "diary.txt").read_text() == "dear diary\n" and not lock.held


def test_a_lock_held_for_an_instant_by_a_check_is_not_a_refusal(tmp_path):
    """Two runs started together: one's `check_free` holds the lock for an instant while the other
    takes it; the taker waits that instant out instead of refusing (and exiting)."""
    import fcntl
    import threading

    (tmp_path / LOCK_NAME).write_text("")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.1, os.close, (fd,)).start()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()


# -- 1. stage folders, outputs and export/ planted as links ---------------------------------------

PLANTS = {
    "prepared": ("prepared", "."),
    "views": ("views", "."),
    "nerf": ("nerf", "."),
    "export": ("export", "."),
    "input.png": ("input.png", "crop.png"),
    "run.json": ("run.json", "diary.txt"),
    "prepared/crop.png": ("prepared/crop.png", "crop.png"),
}


@pytest.mark.parametrize("flags", [(), ("--force",)])
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_prepare_refuses_a_planted_link(cli, run, mine, astronaut_path, plant, flags):
    where, target = PLANTS[plant]
    _plant(run / where, (mine / target).resolve())
    before, run_before = _snapshot(mine), _snapshot(run)
    _assert_user_error(*cli("prepare", astronaut_path, "--out", run, *DLIB, *flags), "link")
    assert _snapshot(mine) == before and _snapshot(run) == run_before


@pytest.mark.parametrize("flags", [(), ("--force",)])
def test_reconstruct_refuses_a_planted_stage_folder(cli, run, mine, astronaut_path, flags):
    _plant(run / "views", mine)
    before = _snapshot(mine)
    _assert_user_error(*cli("reconstruct", astronaut_path, "--out", run, *DLIB, "--device", "cpu", *flags), "link")
    assert _snapshot(mine) == before


@pytest.mark.parametrize("flags", [(), ("--force",)])
def test_fit_refuses_a_planted_stage_folder(cli, run, mine, tmp_path, flags):
    from dp360.nerf import synthetic

    views = synthetic.write_views(tmp_path / "views", size=24, view_count=8)
    _plant(run / "nerf", mine)
    before = _snapshot(mine)
    _assert_user_error(*cli("fit", views, "--out", run, "--device", "cpu", *flags), "link")
    assert _snapshot(mine) == before


@pytest.mark.parametrize("plant", ["export", "export/report.html"])
def test_report_refuses_a_planted_export_folder_or_page(cli, run, mine, plant):
    _plant(run / plant, mine if plant == "export" else mine / "report.html")
    before = _snapshot(mine)
    _assert_user_error(*cli("report", run), "link")
    assert _snapshot(mine) == before


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
@pytest.mark.parametrize("plant", ["export", "export/head.glb"])
def test_export_refuses_a_planted_export_folder_or_mesh(cli, run, mine, plant, flags):
    _plant(run / plant, mine if plant == "export" else mine / "head.glb")
    before = _snapshot(mine)
    _assert_user_error(*cli("export", run, "--device", "cpu", *flags), "link")
    assert _snapshot(mine) == before


@pytest.mark.parametrize("command", ["render", "export"])
def test_an_out_file_that_is_a_link_is_refused_even_with_overwrite(cli, run, mine, tmp_path, command):
    link = tmp_path / ("spin.mp4" if command == "render" else "m.glb")
    link.symlink_to(mine / "head.glb")
    before = _snapshot(mine)
    _assert_user_error(*cli(command, run, "--out", link, "--overwrite", "--device", "cpu"), "symbolic link")
    assert _snapshot(mine) == before and link.is_symlink()


def test_a_stage_folder_resolving_outside_the_run_is_refused(tmp_path, mine):
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    with pytest.raises(run_module.RunDirectoryError, match="symbolic link"):
        _plant(run_dir / "export" / "sub", mine)
        check_no_links(run_dir, folders=("export/sub",))
    check_no_links(run_dir, folders=("export",), files=("export/missing.glb",))  # missing: fine


# -- 2. a run folder is one dp360 can show it made ------------------------------------------------


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A user's folder that happens to hold a run.json of the old shape, and stage-like folders."""
    folder = tmp_path / "project"
    for rel, text in {
        "run.json": json.dumps({"stages": {}}),
        "prepared/mine.txt": "mine",
        "views/000.png": "my view",
        "export/head.glb": "my mesh",
        "input.png": "my input",
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


RUN_JSONS = {
    "stages-only": {"stages": {}},
    "another-input": {"stages": {}, "input": {"path": "other.png", "sha256": "0" * 64}},
    "old-format": {"format": 1, "dp360_version": "0.1.0", "stages": {}},
    "wrong-format": {**new_manifest(), "format": "someone-else"},
    "bad-run-id": {**new_manifest(), "run_id": "../../etc"},
}


@pytest.mark.parametrize("flags", [(), ("--force",)])
@pytest.mark.parametrize("case", sorted(RUN_JSONS))
def test_a_folder_whose_run_json_dp360_did_not_write_is_refused_whatever_the_flags(
    cli, user_folder, astronaut_path, case, flags
):
    (user_folder / "run.json").write_text(json.dumps(RUN_JSONS[case]))
    before = _snapshot(user_folder)
    _assert_user_error(*cli("prepare", astronaut_path, "--out", user_folder, *DLIB, *flags), "run.json")
    assert _snapshot(user_folder) == before
    _assert_user_error(*cli("report", user_folder), "run.json")
    _assert_user_error(*cli("export", user_folder, "--overwrite", "--device", "cpu"), "run.json")
    assert _snapshot(user_folder) == before


@pytest.mark.parametrize("case", sorted(RUN_JSONS))
def test_eval_refuses_a_folder_whose_run_json_dp360_did_not_write(cli, user_folder, case):
    """`dp360 eval RUN` writes RUN/eval/: a user's folder with a run.json (and views) is not a run."""
    (user_folder / "run.json").write_text(json.dumps(RUN_JSONS[case]))
    (user_folder / "views" / "transforms.json").write_text(json.dumps({"frames": []}))
    before = _snapshot(user_folder)
    text = _assert_user_error(
        *cli("eval", user_folder, "--device", "cpu"),
        f"'{user_folder}' is not a dp360 run: its run.json was not written by dp360",
        "dp360 eval writes nothing into it",
    )
    assert "no views yet" not in text
    assert _snapshot(user_folder) == before


def test_eval_takes_a_folder_with_dp360s_own_run_json_for_a_run(cli, run):
    """The same check lets dp360's own run through (this prepared run has no views yet)."""
    _assert_user_error(*cli("eval", run, "--device", "cpu"), f"Run '{run}' has no views yet")


def test_a_run_json_is_dp360s_own_and_keeps_its_id(run, astronaut_path):
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["format"] == "dp360-run" and manifest["format_version"] == MANIFEST_FORMAT
    assert isinstance(manifest["dp360_version"], str) and len(manifest["run_id"]) == 32
    run_module.prepare(astronaut_path, run, PrepareSettings(detector="dlib"), RunOptions(device="cpu", force=True))
    assert json.loads((run / "run.json").read_text())["run_id"] == manifest["run_id"]


def test_force_replaces_only_what_the_record_lists_and_names_the_rest(cli, run, tmp_path, astronaut_path):
    """Another input with --force: dp360's own outputs are replaced; the user's files in the stage
    folders (and their own folders there) stay byte-identical and are named in a note."""
    from PIL import Image

    other = tmp_path / "other.png"
    Image.open(astronaut_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    users = {"prepared/mine.txt": "mine", "prepared/notes/a.txt": "a", "views/keep.png": "my view"}
    for rel, text in users.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    crop = (run / "prepared" / "crop.png").read_bytes()
    code, stdout, stderr = cli("prepare", other, "--out", run, *DLIB, "--force", "--json")
    assert code == 0, stderr
    assert all((run / rel).read_text() == text for rel, text in users.items())
    assert (run / "prepared" / "crop.png").read_bytes() != crop
    notes = " ".join(json.loads(stdout)["notes"])
    assert "prepared/mine.txt" in notes and "views/keep.png" in notes
    manifest = json.loads((run / "run.json").read_text())
    assert not any("mine.txt" in rel for rel in manifest["stages"]["prepare"]["outputs"])


# -- 5. wrong messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "fmt"), [("m.obj", "ply"), ("m.glb", "obj"), ("m.ply", "glb")], ids=["obj-ply", "glb-obj", "ply-glb"]
)
def test_export_refuses_an_out_name_naming_another_format(cli, run, tmp_path, out, fmt):
    _assert_user_error(*cli("export", run, "--out", tmp_path / out, "--format", fmt, "--device", "cpu"), "--format")
    assert not (tmp_path / out).exists()


def test_render_refuses_an_out_name_naming_another_format(cli, run, tmp_path):
    _assert_user_error(*cli("render", run, "--out", tmp_path / "t.mp4", "--format", "gif"), "--format")
    assert not (tmp_path / "t.mp4").exists()


# -- mutation checks: with the guards off, the same plants destroy the user's files ---------------


def test_mutation_without_nofollow_the_planted_lock_truncates_the_users_file(monkeypatch, run, mine, astronaut_path):
    monkeypatch.setattr(manifest_module, "LOCK_OPEN_FLAGS", os.O_RDWR | os.O_CREAT)
    for module in (runner_module, manifest_module):
        monkeypatch.setattr(module, "check_no_links", lambda *args, **kwargs: None)
    _plant(run / LOCK_NAME, mine / "diary.txt")
    run_module.prepare(astronaut_path, run, PrepareSettings(detector="dlib"), RunOptions(device="cpu"))
    assert (mine / "diary.txt").read_text() != "dear diary\n"  # the guarded test above would fail


def test_mutation_without_the_link_check_report_replaces_the_users_page(cli, monkeypatch, run, mine):
    for module in (runner_module, manifest_module):
        monkeypatch.setattr(module, "check_no_links", lambda *args, **kwargs: None)
    _plant(run / "export", mine)
    code, _, stderr = cli("report", run)
    assert code == 0, stderr
    assert (mine / "report.html").read_text() != "<p>my own report</p>\n"  # the guarded test above would fail


# -- 3. tracebacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["/", ".", "tables/"])
def test_eval_table_naming_a_folder_is_one_sentence(cli, run, tmp_path, monkeypatch, table):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tables").mkdir()
    _assert_user_error(*cli("eval", run, "--table", table, "--device", "cpu"), "--table")


def test_a_bundle_of_the_other_kind_is_one_sentence(tmp_path):
    from dp360.diffusion.models.bundle import BUNDLE_FILE, load_bundle
    from dp360.errors import Dp360Error

    (tmp_path / BUNDLE_FILE).write_text(json.dumps({"kind": "back"}))
    with pytest.raises(Dp360Error, match="back bundle where the main bundle is needed"):
        load_bundle(tmp_path, kind="main")


# -- 4. exit status of a lock refusal ---------------------------------------------------------------


def test_a_lock_refusal_exits_non_zero(cli, run, astronaut_path):
    lock = RunLock(run)
    lock.acquire()
    try:
        for flags in ((), ("--force",)):
            _assert_user_error(*cli("prepare", astronaut_path, "--out", run, *DLIB, *flags), "Another dp360 run")
    finally:
        lock.release()


# -- 5. wrong messages: special files as input, an empty device ----------------------------------


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/urandom"])
def test_a_special_file_as_input_says_so(cli, tmp_path, special):
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "portrait.png"
        os.mkfifo(path)
    text = _assert_user_error(*cli("prepare", path, "--out", tmp_path / "out", *DLIB), "not a regular file")
    assert "empty" not in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prepare", "render", "export"])
def test_an_empty_device_is_refused(cli, tmp_path, astronaut_path, command):
    args = {
        "prepare": ("prepare", astronaut_path, "--out", tmp_path / "out"),
        "render": ("render", tmp_path, "--out", tmp_path / "t.mp4"),
        "export": ("export", tmp_path),
    }[command]
    code, _, stderr = cli(*args, "--device", "")
    assert code == 2 and "--device" in stderr and "Traceback" not in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# -- 6. memory is bounded before any decode -------------------------------------------------------


def test_an_image_the_free_memory_cannot_hold_is_refused_before_decoding(monkeypatch, astronaut_path):
    from dp360 import imaging
    from dp360.errors import InputImageError

    monkeypatch.setattr(imaging, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(imaging.Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(InputImageError, match="free"):
        imaging.load_portrait(astronaut_path)


def test_a_zip_bomb_checkpoint_is_refused_before_torch_reads_it(monkeypatch, tmp_path):
    import zipfile

    import torch

    from dp360.errors import Dp360Error
    from dp360.safety import load_tensors

    bomb = tmp_path / "model_state-340000.th"
    torch.save({"weight": torch.zeros(4)}, bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/9", bytes(64 << 20))  # 64 MB declared, a few kB on disk
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load reached"))
    with pytest.raises(Dp360Error, match="PyTorch never writes"):
        load_tensors(bomb, "download it again")


def test_a_checkpoint_torch_wrote_passes_the_size_check(tmp_path):
    import torch

    from dp360.safety import load_tensors

    path = tmp_path / "ok.th"
    torch.save({"weight": torch.arange(4.0)}, path)
    assert torch.equal(load_tensors(path, "")["weight"], torch.arange(4.0))


# -- batch folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [{"runs": {}}, {"format": 1, "runs": {"a.png": "a"}}, [1]])
def test_a_folder_with_a_look_alike_batch_json_is_not_taken_for_a_batch(tmp_path, manifest):
    from dp360.batch import BATCH_MANIFEST, BatchFolder
    from dp360.errors import RunDirectoryError

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / BATCH_MANIFEST).write_text(json.dumps(manifest))
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="is not a dp360 batch file"):
        BatchFolder(folder).check()


@pytest.mark.parametrize("planted", ["link to a copy", "dangling link", "fifo", "folder"])
def test_a_batch_json_planted_as_a_link_or_special_file_is_refused(tmp_path, planted):
    from dp360.batch import BATCH_MANIFEST, BatchFolder
    from dp360.errors import RunDirectoryError

    folder = BatchFolder(tmp_path / "batch")
    folder.open([tmp_path / "a.png"], "reconstruct")
    folder.close(None)
    manifest = tmp_path / "batch" / BATCH_MANIFEST
    real = tmp_path / "elsewhere.json"
    real.write_bytes(manifest.read_bytes())
    manifest.unlink()
    if planted == "link to a copy":
        manifest.symlink_to(real)
    elif planted == "dangling link":
        manifest.symlink_to(tmp_path / "nowhere.json")
    elif planted == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.mkdir()
    for attempt in (BatchFolder(tmp_path / "batch").check, lambda: folder.open([tmp_path / "a.png"], "reconstruct")):
        with pytest.raises(RunDirectoryError, match="is not a dp360 batch file"):
            attempt()
    assert real.read_bytes() and not (tmp_path / "nowhere.json").exists()


def test_the_batch_log_is_never_appended_to_through_a_link(tmp_path, mine):
    from dp360.batch import BATCH_LOG, BatchFolder, PortraitResult
    from dp360.errors import RunDirectoryError

    folder = BatchFolder(tmp_path / "batch")
    folder.open([tmp_path / "a.png"], "reconstruct")
    try:
        result = PortraitResult(input="a.png", run_dir="a", status="done")
        folder.record(result)
        assert json.loads((tmp_path / "batch" / BATCH_LOG).read_text())["status"] == "done"
        (tmp_path / "batch" / BATCH_LOG).unlink()
        diary = mine / "diary.txt"
        (tmp_path / "batch" / BATCH_LOG).symlink_to(diary)
        before = diary.read_bytes()
        with pytest.raises(RunDirectoryError, match="not a file dp360 can append to"):
            folder.record(result)
        assert diary.read_bytes() == before
    finally:
        folder.close(None)
