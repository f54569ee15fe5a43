"""A run (or another method's views, given as a capture) against a ground-truth capture: the
protocol of the paper's Table 1.

1. The truth cameras are aligned to dp360's orbit (`cameras.orbit_alignment`): the point their
   optical axes meet at goes to the head's centre, their mean up to +y, and the reference frame
   (the input's view; `--reference`) to yaw 0, the front.
2. Every truth frame is compared in a dp360 camera (the views' focal length, `size` px): the
   run's nearest view when it lies within `tolerance` degrees of the truth camera (seen from the
   head's centre); otherwise, when a field was fitted, the field rendered at the truth camera's
   direction; otherwise still the nearest view, with its gap recorded. `source` says which.
3. The truth image is resampled into that camera through the plane at the head's centre
   (`capture.resample`: exact where both cameras share a centre, matched at the head otherwise). Framing `crop` zooms it as the prepare stage zoomed the reference image
   (the crop's side in the reference image's pixels), so the head has the size of the run's
   crop; framing `camera` keeps the truth cameras' own angles (a capture in dp360's own framing,
   such as the synthetic head or another method rendered at dp360's cameras).
4. Both images are masked by the truth mask (mask_path or alpha; else the part the truth image
   covers), the rest set to white, and compared: PSNR, SSIM, LPIPS on every frame, CSIM on front
   frames (|yaw| <= 90 degrees), FID per side when the Inception weights are there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import cameras, layout
from ..errors import Dp360Error
from . import metrics
from .capture import Capture, CaptureFrame, load_image, load_mask, read_capture, resample

FRAMINGS = ("auto", "crop", "camera")
FRONT_LIMIT_DEG = 90.0  # |yaw| <= 90: front, as in the paper
_ROUNDING_DEG = 1e-6  # views at exactly +-90 degrees count as front whatever the rounding
BACKGROUND = 1.0  # white outside the mask, in both images
METRICS_FORMAT = 1


@dataclass
class EvalSettings:
    size: int = 512  # px of the compared crops (the views' size)
    tolerance: float = 2.0  # degrees between a truth camera and a view before the field is rendered instead
    reference: str | int | None = None  # the truth frame that is the input's view (default: the first)
    framing: str = "auto"  # auto: crop when the run has its prepare crop, else camera
    device: str = "cpu"
    lpips_backbone: str | Path | None = None  # default: the dp360 cache's VGG16
    inception: str | Path | None = None  # default: the dp360 cache's Inception weights
    identity: bool = True  # CSIM: dlib's face ResNet, or ArcFace when `arcface` names its weights
    arcface: str | Path | None = None

    def check(self) -> None:
        from ..checks import check_float, check_int

        check_int("--size", self.size, 32, 2048)
        check_float("--tolerance", self.tolerance, 0.0, 180.0)
        if self.framing not in FRAMINGS:
            raise Dp360Error(f"--framing must be one of {', '.join(FRAMINGS)}, not {self.framing!r}.")
        given = (
            ("--lpips-backbone", self.lpips_backbone),
            ("--inception", self.inception),
            ("--arcface", self.arcface),
        )
        for option, value in given:
            if value is not None and not Path(value).is_file():
                raise Dp360Error(f"{option} '{value}' is not a file; give the weight file's path.")


@dataclass
class Candidate:
    """What is evaluated: a run folder (its views, maybe a field) or another method's views as a
    capture whose cameras are in dp360's orbit frame."""

    label: str
    views: Capture
    run_dir: Path | None = None
    has_field: bool = False

    @classmethod
    def open(cls, path: str | Path, label: str | None = None) -> Candidate:
        path = Path(path)
        if os.path.lexists(path / "run.json"):
            from ..errors import RunDirectoryError
            from ..manifest import read_manifest
            from ..nerf.common import FIT_FILE

            try:  # eval writes into a run (RUN/eval/): only into one dp360 can show it made
                read_manifest(path / "run.json")
            except RunDirectoryError:
                raise Dp360Error(
                    f"'{path}' is not a dp360 run: its run.json was not written by dp360 (it lacks dp360's run id) "
                    "or is damaged, so dp360 eval writes nothing into it; pass a folder made by `dp360 reconstruct`, "
                    "or a capture folder with a transforms.json (such as a run's views/ folder)."
                ) from None
            if not (path / layout.TRANSFORMS).is_file():
                raise Dp360Error(f"Run '{path}' has no views yet; run `dp360 views` or `dp360 reconstruct` first.")
            return cls(
                label or path.name, read_capture(path / layout.VIEWS), path, (path / layout.NERF / FIT_FILE).is_file()
            )
        if (path / "transforms.json").is_file() or path.name == "transforms.json":
            capture = read_capture(path)
            return cls(label or capture.folder.name, capture)
        raise Dp360Error(
            f"'{path}' is neither a dp360 run (no run.json) nor a capture (no transforms.json); "
            "pass a folder written by `dp360 reconstruct` or one in nerfstudio's layout."
        )


@dataclass
class Models:
    """The metric networks, loaded once for several candidates; each None with a reason when absent."""

    lpips: metrics.Lpips
    identity: metrics.IdentityModel | None  # or an ArcFaceModel (the same interface)
    identity_reason: str | None
    inception: metrics.InceptionFeatures

    @classmethod
    def load(cls, settings: EvalSettings) -> Models:
        identity, reason = None, "turned off"
        if settings.identity and settings.arcface is not None:
            from .arcface import ArcFaceModel

            identity, reason = ArcFaceModel(settings.arcface, settings.device), None  # given: its errors stop
        elif settings.identity:
            try:
                identity, reason = metrics.IdentityModel(), None
            except (Dp360Error, ImportError, RuntimeError) as error:
                reason = str(error)
        return cls(
            metrics.Lpips(settings.device, settings.lpips_backbone, required=settings.lpips_backbone is not None),
            identity,
            reason,
            metrics.InceptionFeatures(settings.device, settings.inception, required=settings.inception is not None),
        )

    def unavailable(self) -> dict[str, str]:
        found = {"lpips": self.lpips.reason, "csim": self.identity_reason, "fid": self.inception.reason}
        return {name: reason for name, reason in found.items() if reason}


# -- alignment and framing ----------------------------------------------------------------------


def side_of(yaw: float) -> str:
    return "front" if abs(yaw) <= FRONT_LIMIT_DEG + _ROUNDING_DEG else "back"


def crop_zoom(run_dir: Path, reference: CaptureFrame) -> tuple[float | None, bool]:
    """(zoom, same size) of framing `crop`: how much larger the truth cameras' focal length must be
    taken for the reference image to show the head at the size of the run's crop, and whether
    the reference image has the size of the run's input (as it has when it was the input). Zoom
    None when the run has no prepare crop to take it from."""
    try:
        face = json.loads((run_dir / layout.FACE).read_text())
        side = float(face["crop_side_in_input_px"])
        from PIL import Image

        with Image.open(run_dir / "input.png") as image:
            input_size = image.size
    except (OSError, ValueError, KeyError, TypeError):
        return None, False
    if not (math.isfinite(side) and side > 0):
        return None, False
    side_in_reference = side * reference.width / input_size[0]  # the run's input is the reference image
    zoom = cameras.FOCAL_NORMALIZED * side_in_reference / float(reference.intrinsics[0, 0])
    return zoom, input_size == (reference.width, reference.height)


def _view_direction(cam2world: np.ndarray) -> np.ndarray:
    position = np.asarray(cam2world)[:3, 3]
    return position / max(np.linalg.norm(position), 1e-12)


def _look_at_or_pose(position: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """An upright camera at `position` looking at the head's centre; the pose itself when it
    looks straight down or up (no upright orientation)."""
    try:
        return cameras.look_at_cam2world(position)
    except ValueError:
        aligned = np.asarray(pose, dtype=np.float64).copy()
        aligned[:3, 3] = position
        return aligned


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


# -- the comparison -----------------------------------------------------------------------------


@dataclass
class FrameResult:
    name: str
    yaw: float
    elevation: float
    side: str
    source: str  # "view NAME", "field" or "view NAME (no field)"
    gap_deg: float  # between the truth camera and the nearest view
    psnr: float
    ssim: float
    lpips: float | None
    csim: float | None = None
    csim_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("yaw", "elevation", "gap_deg", "psnr", "ssim", "lpips", "csim"):
            if isinstance(record[key], float):
                record[key] = round(record[key], 5)
        return record


@dataclass
class Comparison:
    """The pair of images one truth frame is compared as, and where the prediction came from."""

    truth: np.ndarray
    prediction: np.ndarray
    source: str
    gap: float


def evaluate(
    candidate: Candidate,
    truth: Capture,
    settings: EvalSettings,
    models: Models | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The metrics of `candidate` against `truth` (the dict written as eval/metrics.json)."""
    from tqdm.auto import tqdm

    settings.check()
    models = models or Models.load(settings)
    notes = list(truth.notes)
    reference = truth.index_of(settings.reference)
    poses = [frame.cam2world for frame in truth.frames]
    try:
        transform, scale = cameras.orbit_alignment(poses, reference)
        centre = cameras.axes_meeting_point(poses)
    except ValueError as error:
        raise Dp360Error(f"The truth cameras of '{truth.folder}' cannot be aligned to the orbit: {error}.") from None
    framing = settings.framing
    zoom = None
    if framing in ("auto", "crop"):
        zoom, same_size = crop_zoom(candidate.run_dir, truth.frames[reference]) if candidate.run_dir else (None, False)
        if zoom is None and framing == "crop":
            raise Dp360Error(
                f"--framing crop needs the run's prepare crop (prepared/face.json), which '{candidate.label}' lacks; "
                "use --framing camera."
            )
        if framing == "auto" and zoom is not None and not same_size:
            # a reference image of another size than the run's input was not its input (the run's
            # own views, say): zooming it like the input's crop would be wrong
            notes.append(
                f"framing camera: the reference frame {truth.frames[reference].name} is not the size of the run's "
                "input image, so it was not the input; pass --framing crop to zoom it like the input's crop anyway"
            )
            zoom = None
        framing = "crop" if zoom is not None else "camera"
    reference_distance = float(np.linalg.norm(poses[reference][:3, 3] - centre))
    field_model = None  # loaded when a truth camera first needs it
    view_poses = [frame.cam2world for frame in candidate.views.frames]
    view_directions = np.stack([_view_direction(pose) for pose in view_poses])
    # render_pose's camera: dp360's focal length, centred
    field_intrinsics = cameras.pixel_intrinsics(cameras.normalized_intrinsics(), settings.size, settings.size)

    results: list[FrameResult] = []
    features: dict[str, dict[str, list[np.ndarray]]] = {
        side: {"truth": [], "prediction": []} for side in ("front", "back")
    }
    for frame in tqdm(truth.frames, desc="eval", disable=not progress, leave=False):
        aligned = cameras.align_cam2world(frame.cam2world, transform, scale)
        yaw, elevation = cameras.yaw_elevation_of(aligned)
        side = side_of(yaw)
        direction = _view_direction(aligned)
        gaps = np.degrees(np.arccos(np.clip(view_directions @ direction, -1.0, 1.0)))
        nearest = int(np.argmin(gaps))
        gap = float(gaps[nearest])
        source_intrinsics, source_pose = frame.intrinsics.copy(), aligned
        if framing == "crop":
            # the zoom that gives the reference the crop's head size, corrected for this camera's
            # distance; so zoomed, the camera stands in for one on the orbit's radius
            distance = float(np.linalg.norm(frame.cam2world[:3, 3] - centre))
            source_intrinsics[:2, :2] *= zoom * reference_distance / max(distance, 1e-12)
            source_pose = aligned.copy()
            source_pose[:3, 3] = direction * cameras.CAMERA_RADIUS
        view = candidate.views.frames[nearest]
        has_field = candidate.has_field and candidate.run_dir is not None
        if gap <= settings.tolerance or not has_field:
            target_pose = view.cam2world
            # the view's own focal length, at the compared size
            normalized = cameras.normalize_intrinsics(view.intrinsics, view.width, view.height)
            target_intrinsics = cameras.pixel_intrinsics(normalized, settings.size, settings.size)
            prediction = _resize(load_image(view.image_path)[0], settings.size)
            source = f"view {view.name}" if gap <= settings.tolerance else f"view {view.name} (no field)"
        else:
            from ..nerf.fit import load_field
            from ..nerf.render import render_pose

            if field_model is None:
                field_model = load_field(
                    candidate.run_dir / layout.NERF, settings.device, candidate.run_dir / layout.VIEWS
                )
            target_intrinsics = field_intrinsics
            radius = cameras.CAMERA_RADIUS if framing == "crop" else float(np.linalg.norm(aligned[:3, 3]))
            target_pose = _look_at_or_pose(direction * radius, aligned)
            prediction = render_pose(field_model, target_pose, settings.size)
            source = "field"
        image, alpha = load_image(frame.image_path)
        warped, covered = resample(image, source_pose, source_intrinsics, target_pose, target_intrinsics, settings.size)
        mask = load_mask(frame, alpha)
        if mask is not None:
            mask = resample(mask, source_pose, source_intrinsics, target_pose, target_intrinsics, settings.size)[0]
            covered = covered * mask
        weight = np.clip(covered, 0.0, 1.0)[..., None]
        truth_image = warped * weight + BACKGROUND * (1 - weight)
        predicted = np.asarray(prediction, np.float32) * weight + BACKGROUND * (1 - weight)
        result = FrameResult(
            frame.name,
            yaw,
            elevation,
            side,
            source,
            gap,
            metrics.psnr(truth_image, predicted),
            metrics.ssim(truth_image, predicted),
            models.lpips(truth_image, predicted),
        )
        if side == "front":
            if models.identity is None:
                result.csim_note = models.identity_reason
            else:
                result.csim, result.csim_note = metrics.identity_similarity(models.identity, truth_image, predicted)
        if models.inception.model is not None:
            features[side]["truth"].append(models.inception([truth_image])[0])
            features[side]["prediction"].append(models.inception([predicted])[0])
        results.append(result)

    summary = {side: summarize([r for r in results if r.side == side], features[side], models) for side in features}
    far = [r for r in results if r.source.endswith("(no field)")]
    if far:
        notes.append(
            f"{len(far)} truth frame(s) lie more than {settings.tolerance:g} degrees from every view and no field "
            "was fitted: they are compared with the nearest view"
        )
    return {
        "format": METRICS_FORMAT,
        "kind": "truth",
        "candidate": candidate.label,
        "candidate_path": str(candidate.run_dir or candidate.views.folder),
        "truth": str(truth.folder),
        "reference": truth.frames[reference].name,
        "framing": framing,
        "zoom": None if zoom is None else round(zoom, 5),
        "size": settings.size,
        "tolerance_deg": settings.tolerance,
        "front_limit_deg": FRONT_LIMIT_DEG,
        "psnr_cap_db": metrics.PSNR_CAP,
        "identity_model": models.identity.name if models.identity else None,
        "summary": summary,
        "unavailable": models.unavailable(),
        "notes": notes,
        "frames": [result.as_dict() for result in results],
    }


def summarize(results: list[FrameResult], features: dict[str, list[np.ndarray]], models: Models) -> dict[str, Any]:
    """Means over one side's frames; CSIM over the frames where both faces were found; FID with
    its sample count (None with a reason when it cannot be computed)."""

    def mean(key: str) -> float | None:
        value = metrics.finite_mean(getattr(result, key) for result in results)
        return None if value is None else round(value, 5)

    summary: dict[str, Any] = {
        "frames": len(results),
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "lpips": mean("lpips"),
        "from_field": sum(result.source == "field" for result in results),
    }
    faces = [result.csim for result in results if result.csim is not None]
    summary["csim"] = round(float(np.mean(faces)), 5) if faces else None
    summary["csim_frames"] = len(faces)
    reasons = [result.csim_note for result in results if result.csim is None and result.csim_note]
    if reasons and not faces:  # the commonest reason, for the console
        summary["csim_note"] = max(set(reasons), key=reasons.count)
    count = len(features["truth"])
    summary["fid_samples"] = count
    if models.inception.model is None:
        summary["fid"], summary["fid_note"] = None, models.inception.reason
    elif count < 2:
        summary["fid"], summary["fid_note"] = None, f"FID needs at least 2 frames on a side, this side has {count}"
    else:
        fid = metrics.frechet_distance(np.stack(features["truth"]), np.stack(features["prediction"]))
        summary["fid"], summary["fid_note"] = round(fid, 4), None
    return summary
