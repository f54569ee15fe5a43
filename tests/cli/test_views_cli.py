"""`dp360 views`, `dp360 weights` and `dp360 doctor --smoke` on the tiny bundle (CPU)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.panohead.perceptual import VGG16_FILE
from dp360.video import read_mp4


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    weights = tiny_weights(32)
    return {**weights.bundles, "panohead": weights.panohead, "vgg": weights.backbone}


def _link(link: Path, target: Path) -> None:
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=target.is_dir())


def _views(cli, out, image, tiny, *extra, panohead=True, cameras=True):
    weights_dir = out.parent / ("weights" if panohead else "weights-no-panohead")
    for kind in ("main", "back"):
        _link(weights_dir / f"{kind}-fp32", tiny[kind])
    if panohead:
        _link(weights_dir / "panohead", tiny["panohead"])
        _link(Path(os.environ["DP360_CACHE"]) / "perceptual" / VGG16_FILE, tiny["vgg"])
    camera_args = ("--cameras", tiny["cameras"]) if cameras else ()
    return cli(
        "views",
        image,
        "--out",
        out,
        "--weights-dir",
        weights_dir,
        *camera_args,
        "--steps",
        "2",
        "--invert-steps",
        "3",
        "--pti-steps",
        "1",
        "--detector",
        "dlib",
        "--device",
        "cpu",
        "--json",
        *extra,
    )


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
    # The PanoHead inversion ran and its frames were the views' 3D-aware noise.
    assert (
        manifest["stages"]["noise"]["status"] == "done" and manifest["stages"]["noise"]["settings"]["invert_steps"] == 3
    )
    assert manifest["stages"]["views"]["summary"]["3d_noise"] is True
    assert "noise/000.png" in manifest["stages"]["views"]["inputs"]
    noise = out / "noise"
    assert sorted(p.name for p in (noise / "frames").glob("*.png")) == names
    meta, frames = read_mp4(noise / "condition.mp4")
    assert len(frames) == 32
    for name in ("w.pt", "fit.png", "inversion.json"):
        assert (noise / name).is_file(), name

    code, stdout, _ = _views(cli, out, astronaut_path, tiny)
    stages = json.loads(stdout)["stages"]
    assert stages["views"]["last_run"] == "reused" and stages["noise"]["last_run"] == "reused"
    code, stdout, _ = _views(cli, out, astronaut_path, tiny, "--seed", "5")
    stages = json.loads(stdout)["stages"]
    assert stages["views"]["last_run"] == "ran" and stages["noise"]["last_run"] == "ran"
    first = np.asarray(Image.open(views / "000.png"))

    code, stdout, _ = _views(cli, out, astronaut_path, tiny, "--seed", "5", "--no-3d-noise")
    summary = json.loads(stdout)
    assert (
        code == 0
        and summary["stages"]["noise"]["status"] == "skipped"
        and summary["stages"]["views"]["last_run"] == "ran"
    )
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"]["views"]["summary"]["3d_noise"] is False
    assert not np.array_equal(first, np.asarray(Image.open(views / "000.png")))  # the start latents matter


def test_views_without_panohead_warn_and_start_from_gaussian_noise(cli, tmp_path, astronaut_path, tiny):
    code, stdout, stderr = _views(cli, tmp_path / "head", astronaut_path, tiny, panohead=False)
    summary = json.loads(stdout)
    assert code == 0 and summary["status"] == "incomplete"
    assert summary["stages"]["noise"]["status"] == "not_available" and summary["stages"]["views"]["status"] == "done"
    assert any("3D-aware noise" in note for note in summary["notes"])


def test_view_counts_without_camera_images_get_panohead_renders(cli, tmp_path, astronaut_path, tiny):
    code, stdout, stderr = _views(cli, tmp_path / "head", astronaut_path, tiny, "--views", "8", cameras=False)
    assert code == 0, stderr
    assert len(list((tmp_path / "head" / "views").glob("0*.png"))) == 8
    rendered = list((Path(os.environ["DP360_CACHE"]) / "cameras").glob("orbit8-*/*.png"))
    assert len(rendered) == 8
    assert len(list((tmp_path / "head" / "noise" / "frames").glob("*.png"))) == 8


def test_views_without_weights_is_one_sentence(cli, tmp_path, astronaut_path):
    code, stdout, stderr = cli(
        "views", astronaut_path, "--out", tmp_path / "o", "--detector", "dlib", "--weights-dir", tmp_path / "none"
    )
    assert (
        code == 2 and stderr.startswith("error: ") and "dp360 weights download" in stderr and "Traceback" not in stderr
    )
    assert not (tmp_path / "o" / "views").exists()


def test_weights_commands_on_a_tiny_checkpoint(cli, tmp_path, tiny):
    code, _, stderr = cli(
        "weights", "verify", "main", "--checkpoint", tiny["main"].parent / "main.th", "--family", "tiny"
    )
    assert code == 0 and "components" in stderr
    code, _, stderr = cli(
        "weights", "verify", "main", "--checkpoint", tiny["main"].parent / "back.th", "--family", "tiny"
    )
    assert code == 2 and "does not fill" in stderr  # the back checkpoint has no temporal modules
    code, _, stderr = cli(
        "weights",
        "convert",
        "back",
        "--checkpoint",
        tiny["main"].parent / "back.th",
        "--family",
        "tiny",
        "--out",
        tmp_path / "b",
        "--fp16",
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "b" / "dp360_bundle.json").read_text())["dtype"] == "float16"
    # offline (the tests' default): one message listing what is missing, no download attempted
    code, _, stderr = cli("weights", "download", "main", "perceptual")
    text = " ".join(stderr.split())
    assert code == 2 and "downloads are off" in text and "Traceback" not in stderr
    assert "model_state-340000.th (about 10.8 GB)" in text and "vgg16-397923af.pth" in text
    # verify and convert read files on disk only: never a download
    for command in ("verify", "convert"):
        code, _, stderr = cli("weights", command, "main")
        text = " ".join(stderr.split())
        assert code == 2 and "not on this machine" in text and "dp360 weights download main --keep-checkpoints" in text
    code, stdout, _ = cli("weights", "list", "--json")
    rows = {row["name"]: row for row in json.loads(stdout)}
    assert code == 0 and set(rows) == {
        "main",
        "back",
        "main (fp16)",
        "back (fp16)",
        "panohead",
        "data",
        "perceptual",
        "retinaface",
    }
    assert not any(row["present"] for row in rows.values())


def test_weights_verify_and_convert_panohead(cli, tmp_path, tiny):
    pickle_path = tiny["panohead"].parent / "tiny-panohead.pkl"
    code, _, stderr = cli("weights", "verify", "panohead", "--checkpoint", pickle_path)
    assert code == 0 and "without running pickled code" in stderr
    code, _, stderr = cli("weights", "convert", "panohead", "--checkpoint", pickle_path, "--out", tmp_path / "p")
    assert code == 0 and (tmp_path / "p" / "generator.safetensors").is_file(), stderr
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    code, _, stderr = cli("weights", "convert", "panohead", "--checkpoint", bad, "--out", tmp_path / "q")
    assert code == 2 and "does not allow" in stderr and not (tmp_path / "q").exists()


def test_doctor_smoke(cli, roomy_disk):
    code, stdout, stderr = cli("doctor", "--smoke", "--json")
    smoke = {check["name"]: check for check in json.loads(stdout)}["smoke"]
    assert code == 0 and smoke["status"] == "OK" and "meaningless" in smoke["detail"], stderr


def test_sphere32_images_are_found_in_the_inference_archive(tmp_path):
    import zipfile

    from dp360.diffusion.stage import extract_sphere32
    from dp360.errors import Dp360Error

    archive = tmp_path / "inference_data.zip"
    data = (Path(__file__).resolve().parents[2] / "assets" / "astronaut.png").read_bytes()  # any PNG will do
    with zipfile.ZipFile(archive, "w") as bundle:
        for k in range(32):
            bundle.writestr(f"inference_data/sphere32/{k:07d}.png", data)
        for k in range(5):
            bundle.writestr(f"inference_data/sample/{k}.png", data)
    out = extract_sphere32(archive, tmp_path / "sphere32")
    assert sorted(p.name for p in out.glob("*.png")) == [f"{k:03d}.png" for k in range(32)]
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as bundle:
        bundle.writestr("a/1.png", data)
    with pytest.raises(Dp360Error, match="32 camera images"):
        extract_sphere32(broken, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_a_camera_folder_of_another_count_is_refused_before_any_stage(cli, tmp_path, astronaut_path, tiny):
    out = tmp_path / "head"
    code, stdout, stderr = _views(cli, out, astronaut_path, tiny, "--views", "16")
    assert code == 2 and "Traceback" not in stderr
    assert "holds 32 PNG images but --views is 16" in " ".join(stderr.split())
    assert not out.exists()


def test_the_views_key_follows_the_bundle_files(tiny, tmp_path):
    """A reconverted bundle (same manifest, new weight files) changes the views stage's key."""
    import shutil

    from dp360.diffusion.stage import ViewModels

    main = shutil.copytree(tiny["main"], tmp_path / "main")
    models = ViewModels(main, tiny["back"], tiny["cameras"])
    before = models.hashes()
    assert models.hashes() == before
    (weights,) = (main / "unet").glob("*.safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    after = models.hashes()
    assert after["main_bundle_files"] != before["main_bundle_files"]
    assert after["back_bundle_files"] == before["back_bundle_files"] and after["main_bundle"] == before["main_bundle"]


# ------------------------------------------------------------- hostile camera folders (issue 21)


def _one_sentence(code, stdout, stderr) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    text = " ".join(stderr.split())
    assert text.count("error: ") == 1, text
    text = text[text.index("error: ") :]  # after the progress bars of stages that ran before
    assert text.endswith("."), text
    return text


def _camera_copy(tiny, folder: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny["cameras"], folder))


def _tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("replaces", [True, False], ids=["in-place-of-an-image", "beside-the-images"])
def test_a_folder_named_like_an_image_in_the_cameras_folder_is_named_as_such(
    cli, tmp_path, astronaut_path, tiny, replaces
):
    cameras = _camera_copy(tiny, tmp_path / "cameras")
    name = "0000005.png" if replaces else "extra.png"
    (cameras / name).unlink(missing_ok=True)
    (cameras / name).mkdir()
    (cameras / name / "mine.txt").write_text("mine\n")
    before = _tree(cameras)
    out = tmp_path / "head"
    text = _one_sentence(*_views(cli, out, astronaut_path, tiny, "--cameras", cameras))
    assert f"holds '{name}', which is a folder, not a PNG image; move it out of that folder" in text, text
    assert "Cannot write" not in text
    assert _tree(cameras) == before
    assert not out.exists()


def test_an_empty_cameras_folder_says_it_holds_no_images(cli, tmp_path, astronaut_path, tiny):
    cameras = tmp_path / "cameras"
    cameras.mkdir()
    out = tmp_path / "head"
    text = _one_sentence(*_views(cli, out, astronaut_path, tiny, "--cameras", cameras))
    assert "holds no PNG camera images; pass --cameras with a folder of 32 camera images" in text, text
    assert "--views 0" not in text
    assert not out.exists()


def test_a_scheduler_config_with_nan_is_one_sentence_and_no_views(cli, tmp_path, astronaut_path, tiny):
    """beta_start: NaN gave all-black views with exit 0 (issue 21)."""
    import shutil

    main = Path(shutil.copytree(tiny["main"], tmp_path / "main"))
    config = main / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"beta_start": 0.00085', '"beta_start": NaN'))
    assert "NaN" in config.read_text()
    weights_dir = tmp_path / "weights"
    _link(weights_dir / "main-fp32", main)
    _link(weights_dir / "back-fp32", tiny["back"])
    out = tmp_path / "run" / "head"
    text = _one_sentence(*_views(cli, out, astronaut_path, tiny, "--no-3d-noise", "--weights-dir", weights_dir))
    shown = weights_dir / "main-fp32" / "scheduler" / "scheduler_config.json"
    assert f"'{shown}' sets beta_start to nan, but dp360 accepts a number greater than 0 and less than 1" in text
    assert "dp360 weights convert main" in text
    assert not (out / "views").exists()


def test_a_damaged_panohead_file_is_an_error_unless_the_noise_is_turned_off(cli, tmp_path, astronaut_path, tiny):
    """It fell back to plain noise with exit 0 (issue 21); --no-3d-noise is the explicit way to go without."""
    import shutil

    weights_dir = tmp_path / "weights"
    for kind in ("main", "back"):
        _link(weights_dir / f"{kind}-fp32", tiny[kind])
    panohead = Path(shutil.copytree(tiny["panohead"], weights_dir / "panohead"))
    _link(Path(os.environ["DP360_CACHE"]) / "perceptual" / VGG16_FILE, tiny["vgg"])
    damaged = panohead / "generator.safetensors"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    before = damaged.read_bytes()
    out = tmp_path / "head"
    text = _one_sentence(*_views(cli, out, astronaut_path, tiny, "--weights-dir", weights_dir))
    assert f"'{damaged}' is not a valid safetensors file" in text, text
    assert "or pass --no-3d-noise to start the views from plain noise" in text
    assert damaged.read_bytes() == before
    assert not (out / "noise").exists() and not (out / "views").exists()

    code, stdout, stderr = _views(cli, out, astronaut_path, tiny, "--weights-dir", weights_dir, "--no-3d-noise")
    assert code == 0, stderr
    stages = json.loads(stdout)["stages"]
    assert stages["noise"]["status"] == "skipped" and stages["views"]["status"] == "done"
    assert damaged.read_bytes() == before
