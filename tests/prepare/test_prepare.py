import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.errors import DetectorUnavailableError, NoFaceError
from dp360.imaging import load_portrait
from dp360.prepare import PrepareSettings, prepare_portrait
from dp360.prepare import stage as prepare_stage
from dp360.prepare.align import (
    CROP_SIZE,
    EXPAND_TOP,
    ffhq_square,
    panohead_crop_transform,
    recentre_square,
    square_frame,
    warp_crop,
)
from dp360.prepare.detectors import DlibDetector, FaceDetection, RetinaFaceDetector, dlib_landmarks68, make_detector
from dp360.prepare.face_model import FACE_MODEL_68, MIRROR_68, landmarks5_of_68
from dp360.prepare.pose import FACE_MODEL_5, fit_head, pose_from_landmarks
from dp360.prepare.stage import CropRefusedError, crop_limit_problems
from dp360.prepare.synthetic import project_landmarks, render_head, textured_head

from ..images import cartoon_head, no_face, two_faces


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
@pytest.mark.parametrize("model", [FACE_MODEL_5, FACE_MODEL_68], ids=["5 points", "68 points"])
def test_pose_from_landmarks_recovers_the_camera(yaw, elevation, model):
    cam2world = cameras.orbit_pose(yaw, elevation)
    # The generic head, scaled to head size in world units, seen by that camera.
    pixels = cameras.project_points(model * 0.004, cam2world, cameras.normalized_intrinsics(), CROP_SIZE, CROP_SIZE)
    pose = pose_from_landmarks(pixels, CROP_SIZE)
    assert pose.yaw == pytest.approx(yaw, abs=0.5)
    assert pose.elevation == pytest.approx(elevation, abs=0.5)
    assert abs(pose.roll) < 0.5
    assert np.linalg.norm(pose.cam2world[:3, 3]) == pytest.approx(2.7)
    # A face turned by positive yaw shows its nose on the image's left of the eye midpoint.
    five = landmarks5_of_68(pixels) if len(model) == 68 else pixels
    if yaw > 10:
        assert five[2, 0] < five[:2, 0].mean()


def test_face_model_is_symmetric_and_centred():
    assert np.allclose(FACE_MODEL_68[MIRROR_68] * [-1, 1, 1], FACE_MODEL_68)
    assert np.allclose(FACE_MODEL_5, landmarks5_of_68(FACE_MODEL_68))
    # The head's centre (the origin) lies behind the face: eyes ~85 mm, nose tip further in front.
    assert 80 < FACE_MODEL_5[:2, 2].mean() < 90 and FACE_MODEL_68[30, 2] > FACE_MODEL_5[:2, 2].mean() + 20
    # 65 mm between the eye centres, the chin ~115 mm below the eyes
    assert np.linalg.norm(FACE_MODEL_5[1] - FACE_MODEL_5[0]) == pytest.approx(65.7, abs=1)


@pytest.mark.parametrize("yaw,elevation", [(0, 0), (35, 0), (-50, 10), (20, -20)])
def test_fit_finds_the_head_centre_and_size(yaw, elevation):
    """The fit in the FFHQ square: where the head's centre projects, the size relative to a
    frontal face, and the angles, on exact landmarks of a head at a known pose."""
    # A person with a 6% larger, 10% deeper face, with noise on the landmarks: a head that is
    # not the fitted model.
    rng = np.random.default_rng(1)
    shape = FACE_MODEL_68 * [1.06, 1.06, 1.1] + rng.normal(0, 1.0, FACE_MODEL_68.shape)
    pixels = project_landmarks(shape, yaw, elevation, eye_distance_px=60)
    square = ffhq_square(landmarks5_of_68(pixels))
    frame = square_frame(square)
    fit = fit_head(frame.apply(pixels), CROP_SIZE, prepare_stage.SQUARE_FOCAL_SCALE)
    assert fit.yaw == pytest.approx(yaw, abs=3) and fit.elevation == pytest.approx(elevation, abs=3)
    # The head's centre projects to the image centre (the camera looks at it).
    truth = frame.apply([[256, 256]])[0]
    assert np.allclose(fit.centre, truth, atol=0.02 * CROP_SIZE)
    # Frontal: the square already sits on the head, and has its size (a larger face has a larger square).
    if yaw == elevation == 0:
        assert np.abs(fit.offset).max() < 0.05 and fit.scale == pytest.approx(1.0, abs=0.04)
    # Turned: the head's centre lies towards the back of the head (image right for yaw > 0).
    if abs(yaw) > 20:
        assert np.sign(fit.offset[0]) == np.sign(yaw) and abs(fit.offset[0]) > 0.25
    recentred = recentre_square(square, fit.offset, fit.scale)
    assert np.linalg.norm(recentred[0] - [256, 256]) < 0.03 * 2 * np.linalg.norm(recentred[1])


@pytest.fixture(scope="module")
def astronaut_head(astronaut, astronaut_face):
    return textured_head(astronaut, astronaut_face.landmarks68)


def _square_centre(transform) -> np.ndarray:
    """Input pixels of the centre of the (recentred) square inside a widened crop."""
    return transform.invert([[CROP_SIZE / 2, CROP_SIZE * (EXPAND_TOP + 0.5) / (1 + EXPAND_TOP)]])[0]


def test_recrop_centres_a_turned_head_and_mirrors(tmp_path, astronaut_head):
    """The astronaut's face on the generic head, turned 35 degrees: the crop moves from the face
    towards the back of the head, onto the head's centre (the image centre); in the mirrored
    image it moves the other way by as much."""
    image = render_head(astronaut_head, 35.0, 0.0)
    shifts, centres = [], []
    for name, pixels in (("turned", image), ("mirrored", np.ascontiguousarray(image[:, ::-1]))):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        result = prepare_portrait(
            load_portrait(tmp_path / f"{name}.png"), tmp_path / name, PrepareSettings(detector="dlib")
        )
        first = panohead_crop_transform(result.detection.landmarks5)  # the FFHQ square alone (before)
        before, after = _square_centre(first), _square_centre(result.transform)
        side = result.transform.side
        # Before, the square sat on the face, a fifth of the crop off the head's centre; now on it.
        assert np.linalg.norm(before - 256) > 0.15 * side and np.linalg.norm(after - 256) < 0.04 * side
        shifts.append(after - before)
        centres.append(after)
        face = json.loads((tmp_path / name / "face.json").read_text())
        assert face["head_fit"]["landmarks"] == 68 and face["crop_side_in_input_px"] == pytest.approx(side, abs=0.01)
    # Yaw +35: the face looks to the image left, the back of the head is on the right.
    assert shifts[0][0] > 0.15 * side and shifts[1][0] < -0.15 * side
    # The mirrored image's shift is the mirror of the shift (dlib is not exactly symmetric).
    assert shifts[1][0] == pytest.approx(-shifts[0][0], rel=0.15) and abs(shifts[0][1] - shifts[1][1]) < 0.02 * side
    assert centres[1][0] == pytest.approx(image.shape[1] - centres[0][0], abs=0.02 * side)


def test_recrop_keeps_a_frontal_crop(tmp_path, astronaut_path, astronaut_face):
    result = prepare_portrait(load_portrait(astronaut_path), tmp_path, PrepareSettings(detector="dlib"))
    first = panohead_crop_transform(astronaut_face.landmarks5)
    assert np.linalg.norm(_square_centre(result.transform) - _square_centre(first)) < 0.05 * first.side
    assert result.transform.side == pytest.approx(first.side, rel=0.05)


def _fit_at(yaw=0.0, elevation=0.0, roll=0.0, zoom=1.0):
    """The fit made in the FFHQ square of the generic head at a pose, rolled and zoomed in it."""
    pixels = project_landmarks(FACE_MODEL_68, yaw, elevation)
    frame = square_frame(ffhq_square(landmarks5_of_68(project_landmarks(FACE_MODEL_68, 0, 0))))
    inside = frame.apply(pixels)
    rotation = cv2.getRotationMatrix2D((256, 256), roll, zoom)
    return fit_head(inside @ rotation[:, :2].T + rotation[:, 2], CROP_SIZE, prepare_stage.SQUARE_FOCAL_SCALE)


@pytest.mark.parametrize(
    "pose,problem",
    [
        ({}, None),
        ({"yaw": 60}, None),
        ({"yaw": -85, "elevation": 20}, None),
        ({"yaw": 100}, r"^yaw \+9\d degrees, beyond \+-90$"),
        ({"elevation": -88}, r"^pitch -8\d degrees, beyond \+-80$"),
        ({"roll": 60}, r"^roll [+-]\d+ degrees, beyond \+-50$"),
        ({"zoom": 1.45}, r"^head size 1\.[34]\d x a frontal face's, outside 0\.7-1\.3$"),
        ({"zoom": 0.6}, r"^head size 0\.6\d x"),
    ],
)
def test_crop_limits_are_panoheads(pose, problem):
    problems = crop_limit_problems(_fit_at(**pose))
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and re.search(problem, problems[0]), problems


def test_head_outside_the_limits_is_refused_unless_forced(tmp_path, astronaut_path, monkeypatch):
    image = load_portrait(astronaut_path)
    # The astronaut's head is 0.98 x a frontal face in her FFHQ square: narrow the limits to refuse it.
    monkeypatch.setattr(prepare_stage, "SCALE_RANGE", (1.05, 1.3))
    with pytest.raises(CropRefusedError, match=r"outside PanoHead's cropping limits \(head size 0\.98.*--force-crop"):
        prepare_portrait(image, tmp_path / "refused", PrepareSettings(detector="dlib"))
    assert not (tmp_path / "refused" / "crop.png").exists()
    result = prepare_portrait(image, tmp_path / "forced", PrepareSettings(detector="dlib", force_crop=True))
    assert (tmp_path / "forced" / "crop.png").is_file()
    assert any(note.startswith("--force-crop") and "head size 0.98" in note for note in result.notes)


def _small_face(astronaut: np.ndarray, path: Path, size: int = 200) -> Path:
    canvas = np.full((480, 480, 3), 120, np.uint8)
    canvas[100 : 100 + size, 140 : 140 + size] = np.asarray(
        Image.fromarray(astronaut).resize((size, size), Image.LANCZOS)
    )
    Image.fromarray(canvas).save(path)
    return path


def test_small_face_gets_a_note_with_its_upscale(tmp_path, astronaut):
    result = prepare_portrait(
        load_portrait(_small_face(astronaut, tmp_path / "small.png")),
        tmp_path / "out",
        PrepareSettings(detector="dlib"),
    )
    side = result.transform.side
    assert side < 100
    (note,) = [note for note in result.notes if "face is small" in note]
    assert f"{side:.0f} px across" in note and f"enlarged {CROP_SIZE / side:.1f}x" in note
    assert json.loads((tmp_path / "out" / "face.json").read_text())["upscale"] == pytest.approx(
        CROP_SIZE / side, rel=1e-3
    )


def test_tiny_face_is_refused_unless_allowed(tmp_path, astronaut, monkeypatch, cli):
    # dlib finds no face small enough to fall under 64 px (RetinaFace does): raise the floor instead.
    monkeypatch.setattr(prepare_stage, "MIN_CROP_SIDE", 100)
    path = _small_face(astronaut, tmp_path / "tiny.png")
    with pytest.raises(
        CropRefusedError, match=r"only \d+ px across its crop, so it would be enlarged [\d.]+x.*--allow-small"
    ):
        prepare_portrait(load_portrait(path), tmp_path / "refused", PrepareSettings(detector="dlib"))
    result = prepare_portrait(
        load_portrait(path), tmp_path / "allowed", PrepareSettings(detector="dlib", allow_small=True)
    )
    assert any("face is small" in note for note in result.notes)
    # The same through the command line: one sentence and exit 2, then --allow-small.
    code, _, stderr = cli("prepare", path, "--out", tmp_path / "run", "--detector", "dlib")
    assert code == 2 and "--allow-small" in stderr and "Traceback" not in stderr
    code, stdout, stderr = cli(
        "prepare", path, "--out", tmp_path / "run", "--detector", "dlib", "--allow-small", "--json"
    )
    assert code == 0, stderr
    assert any("face is small" in note for note in json.loads(stdout)["notes"])


def test_force_crop_on_the_command_line(tmp_path, astronaut_path, monkeypatch, cli):
    monkeypatch.setattr(prepare_stage, "SCALE_RANGE", (1.05, 1.3))
    code, _, stderr = cli("prepare", astronaut_path, "--out", tmp_path / "run", "--detector", "dlib")
    assert code == 2 and "--force-crop" in stderr and "Traceback" not in stderr
    code, stdout, stderr = cli(
        "prepare", astronaut_path, "--out", tmp_path / "run", "--detector", "dlib", "--force-crop", "--json"
    )
    assert code == 0, stderr
    assert any("--force-crop" in note for note in json.loads(stdout)["notes"])


def test_thin_image_with_no_crop_notes_the_upscale(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (130, 5000, 3), dtype=np.uint8)).save(tmp_path / "thin.png")
    image = load_portrait(tmp_path / "thin.png")
    assert min(image.size) == 128
    result = prepare_portrait(
        image, tmp_path / "out", PrepareSettings(detector="dlib", no_crop=True, yaw=0.0, pitch=0.0)
    )
    assert any("128 px across" in note and "enlarged 4.0x" in note for note in result.notes)


def test_retinaface_landmarks_get_dlibs_68(astronaut, astronaut_face):
    """RetinaFace gives five landmarks: dlib's 68-point model placed from them matches dlib's own."""
    points = dlib_landmarks68(astronaut, astronaut_face.landmarks5)
    eyes = np.linalg.norm(astronaut_face.landmarks5[1] - astronaut_face.landmarks5[0])
    assert np.linalg.norm(points - astronaut_face.landmarks68, axis=1).mean() < 0.03 * eyes
    # Five points that are not a face's are refused rather than fitted.
    assert dlib_landmarks68(astronaut, astronaut_face.landmarks5[[1, 0, 2, 4, 3]] + [0, 40]) is None


def test_five_landmark_detections_are_fitted_with_68(tmp_path, astronaut_path, monkeypatch):
    """A detector that gives five landmarks (RetinaFace) gets dlib's 68 for the fit; when those
    cannot be had, the five are fitted and a note says the elevation is rough."""
    original = DlibDetector.detect

    def five_only(self, rgb):
        return [FaceDetection(d.box, d.score, d.landmarks5) for d in original(self, rgb)]

    monkeypatch.setattr(DlibDetector, "detect", five_only)
    image = load_portrait(astronaut_path)
    result = prepare_portrait(image, tmp_path / "a", PrepareSettings(detector="dlib"))
    assert result.fit.landmark_count == 68 and abs(result.pose.elevation) < 10
    monkeypatch.setattr(prepare_stage, "dlib_landmarks68", lambda rgb, five: None)
    result = prepare_portrait(image, tmp_path / "b", PrepareSettings(detector="dlib"))
    assert result.fit.landmark_count == 5 and any("five landmarks only" in note for note in result.notes)


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
