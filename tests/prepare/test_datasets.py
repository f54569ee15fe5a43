"""The dataset scripts (scripts/datasets/) on tiny fake folders in each dataset's layout: the
cameras come out in OpenCV cam2world and pixel intrinsics of the written images, the masks as
white-is-subject images, and a capture that `dp360 eval` reads and aligns to the orbit."""

import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.eval.capture import read_capture

from ..conftest import REPO

SCRIPTS = REPO / "scripts" / "datasets"
CENTRE = np.array([0.05, 1.55, -0.3])  # the head in the rig's world (metres)
YAWS = (0.0, 90.0, 180.0, 270.0)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"dataset_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rig() -> list[np.ndarray]:
    """OpenCV cam2world of four cameras 1 m around the head, looking at it."""
    return [cameras.look_at_cam2world(CENTRE + cameras.orbit_pose(yaw, 5.0, 1.0)[:3, 3], CENTRE) for yaw in YAWS]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(index: int, width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), (40 * index + 20, 90, 200 - 30 * index), np.uint8)


def _check_capture(out: Path, names: list[str], intrinsics: np.ndarray, size: tuple[int, int], masks: bool):
    capture = read_capture(out)
    assert [Path(frame.name).stem for frame in capture.frames] == names
    for frame, pose in zip(capture.frames, _rig()):
        assert np.allclose(frame.cam2world, pose, atol=1e-6)
        assert np.allclose(frame.intrinsics, intrinsics, atol=1e-6)
        assert (frame.width, frame.height) == size
        assert (frame.mask_path is not None) == masks
    transform, scale = cameras.orbit_alignment([frame.cam2world for frame in capture.frames], 0)
    yaws = [cameras.yaw_elevation_of(cameras.align_cam2world(f.cam2world, transform, scale))[0] for f in capture.frames]
    assert yaws == pytest.approx([0.0, 90.0, 180.0, -90.0], abs=1e-6)
    return capture


def test_nersemble_calibration_and_images_become_a_capture(tmp_path):
    full = np.array([[4000.0, 0, 1100], [0, 4000.0, 1604], [0, 0, 1]])
    serials = ["220700191", "221501007", "222200036", "222200037"]
    (tmp_path / "images").mkdir()
    (tmp_path / "alpha").mkdir()
    for index, serial in enumerate(serials):
        Image.fromarray(_image(index, 110, 160)).save(tmp_path / "images" / f"cam_{serial}.jpg")
        Image.fromarray(np.full((160, 110), 255, np.uint8)).save(tmp_path / "alpha" / f"cam_{serial}.png")
    params = {
        "world_2_cam": {serial: np.linalg.inv(pose).tolist() for serial, pose in zip(serials, _rig())},
        "intrinsics": full.tolist(),
    }
    (tmp_path / "camera_params.json").write_text(json.dumps(params))
    out = tmp_path / "capture"
    args = ["--calibration", tmp_path / "camera_params.json", "--images", tmp_path / "images"]
    done = subprocess.run(
        [sys.executable, SCRIPTS / "nersemble.py", *args, "--alpha", tmp_path / "alpha", "--out", out],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    scaled = np.diag([110 / 2200, 160 / 3208, 1.0]) @ full
    capture = _check_capture(out, [f"cam_{s}" for s in serials], scaled, (110, 160), masks=True)
    assert np.asarray(Image.open(capture.frames[1].image_path)).mean(axis=(0, 1)) == pytest.approx(
        _image(1, 1, 1)[0, 0], abs=3
    )  # the image itself (JPEG-close), not another camera's
    # never over an existing folder
    assert _script("nersemble").main([*map(str, args), "--out", str(out)]) == 2


def test_ava256_decoder_folder_becomes_a_capture_with_masks(tmp_path):
    decoder = tmp_path / "decoder"
    (decoder / "image").mkdir(parents=True)
    (decoder / "segmentation_parts").mkdir()
    full = np.array([[7000.0, 0, 1334], [0, 7000.0, 2048], [0, 0, 1]])
    entries = []
    for index, pose in enumerate(_rig()):
        name = f"40{index:04d}"
        world_to_cam = np.linalg.inv(pose)
        transposed = index % 2 == 0  # stored column-major for half of them: both are read right
        entries.append(
            {
                "cameraId": name,
                "K": (full.T if transposed else full).tolist(),
                "T": (world_to_cam.T if transposed else world_to_cam).tolist(),
            }
        )
        with zipfile.ZipFile(decoder / "image" / f"cam{name}.zip", "w") as archive:
            archive.writestr("000123.avif", _png(_image(index, 66, 102)))  # decoded by content
        classes = np.zeros((102, 66), np.uint8)
        classes[20:80, 10:50] = 1  # hair
        classes[90:, :] = 3  # chair
        with zipfile.ZipFile(decoder / "segmentation_parts" / f"cam{name}.zip", "w") as archive:
            archive.writestr("000123.png", _png(classes))
    (decoder / "camera_calibration.json").write_text(json.dumps({"KRT": entries}))
    module = _script("ava256")
    out = tmp_path / "capture"
    assert module.main([str(decoder), "--frame", "123", "--out", str(out)]) == 0
    scaled = np.diag([66 / 2668, 102 / 4096, 1.0]) @ full
    capture = _check_capture(out, [f"cam40{k:04d}" for k in range(4)], scaled, (66, 102), masks=True)
    mask = np.asarray(Image.open(capture.frames[0].mask_path))
    assert mask[50, 30] == 255 and mask[5, 5] == 0 and mask[95, 30] == 0  # hair in, background and chair out
    assert module.main([str(decoder), "--frame", "7", "--out", str(tmp_path / "none")]) == 2  # no such frame


def test_renderme360_smc_files_become_a_capture_in_either_pose_convention(tmp_path):
    import cv2
    import h5py

    intrinsics = np.array([[1200.0, 0, 60], [0, 1200.0, 80], [0, 0, 1]])
    for convention in ("c2w", "w2c"):
        anno, raw = tmp_path / f"{convention}_anno.smc", tmp_path / f"{convention}_raw.smc"
        with h5py.File(anno, "w") as annotation, h5py.File(raw, "w") as images:
            for index, pose in enumerate(_rig()):
                camera = f"{index * 5:02d}"
                group = annotation.create_group(f"Camera_Parameter/{camera}")
                group["K"] = intrinsics
                group["RT"] = pose if convention == "c2w" else np.linalg.inv(pose)
                colour = cv2.imencode(".jpg", cv2.cvtColor(_image(index, 120, 160), cv2.COLOR_RGB2BGR))[1]
                images[f"Camera_5mp/{camera}/color/0"] = colour
                mask = np.zeros((80, 60), np.uint8)  # masks at half size are resized
                mask[10:70, 10:50] = 255
                annotation[f"Mask/{camera}/mask/0"] = cv2.imencode(".png", mask)[1]
        out = tmp_path / convention
        assert _script("renderme360").main(["--anno", str(anno), "--raw", str(raw), "--out", str(out)]) == 0
        capture = _check_capture(out, ["cam00", "cam05", "cam10", "cam15"], intrinsics, (120, 160), masks=True)
        assert np.asarray(Image.open(capture.frames[2].mask_path)).shape == (160, 120)
    code = _script("renderme360").main(["--anno", str(raw), "--raw", str(raw), "--out", str(tmp_path / "bad")])
    assert code == 2 and not (tmp_path / "bad").exists()


def test_the_scripts_document_source_and_licence_and_download_nothing():
    for path in sorted(SCRIPTS.glob("*.py")):
        text = path.read_text()
        head = text.split('"""')[1]
        assert "licen" in head.lower() and "https://" in head and "downloads nothing" in head, path.name
        assert not any(word in text for word in ("urllib", "requests", "huggingface_hub", "urlopen")), path.name
