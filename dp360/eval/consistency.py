"""The view-consistency score: needs no ground truth, so it works for any run and any input,
stylized ones included.

The fitted field is rendered at every view's camera (at a small size, `score_resolution`) and
compared with the generated view shrunk to that size: PSNR and LPIPS. A field fitted to views
that agree in 3D reproduces them; views that disagree are averaged away, so low PSNR and high
LPIPS mean inconsistent views. Identity similarity (CSIM) of every view against the input's front
view (the prepare crop) follows the identity around the orbit; views without a visible face
(the back) have none.

`CONSISTENCY_STAGE` runs it after the export stage and writes `eval/consistency.json`; its summary
enters run.json and the run report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import cameras, layout
from ..atomic import file_sha256
from ..errors import Dp360Error
from ..pipeline.stage import Stage, StageContext, Unavailable
from . import metrics
from .capture import load_image, read_capture

# The renders' size: an eighth of the views' (64 px for 512 px views), at least 8 px. Views
# that disagree in 3D already disagree at that size, and 32 renders of 64 px cost little next to
# the turntable (120 of 512 px). LPIPS needs LPIPS_MIN px (VGG16 halves the image four times
# before its last layer), so tiny runs (64 px views, 8 px renders) get PSNR only, in half a second.
RESOLUTION_DIVISOR, MIN_RESOLUTION, MAX_RESOLUTION = 8, 8, 64
LPIPS_MIN = 16
CONSISTENCY_FILE = layout.name_of(layout.CONSISTENCY)
FOLDER = layout.EVAL
REFERENCE_FILES = (layout.CROP, f"{layout.VIEWS}/000.png")  # the input's front view, in this order
# Below this view size the face in a PanoHead-framed view (about 40% of its width) is smaller than
# dlib's detector finds even upsampled: CSIM is skipped without loading the face models.
FACE_VIEW_MIN = 128


def score_resolution(view_size: int) -> int:
    return int(min(MAX_RESOLUTION, max(MIN_RESOLUTION, view_size // RESOLUTION_DIVISOR)))


def reference_image(run_dir: Path) -> tuple[str, np.ndarray] | None:
    for rel in REFERENCE_FILES:
        if (Path(run_dir) / rel).is_file():
            return rel, load_image(Path(run_dir) / rel)[0]
    return None


def consistency(
    run_dir: str | Path,
    device: str = "cpu",
    resolution: int | None = None,
    lpips: metrics.Lpips | None = None,
    identity: metrics.IdentityModel | None = None,
    identity_reason: str | None = None,
) -> dict[str, Any]:
    """The score of a run with a fitted field: per view (yaw, PSNR, LPIPS, CSIM) and means."""
    import cv2

    from ..nerf.fit import load_field
    from ..nerf.render import render_pose

    run_dir = Path(run_dir)
    views = read_capture(run_dir / layout.VIEWS)
    view_size = min(views.frames[0].width, views.frames[0].height)
    resolution = resolution or score_resolution(view_size)
    field = load_field(run_dir / layout.NERF, device, run_dir / layout.VIEWS)
    lpips = lpips if lpips is not None else metrics.Lpips(device)
    if view_size < FACE_VIEW_MIN:
        identity = None
        identity_reason = f"views of {view_size} px are too small to find faces in ({FACE_VIEW_MIN} px at least)"
    elif identity is None and identity_reason is None:
        try:
            identity = metrics.IdentityModel()
        except (ImportError, RuntimeError, Dp360Error) as error:
            identity_reason = str(error)
    reference = reference_image(run_dir)
    reference_embedding = None
    if identity is not None and reference is not None:
        reference_embedding = identity.embed(reference[1])
        if reference_embedding.vector is None:
            identity_reason = f"no identity: {reference[0]}: {reference_embedding.reason}"
            reference_embedding = None
    elif reference is None:
        identity_reason = identity_reason or "no reference image (prepared/crop.png or views/000.png)"

    rows, pairs = [], []
    for frame in views.frames:
        image = load_image(frame.image_path)[0]
        small = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_AREA)
        focal = float(frame.intrinsics[0, 0]) / frame.width  # normalised, as the views' cameras
        rendered = render_pose(field, frame.cam2world, resolution, focal=focal)
        yaw, elevation = cameras.yaw_elevation_of(frame.cam2world)
        row: dict[str, Any] = {
            "view": frame.name,
            "yaw": round(yaw, 3),
            "elevation": round(elevation, 3),
            "psnr": round(metrics.psnr(small, rendered), 4),
            "lpips": None,
            "csim": None,
        }
        pairs.append((small, rendered))
        if reference_embedding is not None:
            similarity, why = metrics.identity_similarity(identity, reference_embedding, image)
            row["csim"] = None if similarity is None else round(similarity, 5)
            if why:
                row["csim_note"] = why.removeprefix("compared image: ")
        rows.append(row)
    lpips_reason = lpips.reason
    if resolution < LPIPS_MIN:
        lpips_reason, distances = f"renders of {resolution} px are too small for LPIPS ({LPIPS_MIN} px at least)", None
    else:
        distances = lpips.many([pair[0] for pair in pairs], [np.asarray(pair[1], np.float32) for pair in pairs])
    for row, distance in zip(rows, distances or ()):
        row["lpips"] = round(distance, 5)
    faces = [row["csim"] for row in rows if row["csim"] is not None]
    summary = {
        "views": len(rows),
        "resolution": resolution,
        "psnr": _mean(row["psnr"] for row in rows),
        "lpips": _mean(row["lpips"] for row in rows),
        "csim": round(float(np.mean(faces)), 5) if faces else None,
        "csim_views": len(faces),
        "csim_reference": reference[0] if reference else None,
        "identity_model": identity.name if identity is not None else None,
    }
    if not faces and reference_embedding is not None:
        identity_reason = "no view shows a face the identity model finds"
    unavailable = {"lpips": lpips_reason, "csim": None if faces else identity_reason}
    return {
        "kind": "consistency",
        "summary": summary,
        "unavailable": {key: value for key, value in unavailable.items() if value},
        "views": rows,
    }


def _mean(values) -> float | None:
    value = metrics.finite_mean(values)
    return None if value is None else round(value, 5)


# -- the stage ------------------------------------------------------------------------------------


def _check(context: StageContext) -> Unavailable | None:
    from ..nerf.common import FIT_FILE

    if not (context.run_dir / layout.NERF / FIT_FILE).is_file():
        return Unavailable("not_available", "the consistency score needs a fitted field; run the fit stage first")
    return None


def input_hashes(run_dir: Path) -> dict[str, str]:
    """What the score reads: the views, the field and the input's crop."""
    from ..nerf.stage import field_hashes, view_hashes

    hashes = {**view_hashes(run_dir), **field_hashes(run_dir)}
    crop = run_dir / REFERENCE_FILES[0]
    hashes[REFERENCE_FILES[0]] = file_sha256(crop) if crop.is_file() else "missing"
    return hashes


def recorded(run_dir: Path) -> dict[str, Any] | None:
    """The run's own score (eval/consistency.json of its consistency stage) when it is still
    that of its present views and field; None otherwise."""
    import json

    try:
        manifest = json.loads((run_dir / "run.json").read_text())
        record = manifest["stages"]["consistency"]
        if record.get("status") != "done" or record.get("inputs") != input_hashes(run_dir):
            return None
        result = json.loads((run_dir / FOLDER / CONSISTENCY_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return result if isinstance(result, dict) and result.get("kind") == "consistency" else None


def _settings(context: StageContext) -> dict[str, Any]:
    from ..panohead.perceptual import backbone_path

    # the backbone's presence is a setting: fetching it later turns LPIPS on when the run is redone
    return {
        "resolution": [RESOLUTION_DIVISOR, MIN_RESOLUTION, MAX_RESOLUTION, LPIPS_MIN],
        "lpips": backbone_path().is_file(),
        "identity": metrics.IdentityModel.name,
    }


def _build(context: StageContext, folder: Path) -> dict[str, Any]:
    from ..atomic import write_json_atomic

    result = consistency(context.run_dir, context.device)
    write_json_atomic(folder / CONSISTENCY_FILE, result)
    # what could not be measured is in the summary, which the report shows (no run note each time)
    return {**result["summary"], "unavailable": result["unavailable"]}


CONSISTENCY_STAGE = Stage(
    name="consistency",
    folder=FOLDER,
    description="view-consistency score (field re-rendered at the views)",
    settings=_settings,
    inputs=lambda context: input_hashes(context.run_dir),
    build=_build,
    check=_check,
    needs=("fit",),
    shared_folder=True,  # eval/ also holds what `dp360 eval` writes
)
