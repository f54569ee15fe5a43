"""Face detectors that give a box and five landmarks (eye centres, nose tip, mouth corners).

- `retinaface`: facexlib's RetinaFace (ResNet-50), the accurate default. Its weights are
  fetched once from facexlib's release page into the dp360 cache, or read from a folder you
  fill by hand (see `dp360.cache.facexlib_dir`).
- `dlib`: dlib's HOG face detector plus its 68-point landmark model, shipped inside the
  `face-recognition-models` package, so it works offline. PanoHead's own cropping is built on
  the same 68 landmarks.

`make_detector("auto")` picks RetinaFace when its weights are present or can be fetched and
falls back to dlib otherwise, saying so in `detector.note`. The head fit wants 68 landmarks:
`dlib_landmarks68` places dlib's 68-point model on a face RetinaFace found.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import weights
from ..errors import DetectorUnavailableError, Dp360Error
from ..safety import load_tensors, one_line

log = logging.getLogger(__name__)

DETECTOR_NAMES = ("auto", "retinaface", "dlib")
# Detection runs on a copy whose longest side is at most this (faces in portraits are large).
DETECTION_MAX_SIDE = 1024


@dataclass
class FaceDetection:
    """One face in input-image pixel coordinates.

    `landmarks5` rows: image-left eye centre, image-right eye centre, nose tip,
    image-left mouth corner, image-right mouth corner.
    """

    box: np.ndarray  # (4,) x0, y0, x1, y1
    score: float
    landmarks5: np.ndarray  # (5, 2)
    landmarks68: np.ndarray | None = field(default=None)  # (68, 2) when the detector gives them

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    def scaled(self, factor: float) -> FaceDetection:
        return FaceDetection(
            box=self.box * factor,
            score=self.score,
            landmarks5=self.landmarks5 * factor,
            landmarks68=None if self.landmarks68 is None else self.landmarks68 * factor,
        )


class FaceDetector(Protocol):
    name: str
    note: str | None

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        """All faces in an 8-bit RGB image, largest first."""


def _order_landmarks5(points: np.ndarray) -> np.ndarray:
    """Sort eyes and mouth corners left-to-right in the image, whatever the detector's order."""
    points = np.asarray(points, dtype=np.float64).reshape(5, 2)
    eyes = points[[0, 1]][np.argsort(points[[0, 1], 0])]
    mouth = points[[3, 4]][np.argsort(points[[3, 4], 0])]
    return np.stack([eyes[0], eyes[1], points[2], mouth[0], mouth[1]])


def _detect_downscaled(rgb: np.ndarray, run) -> list[FaceDetection]:
    """Run `run` on a copy no larger than DETECTION_MAX_SIDE and map results back."""
    import cv2

    longest = max(rgb.shape[:2])
    if longest <= DETECTION_MAX_SIDE:
        detections = run(rgb)
    else:
        factor = DETECTION_MAX_SIDE / longest
        small = cv2.resize(
            rgb, (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor)), interpolation=cv2.INTER_AREA
        )
        detections = [d.scaled(1.0 / factor) for d in run(small)]
    return sorted(detections, key=lambda d: d.area, reverse=True)


class RetinaFaceWeightsError(Dp360Error, RuntimeError):
    """A RetinaFace weights file that does not fit the network (a RuntimeError too, as torch's
    strict loading raised before)."""


class RetinaFaceDetector:
    """facexlib RetinaFace; loads weights with `torch.load(weights_only=True)`, never downloads
    unless asked to (`allow_download`)."""

    name = "retinaface"

    def __init__(
        self,
        network: str = "resnet50",
        device: str = "cpu",
        weights_dir: Path | None = None,
        allow_download: bool = True,
        confidence: float = 0.8,
    ):
        from facexlib.detection.retinaface import RetinaFace

        self.note: str | None = None
        self.confidence = confidence
        path = weights.retinaface_weights(network, weights_dir=weights_dir, allow_download=allow_download)
        # A broken file is the user's to fix, not a reason for `auto` to fall back to dlib silently:
        # these are plain Dp360Errors, not DetectorUnavailableError.
        advice = f"replace it with {path.name} from {weights.FACEXLIB_RELEASE_URL}, or use --detector dlib"
        state = load_tensors(path, advice)
        with _quiet_torchvision_warnings():
            model = RetinaFace(network_name=network, half=False, device=device)
        try:
            model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()}, strict=True)
        except Exception as error:  # noqa: BLE001 - not a dict, odd keys, wrong shapes: not RetinaFace weights
            # torch's strict-loading text lists the offending keys after its first line
            details = (
                " ".join(line.strip() for line in str(error).splitlines()[1:]) or f"{type(error).__name__}: {error}"
            )
            raise RetinaFaceWeightsError(
                f"'{path}' does not hold RetinaFace {network} weights ({one_line(details)}); {advice}."
            ) from None
        self.model = model.eval().to(device)

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        import torch

        def run(image: np.ndarray) -> list[FaceDetection]:
            with torch.no_grad():
                # facexlib expects BGR (it subtracts the BGR channel means).
                raw = self.model.detect_faces(np.ascontiguousarray(image[:, :, ::-1]), conf_threshold=self.confidence)
            raw = np.asarray(raw, dtype=np.float64).reshape(-1, 15)
            return [
                FaceDetection(box=row[:4].copy(), score=float(row[4]), landmarks5=_order_landmarks5(row[5:15]))
                for row in raw
            ]

        return _detect_downscaled(rgb, run)


class _quiet_torchvision_warnings:
    """facexlib builds its backbone with torchvision's deprecated `pretrained=False` argument."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)


def dlib_landmark_model_path() -> Path:
    """The 68-point model file shipped in `face-recognition-models` (found without importing the
    package, whose __init__ needs the removed `pkg_resources`)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailableError(
            "The offline face detector needs the 'face-recognition-models' package; run `pip install face-recognition-models`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise DetectorUnavailableError(
            f"dlib's landmark model is missing at {path}; reinstall 'face-recognition-models'."
        )
    return path


class DlibDetector:
    """dlib HOG detector + 68-point shape predictor (offline, model shipped in a package)."""

    name = "dlib"
    # dlib reports detections with score > 0; low scores are mostly false positives on clothing
    # and backgrounds, so keep only confident ones.
    min_score = 0.3

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise DetectorUnavailableError(
                "The offline face detector needs dlib; run `pip install dlib-bin`."
            ) from None
        self.note: str | None = None
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = _dlib_predictor()  # loaded once per process (about a second)

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        def run(image: np.ndarray) -> list[FaceDetection]:
            image = np.ascontiguousarray(image)
            # Upsample small images once so that faces of ~40 px are found.
            upsample = 1 if max(image.shape[:2]) < 800 else 0
            rectangles, scores, _ = self._detector.run(image, upsample, 0.0)
            detections = []
            for rectangle, score in zip(rectangles, scores):
                if score < self.min_score:
                    continue
                shape = self._predictor(image, rectangle)
                points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
                five = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
                box = np.array([rectangle.left(), rectangle.top(), rectangle.right(), rectangle.bottom()], dtype=float)
                detections.append(
                    FaceDetection(box=box, score=float(score), landmarks5=_order_landmarks5(five), landmarks68=points)
                )
            return detections

        return _detect_downscaled(rgb, run)


def make_detector(
    name: str = "auto", device: str = "cpu", weights_dir: Path | None = None, allow_download: bool = True
) -> FaceDetector:
    """Build a detector by name; `auto` prefers RetinaFace and falls back to dlib with a note.
    A run fetches the RetinaFace weights before its stages and builds detectors without downloads."""
    if name not in DETECTOR_NAMES:
        raise DetectorUnavailableError(f"Unknown face detector '{name}'; choose one of {', '.join(DETECTOR_NAMES)}.")
    if name == "dlib":
        return DlibDetector()
    if name == "retinaface":
        return RetinaFaceDetector(device=device, weights_dir=weights_dir, allow_download=allow_download)
    try:
        return RetinaFaceDetector(device=device, weights_dir=weights_dir, allow_download=allow_download)
    except DetectorUnavailableError as error:
        detector = DlibDetector()
        detector.note = f"using the offline dlib detector: {error}"
        return detector


# dlib's face box as its 68-point model was trained on it, in the FFHQ square of the same face
# seen as a 512 px image (measured on dlib's own detections: x 105-390, y 160-440).
_DLIB_BOX_IN_SQUARE = (121, 165, 391, 435)


@functools.lru_cache(maxsize=1)
def _dlib_predictor():
    import dlib

    return dlib.shape_predictor(str(dlib_landmark_model_path()))


def dlib_landmarks68(rgb: np.ndarray, landmarks5: np.ndarray) -> np.ndarray | None:
    """dlib's 68 landmarks of the face whose five landmarks are given (RetinaFace's): dlib's
    model runs on the face's upright FFHQ square, in the box dlib's detector would give there.
    None when dlib cannot run or its landmarks disagree with the five (mean distance over 10%
    of the square's half-side)."""
    import cv2

    from .align import ffhq_square, square_frame
    from .face_model import landmarks5_of_68

    try:
        import dlib

        predictor = _dlib_predictor()
    except (ImportError, DetectorUnavailableError, RuntimeError):
        return None
    square = ffhq_square(landmarks5)
    frame = square_frame(square, 512)
    upright = cv2.warpAffine(rgb, frame.matrix, (512, 512), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    shape = predictor(np.ascontiguousarray(upright), dlib.rectangle(*_DLIB_BOX_IN_SQUARE))
    points = frame.invert(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64))
    disagreement = np.linalg.norm(landmarks5_of_68(points) - np.asarray(landmarks5), axis=1).mean()
    if disagreement > 0.1 * np.linalg.norm(square[1]):
        return None
    return points
