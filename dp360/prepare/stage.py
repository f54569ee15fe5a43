"""The prepare stage: detect the face, crop like PanoHead (both steps: the FFHQ square, then
the recrop on the fitted head), estimate the camera, and write `crop.png`, `dataset.json`
(PanoHead format), `face.json`, `overlay.png` (and `mask.png` when the input had transparency)
into a folder.

PanoHead's cropping drops photos whose fitted head is outside its limits and crops under 256 px;
dp360 refuses the first (unless --force-crop) and faces under 64 px (unless --allow-small), and
says so in a note when it goes ahead anyway or when the face is under 256 px.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .. import cache, cameras, layout, weights
from ..atomic import write_json_atomic
from ..checks import check_float, check_int
from ..errors import DetectorUnavailableError, Dp360Error, NoFaceError
from ..imaging import LoadedImage, save_image_atomic
from ..pipeline.stage import Stage, StageContext
from ..weights import Need
from .align import (
    CROP_SIZE,
    EXPAND_LEFT,
    EXPAND_RIGHT,
    CropTransform,
    center_square,
    ffhq_square,
    recentre_square,
    square_frame,
    warp_crop,
    widened_crop_transform,
)
from .detectors import FaceDetection, dlib_landmarks68, make_detector
from .pose import HeadFit, HeadPose, fit_head, pose_from_angles, pose_from_fit

log = logging.getLogger(__name__)

CROP_NAME = layout.name_of(layout.CROP)
DETECTORS = ("auto", "retinaface", "dlib")
# Orbit cameras look at the origin with y up: at +-90 degrees elevation the view is undefined.
PITCH_LIMIT = 89.0
OVERLAY_MAX_SIDE = 1024
# PanoHead's recrop drops a photo when its fitted head is outside these limits.
SCALE_RANGE = (0.7, 1.3)  # head size relative to a frontal face filling the FFHQ square
FIT_YAW_LIMIT, FIT_PITCH_LIMIT, FIT_ROLL_LIMIT = 90.0, 80.0, 50.0  # degrees
OFFSET_LIMIT = 1.0  # head centre off the FFHQ square's centre, in half-sides
# Faces whose crop covers fewer input pixels than this are enlarged a lot: a note says so
# (PanoHead's cropping drops them); below MIN_CROP_SIDE they are refused unless --allow-small.
SMALL_CROP_SIDE = 256
MIN_CROP_SIDE = 64
# The FFHQ square is 1/1.1 of PanoHead's crop, whose intrinsics the fit uses.
SQUARE_FOCAL_SCALE = 1.0 + EXPAND_LEFT + EXPAND_RIGHT


class CropRefusedError(Dp360Error):
    """The face cannot be cropped like PanoHead's data without an explicit go-ahead."""


@dataclass
class PrepareSettings:
    """Settings of the prepare stage (all of them enter the stage's resume key)."""

    detector: str = "auto"  # auto | retinaface | dlib
    no_crop: bool = False  # the input is already aligned like PanoHead's crops
    yaw: float | None = None  # degrees; overrides the estimated yaw (0 = frontal)
    pitch: float | None = None  # degrees; overrides the estimated elevation (> 0 = camera above)
    face_index: int | None = None  # which face when there are several (0 = largest)
    detector_weights: str | None = None  # folder holding RetinaFace weights
    force_crop: bool = False  # crop a head outside PanoHead's cropping limits (with a note)
    allow_small: bool = False  # crop a face smaller than MIN_CROP_SIDE px (with a note)

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, device: str | None = None) -> None:
        if self.detector not in DETECTORS:
            raise Dp360Error(f"--detector must be one of {', '.join(DETECTORS)}, not {self.detector!r}.")
        if self.yaw is not None:
            check_float("--yaw", self.yaw, -180.0, 180.0)
        if self.pitch is not None:
            check_float("--pitch", self.pitch, -PITCH_LIMIT, PITCH_LIMIT)
        if self.face_index is not None:
            check_int("--face-index", self.face_index, 0, 1000)


@dataclass
class PrepareResult:
    crop: np.ndarray
    pose: HeadPose
    detection: FaceDetection | None
    detector: str | None
    face_count: int
    notes: list[str] = field(default_factory=list)
    fit: HeadFit | None = None
    transform: CropTransform | None = None


def _pick_face(
    detections: list[FaceDetection], settings: PrepareSettings, image_name: str, notes: list[str]
) -> FaceDetection:
    if settings.face_index is not None:
        if not 0 <= settings.face_index < len(detections):
            raise NoFaceError(
                f"--face-index {settings.face_index} is out of range: {len(detections)} face(s) were found in "
                f"'{image_name}' (0 is the largest)."
            )
        return detections[settings.face_index]
    if len(detections) > 1:
        notes.append(f"found {len(detections)} faces; using the largest (pick another with --face-index)")
    return detections[0]


def crop_limit_problems(fit: HeadFit) -> list[str]:
    """PanoHead's recrop limits that `fit` (made in the FFHQ square) breaks, one phrase each."""
    problems = []
    if not SCALE_RANGE[0] <= fit.scale <= SCALE_RANGE[1]:
        problems.append(f"head size {fit.scale:.2f} x a frontal face's, outside {SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g}")
    for name, value, limit in (
        ("yaw", fit.yaw, FIT_YAW_LIMIT),
        ("pitch", fit.elevation, FIT_PITCH_LIMIT),
        ("roll", fit.roll, FIT_ROLL_LIMIT),
    ):
        if abs(value) > limit:
            problems.append(f"{name} {value:+.0f} degrees, beyond +-{limit:g}")
    if np.abs(fit.offset).max() > OFFSET_LIMIT:
        problems.append(
            f"head centre {np.abs(fit.offset).max():.2f} half-sides off the face square's centre, beyond {OFFSET_LIMIT:g}"
        )
    return problems


def _fit_landmarks(rgb: np.ndarray, detection: FaceDetection, notes: list[str]) -> np.ndarray:
    """The landmarks to fit the head to: dlib's 68 (for RetinaFace, which gives five, dlib's
    68-point model is run on the face they mark), or the five alone when that fails."""
    if detection.landmarks68 is not None:
        return detection.landmarks68
    points = dlib_landmarks68(rgb, detection.landmarks5)
    if points is None:
        notes.append(
            "the head was fitted to five landmarks only (dlib's 68-point model was unavailable or disagreed with "
            "the detector), so its elevation is rough; set --pitch if you know it"
        )
        return detection.landmarks5
    detection.landmarks68 = points
    return points


def _check_crop_size(side: float, settings: PrepareSettings, image_name: str, notes: list[str]) -> None:
    factor = CROP_SIZE / side
    if side < MIN_CROP_SIDE and not settings.allow_small:
        raise CropRefusedError(
            f"The face in '{image_name}' is only {side:.0f} px across its crop, so it would be enlarged "
            f"{factor:.1f}x to {CROP_SIZE} px; use a larger photo of it, or rerun with --allow-small to go ahead anyway."
        )
    if side < SMALL_CROP_SIDE:
        notes.append(
            f"the face is small: its crop is {side:.0f} px across in the input and was enlarged {factor:.1f}x to "
            f"{CROP_SIZE} px (PanoHead's own cropping drops crops under {SMALL_CROP_SIDE} px), so expect a soft "
            "result; a larger photo gives a sharper one"
        )


def _recrop(
    image: LoadedImage, detection: FaceDetection, settings: PrepareSettings, notes: list[str]
) -> tuple[CropTransform, HeadFit, CropTransform]:
    """PanoHead's two crop steps: the FFHQ square, then the square recentred and rescaled on
    the head fitted in it. Returns the final crop, the fit and the FFHQ square's frame."""
    square = ffhq_square(detection.landmarks5)
    frame = square_frame(square, CROP_SIZE)
    points = _fit_landmarks(image.rgb, detection, notes)
    fit = fit_head(frame.apply(points), CROP_SIZE, SQUARE_FOCAL_SCALE)
    problems = crop_limit_problems(fit)
    if problems and not settings.force_crop:
        raise CropRefusedError(
            f"The head fitted in '{image.path.name}' is outside PanoHead's cropping limits ({'; '.join(problems)}), "
            "so its crop would be unlike PanoHead's data; rerun with --force-crop to crop it anyway, or with "
            "--no-crop (and --yaw/--pitch) if the image is already aligned."
        )
    if problems:
        notes.append(
            f"--force-crop: cropped although the head is outside PanoHead's cropping limits ({'; '.join(problems)})"
        )
    transform = widened_crop_transform(recentre_square(square, fit.offset, fit.scale), CROP_SIZE)
    return transform, fit, frame


def _estimate(image: LoadedImage, settings: PrepareSettings, device: str, notes: list[str]):
    """Returns crop, mask, transform, detection, detector name, face count, pose, estimated
    pose, the head fit and the frame it was made in (None when nothing was detected)."""
    needs_pose = settings.yaw is None or settings.pitch is None
    detector = None
    if not settings.no_crop or needs_pose:
        try:
            weights_dir = Path(settings.detector_weights) if settings.detector_weights else None
            detector = make_detector(settings.detector, device=device, weights_dir=weights_dir, allow_download=False)
            if detector.note:
                notes.append(detector.note)
        except DetectorUnavailableError:
            if not settings.no_crop:
                raise
            notes.append(f"face detector '{settings.detector}' is unavailable, so the pose is not estimated")

    detection: FaceDetection | None = None
    fit: HeadFit | None = None
    fit_frame: CropTransform | None = None
    face_count = 0
    if settings.no_crop:
        crop, transform = center_square(image.rgb)
        mask = None if image.alpha is None else center_square(image.alpha)[0]
        if image.rgb.shape[0] != image.rgb.shape[1]:
            notes.append("--no-crop: the image is not square, so its centre square was used")
        _check_crop_size(transform.side, settings, image.path.name, notes)
        if detector is not None:
            found = detector.detect(crop)
            face_count = len(found)
            if found:
                in_crop = _pick_face(found, settings, image.path.name, notes)
                # The aligned image is the crop: the head is fitted in it as it is.
                fit = fit_head(_fit_landmarks(crop, in_crop, notes), CROP_SIZE)
                fit_frame = transform
                detection = FaceDetection(
                    box=transform.invert(in_crop.box.reshape(2, 2)).reshape(4),
                    score=in_crop.score,
                    landmarks5=transform.invert(in_crop.landmarks5),
                    landmarks68=None if in_crop.landmarks68 is None else transform.invert(in_crop.landmarks68),
                )
            elif needs_pose:
                notes.append(
                    "--no-crop: no face was detected, so a frontal camera is assumed (set --yaw/--pitch if not)"
                )
    else:
        found = detector.detect(image.rgb)
        face_count = len(found)
        if not found:
            raise NoFaceError(
                f"No face was found in '{image.path.name}'; if it is already aligned (a stylized or cartoon head "
                "that detectors miss), rerun with --no-crop, and add --yaw/--pitch if it is not frontal."
            )
        detection = _pick_face(found, settings, image.path.name, notes)
        transform, fit, fit_frame = _recrop(image, detection, settings, notes)
        _check_crop_size(transform.side, settings, image.path.name, notes)
        crop = warp_crop(image.rgb, transform)
        mask = None if image.alpha is None else warp_crop(image.alpha, transform, blur_padding=False)

    estimated = pose_from_fit(fit) if fit is not None else pose_from_angles(0.0, 0.0, "default")
    if needs_pose:
        pose = estimated
        if settings.yaw is not None or settings.pitch is not None:
            pose = pose_from_angles(
                settings.yaw if settings.yaw is not None else estimated.yaw,
                settings.pitch if settings.pitch is not None else estimated.elevation,
                "override",
            )
    else:
        pose = pose_from_angles(settings.yaw, settings.pitch, "override")
    detector_name = detector.name if detector else None
    return crop, mask, transform, detection, detector_name, face_count, pose, estimated, fit, fit_frame


def _draw_overlay(
    image: LoadedImage,
    transform: CropTransform,
    detection: FaceDetection | None,
    pose: HeadPose,
    detector: str | None,
    fit: HeadFit | None = None,
    fit_frame: CropTransform | None = None,
) -> np.ndarray:
    canvas = image.rgb.copy()
    longest = max(canvas.shape[:2])
    factor = min(1.0, OVERLAY_MAX_SIDE / longest)
    if factor < 1.0:
        canvas = cv2.resize(
            canvas, (round(canvas.shape[1] * factor), round(canvas.shape[0] * factor)), interpolation=cv2.INTER_AREA
        )
    thickness = max(1, round(max(canvas.shape[:2]) / 300))

    def pt(xy):
        return tuple(int(round(v * factor)) for v in xy)

    if fit_frame is not None and fit_frame is not transform:
        # grey: the crop of the FFHQ square alone, before the recrop moved it onto the head
        corners = fit_frame.corners
        square = (corners.mean(0), (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2)
        first = widened_crop_transform(square).corners
        cv2.polylines(
            canvas, [np.round(first * factor).astype(np.int32)], True, (150, 150, 150), thickness, cv2.LINE_AA
        )
    cv2.polylines(
        canvas, [np.round(transform.corners * factor).astype(np.int32)], True, (255, 210, 0), thickness, cv2.LINE_AA
    )
    if detection is not None:
        cv2.rectangle(canvas, pt(detection.box[:2]), pt(detection.box[2:]), (0, 220, 0), thickness, cv2.LINE_AA)
        if detection.landmarks68 is not None:
            for point in detection.landmarks68:
                cv2.circle(canvas, pt(point), max(1, thickness // 2), (255, 255, 255), -1, cv2.LINE_AA)
        for point in detection.landmarks5:
            cv2.circle(canvas, pt(point), thickness + 1, (255, 0, 0), -1, cv2.LINE_AA)
    if fit is not None and fit_frame is not None:
        axes = fit_frame.invert(fit.axes())
        for tip, colour in zip(axes[1:], [(255, 0, 0), (0, 255, 0), (0, 80, 255)]):
            cv2.arrowedLine(canvas, pt(axes[0]), pt(tip), colour, thickness + 1, cv2.LINE_AA, tipLength=0.2)
        centre = fit_frame.invert(fit.centre)[0]  # the head's centre: the crop square's centre
        cv2.drawMarker(canvas, pt(centre), (255, 0, 255), cv2.MARKER_CROSS, 8 * thickness, thickness + 1, cv2.LINE_AA)
    label = f"yaw {pose.yaw:+.1f}  elev {pose.elevation:+.1f}  ({pose.source}{', ' + detector if detector else ''})"
    scale = max(canvas.shape[:2]) / 900
    origin = (8, int(30 * scale) + 4)
    cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas


def prepare_portrait(
    image: LoadedImage, out_dir: Path, settings: PrepareSettings, device: str = "cpu"
) -> PrepareResult:
    """Run the prepare stage on a loaded image and write its files into `out_dir`."""
    out_dir = Path(out_dir)
    notes: list[str] = []
    crop, mask, transform, detection, detector, face_count, pose, estimated, fit, fit_frame = _estimate(
        image, settings, device, notes
    )

    label = cameras.panohead_label(pose.cam2world)
    save_image_atomic(out_dir / CROP_NAME, crop)
    if mask is not None:
        save_image_atomic(out_dir / "mask.png", mask)
    write_json_atomic(out_dir / layout.name_of(layout.DATASET), cameras.panohead_dataset_json([(CROP_NAME, label)]))
    face = {
        "detector": detector,
        "face_count": face_count,
        "pose": pose.as_dict(),
        "estimated_pose": estimated.as_dict() if estimated.source == "landmarks" else None,
        "crop_corners_in_input": transform.corners.round(3).tolist(),
        "crop_side_in_input_px": round(transform.side, 2),
        "upscale": round(CROP_SIZE / transform.side, 4),
        "input_to_crop_affine": transform.matrix.round(6).tolist(),
        "camera_label": label,
        "head_fit": None if fit is None else fit.as_dict(),
        "head_fit_frame_corners_in_input": None if fit_frame is None else fit_frame.corners.round(3).tolist(),
    }
    if detection is not None:
        face.update(
            {
                "box": detection.box.round(2).tolist(),
                "score": round(detection.score, 4),
                "landmarks5": detection.landmarks5.round(2).tolist(),
                "landmarks5_in_crop": transform.apply(detection.landmarks5).round(2).tolist(),
            }
        )
    write_json_atomic(out_dir / layout.name_of(layout.FACE), face)
    save_image_atomic(
        out_dir / layout.name_of(layout.OVERLAY),
        _draw_overlay(image, transform, detection, pose, detector, fit, fit_frame),
    )
    return PrepareResult(
        crop=crop,
        pose=pose,
        detection=detection,
        detector=detector,
        face_count=face_count,
        notes=notes,
        fit=fit,
        transform=transform,
    )


# -- the stage ------------------------------------------------------------------------------------


def _build(context: StageContext[PrepareSettings], folder: Path) -> dict[str, Any]:
    result = prepare_portrait(context.image, folder, context.config, device=context.device)
    for note in result.notes:
        context.note(note)
    return {"detector": result.detector, "face_count": result.face_count, "pose": result.pose.as_dict()}


def _weights(context: StageContext[PrepareSettings]) -> tuple[Need, ...]:
    """RetinaFace's weights, unless the detector is dlib, they come from --detector-weights, or
    nothing is detected (--no-crop with both angles given). Optional under `auto` (the stage falls
    back to dlib) and with --no-crop (the pose is then not estimated, with a note)."""
    settings = context.config
    if settings.detector == "dlib" or settings.detector_weights:
        return ()
    if settings.no_crop and settings.yaw is not None and settings.pitch is not None:
        return ()
    target = cache.facexlib_dir() / weights.RETINAFACE_FILES["resnet50"]
    return (Need("retinaface", target, optional=settings.detector == "auto" or settings.no_crop),)


PREPARE_STAGE: Stage[PrepareSettings] = Stage(
    name="prepare",
    folder=layout.PREPARED,
    description="detect the face, crop like PanoHead, estimate the camera",
    settings=lambda context: context.config.key_dict(),
    inputs=lambda context: {"input": context.image.sha256},
    config="prepare",
    build=_build,
    weights=_weights,
    version=2,  # 2: PanoHead's recrop on a fitted 68-landmark head; small-face and crop-limit checks
)
