"""Output ownership: `dp360 render` and `dp360 export` replace only what dp360 created."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh

from dp360.errors import Dp360Error
from dp360.manifest import new_manifest
from dp360.nerf.mesh import write_mesh
from dp360.nerf.render import write_frames
from dp360.outputs import check_file_target, check_frames_target
from dp360.video import read_mp4

FRAMES = [np.full((16, 16, 3), value, np.uint8) for value in (0, 128)]


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        path.relative_to(folder).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def _refused(check, path, overwrite=False) -> str:
    with pytest.raises(Dp360Error) as caught:
        check(path, overwrite)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message and message.endswith(".")
    return message


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.txt").write_text("the beach\n")
    (folder / "family.png").write_bytes(b"\x89PNG not really")
    return folder


# -- single files ---------------------------------------------------------------------------


def test_new_file_in_a_missing_folder_is_fine(tmp_path):
    assert check_file_target(tmp_path / "a" / "b" / "t.mp4") == tmp_path / "a" / "b" / "t.mp4"


def test_file_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "sub.mp4", tmp_path / "afile" / "deeper" / "sub.glb"):
        assert "is a file, not a folder" in _refused(check_file_target, target, overwrite=True)


def test_existing_own_kind_needs_overwrite(tmp_path):
    for name in ("t.mp4", "t.GIF", "h.glb", "h.obj", "h.ply"):
        (tmp_path / name).write_bytes(b"old")
        assert "--overwrite" in _refused(check_file_target, tmp_path / name)
        assert check_file_target(tmp_path / name, overwrite=True) == tmp_path / name


def test_existing_other_kind_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = _refused(check_file_target, tmp_path / "notes.txt", overwrite=True)
    assert "--overwrite" not in message and "choose another --out" in message


def test_existing_folder_is_never_replaced_by_a_file(tmp_path, photos):
    (tmp_path / "odd.mp4").mkdir()
    for target in (photos, tmp_path / "odd.mp4"):
        assert "existing folder" in _refused(check_file_target, target, overwrite=True)


# -- frames folders -------------------------------------------------------------------------


def test_frames_go_into_new_or_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_frames_target(tmp_path / "new") == tmp_path / "new"
    assert check_frames_target(tmp_path / "empty") == tmp_path / "empty"


def test_frames_replace_only_frames_and_only_with_overwrite(tmp_path):
    write_frames(FRAMES, tmp_path / "spin", "frames", 10)
    assert "--overwrite" in _refused(check_frames_target, tmp_path / "spin")
    write_frames(FRAMES[:1], tmp_path / "spin", "frames", 10, overwrite=True)
    assert sorted(path.name for path in (tmp_path / "spin").iterdir()) == ["0000.png"]


@pytest.mark.parametrize("intruder", ["holiday.txt", "0002.png/", "001.png", ".DS_Store", "run.json"])
def test_frames_never_replace_anything_else(tmp_path, intruder):
    folder = tmp_path / "spin"
    write_frames(FRAMES, folder, "frames", 10)
    if intruder.endswith("/"):
        (folder / intruder).mkdir()
    else:
        (folder / intruder).write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(Dp360Error, match="choose another --out"):
        write_frames(FRAMES, folder, "frames", 10, overwrite=True)
    assert _tree(tmp_path) == before


def test_frames_never_replace_the_current_folder_or_its_parent(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for target in (Path("."), Path(".."), Path("/")):
        assert "new folder" in _refused(check_frames_target, target, overwrite=True)


def test_frames_never_replace_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert "is a file" in _refused(check_frames_target, tmp_path / "notes.txt", overwrite=True)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in _refused(check_frames_target, tmp_path / "afile" / "frames", overwrite=True)


def test_write_mesh_refuses_before_writing(tmp_path):
    mesh = trimesh.creation.box()
    (tmp_path / "head.glb").write_bytes(b"old")
    with pytest.raises(Dp360Error, match="--overwrite"):
        write_mesh(mesh, tmp_path / "head.glb", "glb")
    assert (tmp_path / "head.glb").read_bytes() == b"old"
    write_mesh(mesh, tmp_path / "head.glb", "glb", overwrite=True)
    assert len(trimesh.load(tmp_path / "head.glb", force="mesh").faces) == 12


# -- through the CLI, on a real (tiny) fitted run ---------------------------------------------

RENDER = ("--frames", "2", "--resolution", "16", "--device", "cpu", "--quiet")
EXPORT = ("--mesh-resolution", "16", "--mesh-faces", "100", "--texture-size", "64", "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder whose field only needs to load."""
    from dp360.nerf import synthetic
    from dp360.nerf.common import FitSettings
    from dp360.nerf.fit import fit_field

    root = tmp_path_factory.mktemp("run")
    views = synthetic.write_views(root / "views", size=24, view_count=8)
    (root / "nerf").mkdir()
    fit_field(views, root / "nerf", FitSettings.preset("test", iterations=4), "cpu", progress=False)
    (root / "run.json").write_text(json.dumps(new_manifest()))  # dp360's mark: `export` may write into export/
    return root


def _cli_refuses(cli, target_folder: Path, *args) -> str:
    before = _tree(target_folder)
    code, _, stderr = cli(*args)
    assert code == 2 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert _tree(target_folder) == before
    return stderr


def test_render_into_a_folder_of_user_files_is_refused(cli, run, photos):
    assert "family.png" in _cli_refuses(cli, photos.parent, "render", run, "--out", photos, *RENDER)


def test_render_into_a_copy_of_a_run_is_refused(cli, run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "copy")
    (copy / "run.json").write_text(json.dumps({"status": "done"}))
    assert "run folder" in _cli_refuses(cli, tmp_path, "render", run, "--out", copy, *RENDER)
    assert "run folder" in _cli_refuses(cli, tmp_path, "render", run, "--out", copy, "--overwrite", *RENDER)


def test_render_frames_onto_a_file_is_refused(cli, run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _cli_refuses(cli, tmp_path, "render", run, "--format", "frames", "--out", tmp_path / "notes.txt", *RENDER)


def test_file_outputs_onto_folders_and_under_files_are_refused(cli, run, tmp_path, photos):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "spin.mp4").mkdir()
    _cli_refuses(cli, tmp_path, "render", run, "--out", tmp_path / "spin.mp4", "--overwrite", *RENDER)
    _cli_refuses(cli, tmp_path, "render", run, "--out", tmp_path / "afile" / "sub.mp4", *RENDER)
    _cli_refuses(cli, tmp_path, "export", run, "--out", photos, "--overwrite", *EXPORT)
    _cli_refuses(cli, tmp_path, "export", run, "--out", tmp_path / "afile" / "head.glb", *EXPORT)


def test_existing_outputs_need_overwrite(cli, run, tmp_path):
    (tmp_path / "t.mp4").write_bytes(b"old video")
    (tmp_path / "h.glb").write_bytes(b"old mesh")
    assert "--overwrite" in _cli_refuses(cli, tmp_path, "render", run, "--out", tmp_path / "t.mp4", *RENDER)
    assert "--overwrite" in _cli_refuses(cli, tmp_path, "export", run, "--out", tmp_path / "h.glb", *EXPORT)
    code, _, stderr = cli("render", run, "--out", tmp_path / "t.mp4", "--overwrite", *RENDER)
    assert code == 0, stderr
    meta, frames = read_mp4(tmp_path / "t.mp4")
    assert len(frames) == 2 and tuple(meta["size"]) == (16, 16)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["h.glb", "t.mp4"]


def test_render_frames_into_an_empty_folder(cli, run, tmp_path):
    (tmp_path / "spin").mkdir()
    code, _, stderr = cli("render", run, "--out", tmp_path / "spin", *RENDER)
    assert code == 0, stderr
    assert sorted(path.name for path in (tmp_path / "spin").iterdir()) == ["0000.png", "0001.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spin"]


def test_export_replaces_its_default_target_inside_the_run(cli, run):
    for _ in range(2):
        code, _, stderr = cli("export", run, "--format", "ply", *EXPORT)
        assert code == 0, stderr
    assert len(trimesh.load(run / "export" / "head.ply", force="mesh").faces) <= 100


def test_render_from_a_missing_run_folder(cli, tmp_path):
    code, _, stderr = cli("render", tmp_path / "nope", "--out", tmp_path / "t.mp4", *RENDER)
    assert code == 2 and stderr.startswith("error: ") and "does not exist" in stderr
    assert list(tmp_path.iterdir()) == []
