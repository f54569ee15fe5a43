import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.errors import DetectorUnavailableError, NoFaceError
from dp360.imaging import load_portrait
from dp360.prepare import PrepareSettings, prepare_portrait
from dp360.prepare.align import CROP_SIZE, ffhq_square, panohead_crop_transform, warp_crop
from dp360.prepare.detectors import DlibDetector, FaceDetection, RetinaFaceDetector, make_detector
from dp360.prepare.pose import FACE_MODEL_5, pose_from_landmarks

from .images import cartoon_head, no_face, two_faces


@pytest.fixture(scope="module")
def dlib_detector():
    return DlibDetector()


@pytest.fixture(scope="module")
def astronaut_face(dlib_detector, astronaut) -> FaceDetection:
    faces = dlib_detector.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def _label(folder: Path):
    dataset = json.loads((folder / "dataset.json").read_text())
    ((name, label),) = dataset["labels"]
    assert name == "crop.png"
    return cameras.parse_panohead_label(label)


# --------------------------------------------------------------------------------- geometry


def test_ffhq_square_of_an_upright_face():
    # Eyes 100 px apart at y=200, mouth 100 px below: half size = max(2*100, 1.8*100) = 200.
    landmarks = np.array([[150, 200], [250, 200], [200, 250], [170, 300], [230, 300]], float)
    centre, x_axis, y_axis = ffhq_square(landmarks)
    assert np.allclose(centre, [200, 210]) and np.allclose(x_axis, [200, 0]) and np.allclose(y_axis, [0, 200])
    transform = panohead_crop_transform(landmarks)
    # The 563 px widened square: 5% of the 400 px side added left/right, 10% on top, none below.
    assert np.allclose(transform.corners[0], [0 - 20, 10 - 40]) and np.allclose(transform.corners[2], [400 + 20, 410])
    eyes = transform.apply(landmarks[:2])
    assert np.allclose(eyes[:, 1], eyes[0, 1]) and np.allclose(transform.invert(eyes), landmarks[:2])


def test_crop_removes_roll_and_scale(astronaut, dlib_detector, astronaut_face):
    reference = warp_crop(astronaut, panohead_crop_transform(astronaut_face.landmarks5))
    assert reference.shape == (CROP_SIZE, CROP_SIZE, 3)
    # Rotate the photo by 20 degrees and enlarge it 1.6x: the aligned crop barely changes.
    matrix = cv2.getRotationMatrix2D((256, 256), 20, 1.6)
    matrix[:, 2] += (0.3 * 512, 0.3 * 512)
    moved = cv2.warpAffine(
        astronaut, matrix, (int(512 * 1.6), int(512 * 1.6)), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
    )
    face = dlib_detector.detect(moved)[0]
    transform = panohead_crop_transform(face.landmarks5)
    eyes = transform.apply(face.landmarks5[:2])
    assert abs(eyes[0, 1] - eyes[1, 1]) < 2.0
    again = warp_crop(moved, transform)
    centre = (slice(128, 384), slice(128, 384))  # the face region, away from padding differences
    correlation = np.corrcoef(reference[centre].ravel().astype(float), again[centre].ravel().astype(float))[0, 1]
    assert correlation > 0.9
    unrelated = np.corrcoef(reference[centre].ravel().astype(float), np.rot90(again)[centre].ravel().astype(float))[
        0, 1
    ]
    assert unrelated < correlation - 0.2


def test_padding_reflects_where_the_crop_leaves_the_image(astronaut, astronaut_face):
    # Shift the face to the image's top-left corner: most of the crop falls outside.
    shifted = astronaut[70:, 110:]
    transform_shifted = panohead_crop_transform(astronaut_face.landmarks5 - [110, 70])
    crop = warp_crop(np.ascontiguousarray(shifted), transform_shifted)
    assert transform_shifted.corners[0][1] < 0  # the crop starts above the image
    assert crop.std(axis=(0, 1)).min() > 5  # padded with image content, not a flat border
    assert not np.all(crop[:20] == crop[0, 0])


@pytest.mark.parametrize("yaw,elevation", [(0, 0), (25, 0), (-40, 10), (15, -15), (60, 5)])
def test_pose_from_landmarks_recovers_the_camera(yaw, elevation):
    cam2world = cameras.orbit_pose(yaw, elevation)
    # The generic face, scaled to head size in world units, seen by that camera.
    points = FACE_MODEL_5 * 0.004
    pixels = cameras.project_points(points, cam2world, cameras.normalized_intrinsics(), CROP_SIZE, CROP_SIZE)
    pose = pose_from_landmarks(pixels, CROP_SIZE)
    assert pose.yaw == pytest.approx(yaw, abs=0.5)
    assert pose.elevation == pytest.approx(elevation, abs=0.5)
    assert abs(pose.roll) < 0.5
    assert np.linalg.norm(pose.cam2world[:3, 3]) == pytest.approx(2.7)
    # A face turned by positive yaw shows its nose on the image's left of the eye midpoint.
    if yaw > 10:
        assert pixels[2, 0] < pixels[:2, 0].mean()


# ------------------------------------------------------------------------------ the stage


def test_prepare_astronaut(tmp_path, astronaut_path):
    result = prepare_portrait(load_portrait(astronaut_path), tmp_path, PrepareSettings(detector="dlib"))
    crop = np.asarray(Image.open(tmp_path / "crop.png"))
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    cam2world, intrinsics = _label(tmp_path)
    position = cam2world[:3, 3]
    assert np.linalg.norm(position) == pytest.approx(2.7, abs=1e-5)
    assert np.allclose(cam2world[:3, 2], -position / np.linalg.norm(position), atol=1e-5)  # looks at the origin
    assert np.allclose(intrinsics, cameras.normalized_intrinsics())
    assert abs(result.pose.yaw) < 15 and abs(result.pose.elevation) < 20
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    assert overlay.shape == (512, 512, 3)
    assert np.abs(overlay.astype(int) - np.asarray(Image.open(astronaut_path).convert("RGB")).astype(int)).max() > 100
    face = json.loads((tmp_path / "face.json").read_text())
    assert face["detector"] == "dlib" and face["face_count"] == 1 and len(face["landmarks5"]) == 5


def test_overrides_set_the_camera(tmp_path, astronaut_path):
    result = prepare_portrait(
        load_portrait(astronaut_path), tmp_path, PrepareSettings(detector="dlib", yaw=30.0, pitch=-10.0)
    )
    cam2world, _ = _label(tmp_path)
    assert np.allclose(cam2world, cameras.orbit_pose(30, -10), atol=1e-5)
    assert result.pose.source == "override"
    # Only yaw given: the elevation keeps the estimate.
    result = prepare_portrait(
        load_portrait(astronaut_path), tmp_path / "b", PrepareSettings(detector="dlib", yaw=-20.0)
    )
    assert result.pose.yaw == pytest.approx(-20) and result.pose.elevation == pytest.approx(
        json.loads((tmp_path / "b" / "face.json").read_text())["estimated_pose"]["elevation_deg"], abs=1e-3
    )


def test_no_face_says_to_use_no_crop(tmp_path):
    image = load_portrait(no_face(tmp_path / "scene.png"))
    with pytest.raises(NoFaceError, match="--no-crop"):
        prepare_portrait(image, tmp_path / "out", PrepareSettings(detector="dlib"))


def test_no_crop_accepts_an_aligned_cartoon(tmp_path):
    path = cartoon_head(tmp_path / "toon.png")
    result = prepare_portrait(load_portrait(path), tmp_path / "out", PrepareSettings(detector="dlib", no_crop=True))
    crop = np.asarray(Image.open(tmp_path / "out" / "crop.png"))
    assert crop.shape == (512, 512, 3)
    assert np.abs(crop.astype(int) - np.asarray(Image.open(path)).astype(int)).mean() < 2
    assert result.pose.source == "default" and np.allclose(
        _label(tmp_path / "out")[0], cameras.orbit_pose(0, 0), atol=1e-5
    )
    assert any("frontal" in note for note in result.notes)
    result = prepare_portrait(
        load_portrait(path), tmp_path / "yawed", PrepareSettings(detector="dlib", no_crop=True, yaw=45.0)
    )
    assert np.allclose(_label(tmp_path / "yawed")[0], cameras.orbit_pose(45, 0), atol=1e-5)


def test_no_crop_on_non_square_uses_the_centre(tmp_path, astronaut):
    wide = np.concatenate([np.zeros((512, 100, 3), np.uint8), astronaut, np.zeros((512, 100, 3), np.uint8)], axis=1)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    result = prepare_portrait(
        load_portrait(tmp_path / "wide.png"), tmp_path / "out", PrepareSettings(detector="dlib", no_crop=True)
    )
    crop = np.asarray(Image.open(tmp_path / "out" / "crop.png"))
    assert np.abs(crop.astype(int) - astronaut.astype(int)).mean() < 3
    assert result.pose.source == "landmarks"  # the astronaut's face is found inside the square
    assert any("not square" in note for note in result.notes)


def test_rgba_input_keeps_a_mask(tmp_path, astronaut):
    alpha = np.zeros(astronaut.shape[:2], np.uint8)
    cv2.circle(alpha, (220, 130), 120, 255, -1)
    Image.fromarray(np.dstack([astronaut, alpha]), "RGBA").save(tmp_path / "cut.png")
    prepare_portrait(load_portrait(tmp_path / "cut.png"), tmp_path / "out", PrepareSettings(detector="dlib"))
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png"))
    crop = np.asarray(Image.open(tmp_path / "out" / "crop.png"))
    assert mask.shape == (512, 512) and mask.max() == 255 and mask.min() == 0
    assert np.all(crop[mask == 0] >= 250)  # the background was composited on white


def test_several_faces_pick_largest_or_index(tmp_path, astronaut):
    image = load_portrait(two_faces(astronaut, tmp_path / "two.png"))
    first = prepare_portrait(image, tmp_path / "a", PrepareSettings(detector="dlib"))
    assert first.face_count == 2 and any("2 faces" in note for note in first.notes)
    second = prepare_portrait(image, tmp_path / "b", PrepareSettings(detector="dlib", face_index=1))
    assert first.detection.area > second.detection.area
    assert second.detection.box[0] > 512  # the smaller face is on the right half
    with pytest.raises(NoFaceError, match="out of range"):
        prepare_portrait(image, tmp_path / "c", PrepareSettings(detector="dlib", face_index=2))


# ------------------------------------------------------------------------------ detectors


def _write_retinaface_weights(folder: Path, corrupt: bool = False) -> None:
    """A randomly initialised mobile0.25 RetinaFace saved like facexlib's release files
    (DataParallel 'module.' prefixes), to exercise the real loading path offline."""
    import torch
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    state = RetinaFace(network_name="mobile0.25", half=False, device="cpu").state_dict()
    state = {f"module.{key}": value for key, value in state.items()}
    if corrupt:
        state["module.unexpected.weight"] = torch.zeros(1)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "detection_mobilenet0.25_Final.pth")


def test_retinaface_loads_local_weights_strictly(tmp_path, astronaut):
    _write_retinaface_weights(tmp_path / "w")
    detector = RetinaFaceDetector(
        network="mobile0.25", weights_dir=tmp_path / "w", allow_download=False, confidence=0.0
    )
    faces = detector.detect(astronaut)
    # Random weights find random "faces"; what matters is the decoded structure.
    assert faces and all(isinstance(face, FaceDetection) and face.landmarks5.shape == (5, 2) for face in faces)
    assert all(a.area >= b.area for a, b in zip(faces, faces[1:]))
    _write_retinaface_weights(tmp_path / "bad", corrupt=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        RetinaFaceDetector(network="mobile0.25", weights_dir=tmp_path / "bad", allow_download=False)


def test_retinaface_without_weights_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DetectorUnavailableError, match="--detector dlib"):
        make_detector("retinaface", weights_dir=tmp_path / "empty")


def test_auto_falls_back_to_dlib_offline(tmp_path):
    detector = make_detector("auto")
    assert detector.name == "dlib" and "offline dlib" in detector.note
