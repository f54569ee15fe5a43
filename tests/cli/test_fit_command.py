"""`dp360 fit VIEWS_DIR --out RUN_DIR`: views made elsewhere (nerfstudio's layout) through the same
staged, resumable run as `reconstruct` from the fit on, and every bad views folder refused with one
sentence before anything is written. The views are the synthetic head at 32 px; the fits are tiny."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_messages import _choices, _command, _options

TINY = (
    *("--fit-preset", "test", "--fit-iterations", "30", "--frames", "4", "--resolution", "32"),
    *("--mesh-resolution", "32", "--mesh-faces", "1000", "--texture-size", "64", "--device", "cpu"),
)
# reconstruct's options that `fit` takes too: the field, turntable and mesh ones and the run's own
FIT_OPTIONS = {
    *("--fit-preset", "--fit-iterations", "--field", "--frames", "--fps", "--resolution", "--elevation"),
    *("--mesh-resolution", "--mesh-faces", "--mesh-format", "--texture", "--texture-size"),
    *("--out", "-o", "--device", "--seed", "--force", "--max-pixels", "--json", "--quiet", "-q", "--help"),
}


def _json(stdout: str) -> dict:
    return json.loads(stdout)


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Path:
    """The synthetic head's 32 orbit views at 32 px (read only: copy to change)."""
    from dp360.nerf.synthetic import write_views

    return write_views(tmp_path_factory.mktemp("views") / "views", size=32)


@pytest.fixture(scope="module")
def fitted_run(views, tmp_path_factory):
    """A `dp360 fit` run of `views` (read only: copy to change); (run folder, its --json summary)."""
    from typer.testing import CliRunner

    from cli.main import app

    run = tmp_path_factory.mktemp("fit") / "run"
    result = CliRunner().invoke(app, ["fit", str(views), "--out", str(run), *TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    return run, _json(result.stdout)


def test_fit_takes_every_field_turntable_and_mesh_option_of_reconstruct_with_its_default():
    reconstruct, fit = _options(_command("reconstruct")), _options(_command("fit"))
    missing = sorted(FIT_OPTIONS - set(fit))
    assert not missing, f"fit lacks the reconstruct options {missing}"
    for name in FIT_OPTIONS - {"--help"}:
        param, other = reconstruct[name], fit[name]
        assert other.default == param.default, name
        assert getattr(other, "is_flag", False) == getattr(param, "is_flag", False), name
        assert _choices(other) == _choices(param), name
        assert other.help == param.help, name  # the same declaration


def test_fit_makes_the_turntable_mesh_and_report_and_records_the_views(fitted_run, views):
    import imageio.v3 as iio
    import trimesh

    run, summary = fitted_run
    assert summary["status"] == "done"
    assert [name for name, stage in summary["stages"].items() if stage["status"] != "done"] == []
    assert list(summary["stages"]) == ["import", "fit", "render", "export", "consistency", "report"]
    frames = iio.imread(run / "export" / "turntable.mp4", index=None)
    assert frames.shape == (4, 32, 32, 3)  # 30 iterations: a decodable video, not yet a head
    mesh = trimesh.load(run / "export" / "head.glb", force="mesh")
    assert len(mesh.faces) > 100
    page = (run / "export" / "report.html").read_text()
    assert "Views imported from" in page and "views/000.png" in page
    assert not (run / "input.png").exists() and not (run / "prepared").exists()

    manifest = json.loads((run / "run.json").read_text())
    source = manifest["input"]
    assert source["kind"] == "views" and Path(source["path"]) == views.resolve() and source["views"] == 32
    from dp360.atomic import file_sha256

    expected = {path.name: file_sha256(path) for path in views.iterdir()}
    assert source["files"] == expected
    # the copies: 000.png ... and a transforms.json with the same cameras, in nerfstudio's layout
    from dp360 import cameras

    original = cameras.from_nerfstudio_transforms(json.loads((views / "transforms.json").read_text()))
    copied = cameras.from_nerfstudio_transforms(json.loads((run / "views" / "transforms.json").read_text()))
    assert [view.file_path for view in copied] == [f"{index:03d}.png" for index in range(32)]
    for before, after in zip(original, copied):
        assert np.allclose(before.cam2world, after.cam2world) and np.allclose(before.intrinsics, after.intrinsics)
        assert np.array_equal(
            np.asarray(Image.open(views / before.file_path)), np.asarray(Image.open(run / "views" / after.file_path))
        )


def test_a_rerun_reuses_every_stage_and_render_and_export_work_on_the_run(fitted_run, views, tmp_path, cli):
    run, _ = fitted_run
    code, stdout, stderr = cli("fit", views, "--out", run, *TINY, "--json")
    assert code == 0, stderr
    assert {name: stage.get("last_run") for name, stage in _json(stdout)["stages"].items()} == {
        name: "reused" for name in ("import", "fit", "render", "export", "consistency", "report")
    }

    code, _, stderr = cli("render", run, "--out", tmp_path / "spin.gif", "--frames", "2", "--resolution", "16")
    assert code == 0, stderr
    assert Image.open(tmp_path / "spin.gif").n_frames == 2
    export = (
        "--format",
        "ply",
        "--mesh-resolution",
        "24",
        "--mesh-faces",
        "500",
        "--texture-size",
        "64",
        "--device",
        "cpu",
    )
    code, _, stderr = cli("export", run, "--out", tmp_path / "head.ply", *export)
    assert code == 0, stderr
    import trimesh

    assert len(trimesh.load(tmp_path / "head.ply", force="mesh").faces) > 0


def test_a_changed_view_image_refits_and_a_moved_folder_is_the_same_input(fitted_run, views, tmp_path, cli):
    # a copy of the views folder elsewhere holds the same views: the copied run reuses everything
    moved, run = tmp_path / "moved", tmp_path / "run"
    shutil.copytree(views, moved)
    shutil.copytree(fitted_run[0], run, symlinks=True)
    code, stdout, stderr = cli("fit", moved, "--out", run, *TINY, "--json")
    assert code == 0, stderr
    reused = {name for name, stage in _json(stdout)["stages"].items() if stage.get("last_run") == "reused"}
    assert reused == {"import", "fit", "render", "export", "consistency"}  # the page shows the folder's new path

    pixels = np.asarray(Image.open(moved / "005.png")).copy()
    pixels[8:24, 8:24] = [255, 0, 0]
    Image.fromarray(pixels).save(moved / "005.png")
    code, stdout, stderr = cli("fit", moved, "--out", run, *TINY, "--json")
    assert code == 0, stderr
    stages = _json(stdout)["stages"]
    assert stages["import"]["last_run"] == "ran" and stages["fit"]["last_run"] == "ran"
    assert np.array_equal(np.asarray(Image.open(run / "views" / "005.png")), pixels)
    manifest = json.loads((run / "run.json").read_text())
    assert Path(manifest["input"]["path"]) == moved.resolve()


def test_a_run_belongs_to_one_views_folder_and_a_portrait_run_to_its_portrait(
    fitted_run, views, tmp_path, cli, astronaut_path
):
    run, _ = fitted_run
    other = tmp_path / "other"
    shutil.copytree(views, other)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(other / "000.png")
    before = (run / "run.json").read_bytes()
    code, _, stderr = cli("fit", other, "--out", run, *TINY)
    assert code == 2 and "holds the run of another views folder" in stderr and "--force" in stderr, stderr
    assert (run / "run.json").read_bytes() == before

    portrait_run = tmp_path / "portrait"
    code, _, stderr = cli("prepare", astronaut_path, "--out", portrait_run, "--detector", "dlib", "--device", "cpu")
    assert code == 0, stderr
    code, _, stderr = cli("fit", views, "--out", portrait_run, *TINY)
    assert code == 2 and "holds the run of the portrait 'astronaut.png', not of a views folder" in stderr, stderr
    code, _, stderr = cli("prepare", astronaut_path, "--out", run, "--detector", "dlib", "--device", "cpu")
    assert code == 2 and "holds the run of the views folder" in stderr and "not of a portrait" in stderr, stderr
    assert (run / "run.json").read_bytes() == before and not (run / "input.png").exists()

    code, _, stderr = cli("fit", run / "views", "--out", run, *TINY)
    assert code == 2 and "lies inside the run folder" in stderr, stderr


# -- bad views folders: exit 2, one sentence, nothing written --------------------------------------


def _transforms(folder: Path) -> dict:
    return json.loads((folder / "transforms.json").read_text())


def _write(folder: Path, transforms: dict) -> None:
    (folder / "transforms.json").write_text(json.dumps(transforms))


def _edit_frame(index: int, **changes):
    def edit(folder: Path) -> None:
        transforms = _transforms(folder)
        transforms["frames"][index].update(changes)
        for key, value in changes.items():
            if value is None:
                del transforms["frames"][index][key]
        _write(folder, transforms)

    return edit


def _edit_top(**changes):
    def edit(folder: Path) -> None:
        transforms = {**_transforms(folder), **changes}
        _write(folder, {key: value for key, value in transforms.items() if value is not None})

    return edit


def _scaled_pose(folder: Path) -> None:
    transforms = _transforms(folder)
    matrix = np.asarray(transforms["frames"][3]["transform_matrix"])
    matrix[:3, :3] *= 1.5
    transforms["frames"][3]["transform_matrix"] = matrix.tolist()
    _write(folder, transforms)


def _symlink_out(folder: Path) -> None:
    outside = folder.parent / "outside.png"
    shutil.copy(folder / "002.png", outside)
    (folder / "002.png").unlink()
    (folder / "002.png").symlink_to(outside)


BAD = {
    "missing folder": (lambda folder: shutil.rmtree(folder), "does not exist"),
    "a file": (lambda folder: shutil.rmtree(folder) or folder.write_text("x"), "is a file, not a folder"),
    "no transforms.json": (lambda folder: (folder / "transforms.json").unlink(), "has no transforms.json"),
    "not JSON": (lambda folder: (folder / "transforms.json").write_text("{frames: ["), "is not valid JSON"),
    "too large": (
        lambda folder: (folder / "transforms.json").write_text(" " * (1 << 20) + json.dumps(_transforms(folder))),
        "larger than 1 MB",
    ),
    "no frames": (_edit_top(frames=None), "has no list of frames"),
    "no file_path": (_edit_frame(4, file_path=None), "no file_path"),
    "no transform_matrix": (_edit_frame(4, transform_matrix=None), "no transform_matrix"),
    "no intrinsics": (_edit_top(fl_y=None), "no fl_y"),
    "absolute path": (_edit_frame(1, file_path="/etc/hostname"), "leaves the views folder"),
    "parent path": (_edit_frame(1, file_path="../views/001.png"), "leaves the views folder"),
    "symlink out": (_symlink_out, "symbolic link that leads out of the views folder"),
    "missing image": (lambda folder: (folder / "007.png").unlink(), "007.png' is missing"),
    "undecodable image": (
        lambda folder: (folder / "007.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"),
        "cannot be decoded",
    ),
    "mixed sizes": (
        lambda folder: Image.new("RGB", (40, 40)).save(folder / "009.png"),
        "is 40x40 px but '000.png' is 32x32",
    ),
    "size not w x h": (_edit_top(w=64, h=64), "w 64, h 64"),
    "fewer than 8": (
        lambda folder: _write(folder, {**_transforms(folder), "frames": _transforms(folder)["frames"][:7]}),
        "at least 8",
    ),
    "non-finite pose": (_edit_frame(2, transform_matrix=[[math.nan] * 4] * 4), "non-finite"),
    "non-rigid pose": (_scaled_pose, "not a rigid camera pose"),
    "zero focal": (_edit_top(fl_x=0), "fl_x = 0"),
    "infinite focal": (_edit_frame(6, fl_x=math.inf), "fl_x = inf"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_views_folder_exits_2_with_one_sentence_and_writes_nothing(case, views, tmp_path, cli):
    break_it, expected = BAD[case]
    folder = tmp_path / "views"
    shutil.copytree(views, folder)
    break_it(folder)
    out = tmp_path / "run"
    code, stdout, stderr = cli("fit", folder, "--out", out, *TINY)
    text = stderr.strip()
    assert code == 2, (code, stderr)
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    assert expected in text, text
    assert not out.exists() and stdout == ""


def test_any_pillow_image_in_subfolders_with_per_frame_intrinsics_is_imported_as_png(views, tmp_path):
    """JPEG and transparent PNG views under images/, each frame with its own focal length: the copies
    are 000.png ... in 8-bit RGB (transparency on white) and the cameras keep their own intrinsics."""
    from dp360 import cameras
    from dp360.nerf.views_input import import_views, read_views

    folder = tmp_path / "capture"
    (folder / "images").mkdir(parents=True)
    source = cameras.from_nerfstudio_transforms(_transforms(views))
    frames = []
    for index, view in enumerate(source[:8]):
        pixels = np.asarray(Image.open(views / view.file_path).convert("RGB"))
        name = f"images/cam{index}.{'jpg' if index % 2 else 'png'}"
        if index == 2:
            Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 0, np.uint8)])).save(folder / name)
        else:
            Image.fromarray(pixels).save(folder / name)
        intrinsics = cameras.normalized_intrinsics(4.0 + 0.1 * index)
        frames.append(cameras.ViewCamera(name, view.cam2world, intrinsics))
    _write(folder, cameras.to_nerfstudio_transforms(frames, 32, 32))

    checked = read_views(folder)
    assert checked.notes == ["transparent views are composited on white"]
    out = tmp_path / "views"
    out.mkdir()
    assert import_views(checked, out)["views"] == 8
    copied = cameras.from_nerfstudio_transforms(_transforms(out))
    assert [view.file_path for view in copied] == [f"{index:03d}.png" for index in range(8)]
    for before, after in zip(frames, copied):
        assert np.allclose(before.intrinsics, after.intrinsics) and np.allclose(before.cam2world, after.cam2world)
    transparent = Image.open(out / "002.png")
    assert transparent.mode == "RGB" and np.asarray(transparent).min() == 255
    assert Image.open(out / "001.png").mode == "RGB"
