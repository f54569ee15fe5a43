"""`dp360 views`, `dp360 weights` and `dp360 doctor --smoke` on the tiny bundle (CPU)."""

import json

import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.models.tiny import write_tiny_bundles
from dp360.video import read_mp4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bundles(tmp_path_factory.mktemp("tiny"), view_count=32)


def _views(cli, out, image, tiny, *extra):
    weights_dir = out.parent / "weights"
    weights_dir.mkdir(exist_ok=True)
    for kind in ("main", "back"):
        link = weights_dir / f"{kind}-fp32"
        if not link.exists():
            link.symlink_to(tiny[kind], target_is_directory=True)
    return cli("views", image, "--out", out, "--weights-dir", weights_dir, "--cameras", tiny["cameras"], "--steps", "2", "--detector", "dlib", "--device", "cpu", "--json", *extra)


def test_views_writes_every_file_and_resumes(cli, tmp_path, astronaut_path, tiny):
    out = tmp_path / "head"
    code, stdout, stderr = _views(cli, out, astronaut_path, tiny)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "done" and summary["stages"]["views"]["last_run"] == "ran"
    views = out / "views"
    names = [f"{k:03d}.png" for k in range(32)]
    for name in names + ["back_ref.png", "grid.png", "orbit.mp4", "transforms.json"]:
        assert (views / name).is_file(), name
    assert Image.open(views / "000.png").size == (64, 64) and Image.open(views / "grid.png").size == (8 * 64, 4 * 64)
    meta, frames = read_mp4(views / "orbit.mp4")
    assert len(frames) == 32 and tuple(meta["size"]) == (64, 64)
    transforms = json.loads((views / "transforms.json").read_text())
    parsed = cameras.from_nerfstudio_transforms(transforms)
    assert [view.file_path for view in parsed] == names
    assert np.allclose(parsed[16].cam2world, cameras.dp360_orbit(32)[16])
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"]["views"]["settings"]["steps"] == 2 and manifest["stages"]["views"]["inputs"]["crop"]

    code, stdout, _ = _views(cli, out, astronaut_path, tiny)
    assert json.loads(stdout)["stages"]["views"]["last_run"] == "reused"
    code, stdout, _ = _views(cli, out, astronaut_path, tiny, "--seed", "5")
    assert json.loads(stdout)["stages"]["views"]["last_run"] == "ran"


def test_views_without_weights_is_one_sentence(cli, tmp_path, astronaut_path):
    code, stdout, stderr = cli("views", astronaut_path, "--out", tmp_path / "o", "--detector", "dlib", "--weights-dir", tmp_path / "none")
    assert code == 2 and stderr.startswith("error: ") and "dp360 weights download" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o" / "views").exists()


def test_weights_commands_on_a_tiny_checkpoint(cli, tmp_path, tiny):
    code, _, stderr = cli("weights", "verify", "main", "--checkpoint", tiny["main"].parent / "main.th", "--family", "tiny")
    assert code == 0 and "components" in stderr
    code, _, stderr = cli("weights", "verify", "main", "--checkpoint", tiny["main"].parent / "back.th", "--family", "tiny")
    assert code == 2 and "does not fill" in stderr  # the back checkpoint has no temporal modules
    code, _, stderr = cli("weights", "convert", "back", "--checkpoint", tiny["main"].parent / "back.th", "--family", "tiny", "--out", tmp_path / "b", "--fp16")
    assert code == 0, stderr
    assert json.loads((tmp_path / "b" / "dp360_bundle.json").read_text())["dtype"] == "float16"
    code, _, stderr = cli("weights", "download", "main")
    assert code == 2 and "huggingface.co/gym890/diffportrait360" in stderr and "Traceback" not in stderr
    code, stdout, _ = cli("weights", "list", "--json")
    assert code == 0 and {row["name"] for row in json.loads(stdout)} >= {"main", "back", "panohead", "data"}


def test_doctor_smoke(cli):
    code, stdout, stderr = cli("doctor", "--smoke", "--json")
    smoke = {check["name"]: check for check in json.loads(stdout)}["smoke"]
    assert code == 0 and smoke["status"] == "OK" and "meaningless" in smoke["detail"], stderr
