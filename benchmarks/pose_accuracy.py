"""Head pose and crop centring on portraits of known pose, before and after the 68-landmark fit.

    python benchmarks/pose_accuracy.py [--subjects 12] [--yaw-step 10] [--pitch-step 10]
        [--before-rev REV] [--no-detector] [--json PATH]

Two sets of portraits of known pose, on a grid of camera yaw -60..60 and elevation -30..30
degrees (the camera looks at the head's centre with PanoHead's intrinsics):

- landmarks: 68 landmarks of `--subjects` random heads (the generic head with its width, height
  and depth scaled by N(1, 0.05), N(1, 0.05), N(1, 0.1) and 2 mm of noise per point), projected
  at each pose with 1.5 px of noise (eyes 80 px apart): the landmarks -> pose part alone;
- detector: the bundled portrait's face on the generic head (dp360.prepare.synthetic) rendered
  at each pose and run through dlib's detector and 68 landmarks: the whole path, where dlib
  finds the face.

"before" is the pose code of `--before-rev` (default: the commit before the 68-landmark fit;
PnP of five landmarks against a generic 5-point face, in the final crop), loaded from git in
this process; "after" is the working tree's (the generic head fitted to 68 landmarks in the FFHQ
square). Errors are estimated minus true, in degrees: mean absolute error (MAE) and bias (mean
signed error) of yaw and elevation. The crop columns give how far the crop's square centre is
from where the head's centre projects, in % of the crop's side (before: the FFHQ square; after:
the recentred square).

The truth's "level" and "head centre" are the generic head's own (the landmark model's frame;
its centre 85 mm behind the eyes), so "after" is measured in its own convention: the random heads
and the dlib landmarks show its errors on heads and landmarks that differ from the model, not
whether that convention is PanoHead's (3DDFA's) to the degree. The renders have no ears, hair or
neck: dlib misses most of them past 50 degrees of yaw or 20 of elevation and regresses the rest
towards a frontal layout (yaw is underestimated at 50-60 degrees).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = REPO / "assets" / "astronaut.png"
# The last commit whose prepare stage used the 5-point PnP (the "before" of issue 12).
BEFORE_REV = "6b40d8a"


def load_before(rev: str):
    """`dp360/prepare/pose.py` as it was at `rev`, imported as a module of this process."""
    source = subprocess.run(
        ["git", "show", f"{rev}:dp360/prepare/pose.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="pose-before-"))
    path = folder / "pose_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dp360.prepare._pose_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def estimate_before(before, landmarks5: np.ndarray):
    """The old prepare stage: the widened FFHQ crop, five landmarks PnP'd in it."""
    from dp360.prepare.align import CROP_SIZE, ffhq_square, panohead_crop_transform

    transform = panohead_crop_transform(landmarks5)
    pose = before.pose_from_landmarks(transform.apply(landmarks5), CROP_SIZE)
    centre = ffhq_square(landmarks5)[0]
    return pose.yaw, pose.elevation, centre, transform.side


def estimate_after(landmarks: np.ndarray):
    """The new prepare stage: the generic head fitted in the FFHQ square, the square recentred."""
    from dp360.prepare.align import CROP_SIZE, ffhq_square, recentre_square, square_frame, widened_crop_transform
    from dp360.prepare.face_model import landmarks5_of_68
    from dp360.prepare.pose import fit_head
    from dp360.prepare.stage import SQUARE_FOCAL_SCALE

    landmarks5 = landmarks5_of_68(landmarks) if len(landmarks) == 68 else landmarks
    square = ffhq_square(landmarks5)
    frame = square_frame(square, CROP_SIZE)
    fit = fit_head(frame.apply(landmarks), CROP_SIZE, SQUARE_FOCAL_SCALE)
    recentred = recentre_square(square, fit.offset, fit.scale)
    return fit.yaw, fit.elevation, recentred[0], widened_crop_transform(recentred).side


class Tally:
    def __init__(self):
        self.rows: list[tuple[float, float, float, float, float]] = []  # true yaw, pitch, dyaw, dpitch, centre%

    def add(self, yaw, pitch, estimate, truth_centre):
        est_yaw, est_pitch, centre, side = estimate
        offset = 100 * float(np.linalg.norm(np.asarray(centre) - truth_centre)) / side
        self.rows.append((yaw, pitch, est_yaw - yaw, est_pitch - pitch, offset))

    def summary(self, where=None) -> dict:
        rows = np.array([row for row in self.rows if where is None or where(row)])
        if not len(rows):
            return {"count": 0}
        return {
            "count": len(rows),
            "yaw_mae": float(np.abs(rows[:, 2]).mean()),
            "yaw_bias": float(rows[:, 2].mean()),
            "pitch_mae": float(np.abs(rows[:, 3]).mean()),
            "pitch_bias": float(rows[:, 3].mean()),
            "centre_off_pct": float(rows[:, 4].mean()),
        }


def table(title: str, tallies: dict[str, Tally], groups: list[tuple[str, object]]) -> list[str]:
    names = list(tallies)
    header = f"{title:<22}" + "".join(f" | {name + ': yaw MAE/bias, pitch MAE/bias, centre off':<48}" for name in names)
    lines = [header, "-" * len(header)]
    for label, where in groups:
        cells = []
        for name in names:
            s = tallies[name].summary(where)
            if not s["count"]:
                cells.append(f" | {'-':<48}")
                continue
            cells.append(
                f" | {s['yaw_mae']:5.1f} / {s['yaw_bias']:+5.1f}   {s['pitch_mae']:5.1f} / {s['pitch_bias']:+5.1f}"
                f"   {s['centre_off_pct']:5.1f} %  (n={s['count']})".ljust(49)
            )
        lines.append(f"{label:<22}" + "".join(cells))
    return lines


def groups_for(yaws, pitches) -> list[tuple[str, object]]:
    groups: list[tuple[str, object]] = [("all", None)]
    groups += [
        (f"|yaw| {low}-{high}", lambda r, lo=low, hi=high: lo <= abs(r[0]) <= hi)
        for low, high in ((0, 20), (30, 40), (50, 60))
    ]
    groups += [(f"elevation {p:+.0f}", lambda r, p=p: r[1] == p) for p in pitches]
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=12, help="random heads per pose in the landmark set")
    parser.add_argument("--yaw-step", type=float, default=10.0)
    parser.add_argument("--pitch-step", type=float, default=10.0)
    parser.add_argument("--before-rev", default=BEFORE_REV, help="git revision of the 'before' pose code")
    parser.add_argument("--no-detector", action="store_true", help="skip the rendered portraits (dlib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="accepted for run_all.py; everything runs on the CPU")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    from PIL import Image

    from dp360.prepare.face_model import FACE_MODEL_68, landmarks5_of_68
    from dp360.prepare.synthetic import project_landmarks, render_head, textured_head

    start = time.perf_counter()
    before = load_before(args.before_rev)
    yaws = np.arange(-60.0, 60.0 + 1e-9, args.yaw_step)
    pitches = np.arange(-30.0, 30.0 + 1e-9, args.pitch_step)
    size, eye_px = 512, 80.0
    truth_centre = np.array([size / 2, size / 2])
    print(
        f"grid: yaw {yaws[0]:+.0f}..{yaws[-1]:+.0f} step {args.yaw_step:g}, elevation {pitches[0]:+.0f}.."
        f"{pitches[-1]:+.0f} step {args.pitch_step:g} ({len(yaws) * len(pitches)} poses); before = {args.before_rev}"
    )

    # -- landmarks -> pose ------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    subjects = [
        FACE_MODEL_68 * rng.normal(1.0, [0.05, 0.05, 0.1]) + rng.normal(0.0, 2.0, FACE_MODEL_68.shape)
        for _ in range(args.subjects)
    ]
    landmark_tallies = {
        "before (5-point PnP)": Tally(),
        "after (68-point fit)": Tally(),
        "after, 5 points only": Tally(),
    }
    for yaw in yaws:
        for pitch in pitches:
            for shape in subjects:
                pixels = project_landmarks(shape, yaw, pitch, size, eye_px) + rng.normal(0.0, 1.5, (68, 2))
                five = landmarks5_of_68(pixels)
                landmark_tallies["before (5-point PnP)"].add(yaw, pitch, estimate_before(before, five), truth_centre)
                landmark_tallies["after (68-point fit)"].add(yaw, pitch, estimate_after(pixels), truth_centre)
                landmark_tallies["after, 5 points only"].add(yaw, pitch, estimate_after(five), truth_centre)
    print()
    print(f"landmarks -> pose: {args.subjects} random heads x {len(yaws) * len(pitches)} poses, 1.5 px landmark noise")
    print("\n".join(table("landmarks", landmark_tallies, groups_for(yaws, pitches))))
    results = {"landmarks": {name: tally.summary() for name, tally in landmark_tallies.items()}}

    # -- the whole path on rendered portraits -------------------------------------------------------
    if not args.no_detector:
        from dp360.prepare.detectors import DlibDetector

        detector = DlibDetector()
        photo = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
        face = detector.detect(photo)[0]
        head = textured_head(photo, face.landmarks68)
        detector_tallies = {"before (5-point PnP)": Tally(), "after (68-point fit)": Tally()}
        missed = []
        for yaw in yaws:
            for pitch in pitches:
                found = detector.detect(render_head(head, yaw, pitch, size, eye_px))
                if not found:
                    missed.append((float(yaw), float(pitch)))
                    continue
                detection = found[0]
                detector_tallies["before (5-point PnP)"].add(
                    yaw, pitch, estimate_before(before, detection.landmarks5), truth_centre
                )
                detector_tallies["after (68-point fit)"].add(
                    yaw, pitch, estimate_after(detection.landmarks68), truth_centre
                )
        seen = len(yaws) * len(pitches) - len(missed)
        print()
        print(
            f"detector path: the bundled portrait's face rendered at each pose, dlib found it in {seen} of "
            f"{len(yaws) * len(pitches)} (missed: {', '.join(f'{y:+.0f}/{p:+.0f}' for y, p in missed) or 'none'})"
        )
        print("\n".join(table("dlib on renders", detector_tallies, groups_for(yaws, pitches))))
        results["detector"] = {name: tally.summary() for name, tally in detector_tallies.items()}
        results["detector_missed"] = missed

        # The real photo itself (a frontal portrait, camera about level): no exact truth.
        five = face.landmarks5
        old_yaw, old_pitch, _, _ = estimate_before(before, five)
        new_yaw, new_pitch, _, _ = estimate_after(face.landmarks68)
        print()
        print(
            f"the bundled frontal photo (no exact truth): before yaw {old_yaw:+.1f} elevation {old_pitch:+.1f}, "
            f"after yaw {new_yaw:+.1f} elevation {new_pitch:+.1f}"
        )
        results["photo"] = {"before": [old_yaw, old_pitch], "after": [new_yaw, new_pitch]}

    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s")
    benchlib.write_json(
        args.json, {"benchmark": "pose_accuracy", "settings": vars(args), "results": results, "seconds": seconds}
    )


if __name__ == "__main__":
    main()
