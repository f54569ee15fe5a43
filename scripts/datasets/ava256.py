"""Ava-256 capture -> a dp360 capture (nerfstudio transforms.json layout) for `dp360 eval --truth`.

Data: Ava-256 (Meta Codec Avatars, "Codec Avatar Studio"), 256 subjects, each with a dome capture
of 80 released camera views. It comes from Meta's own release (https://github.com/facebookresearch/ava-256,
downloaded with its `download.py`) under the CC BY-NC 4.0 licence (non-commercial use, with
attribution); dp360 does not redistribute it, and this script downloads nothing.

It reads one capture's `decoder/` folder, as the dataset's datasheet describes it:
- `camera_calibration.json`: {"KRT": [{"cameraId": NAME, "K": 3x3 pixel intrinsics, "T": 4x4
  world-to-camera (OpenCV axes)}, ...]}; matrices stored transposed (column-major) are
  recognised by their last row and read the right way,
- `image/cam{NAME}.zip`: the frames of one camera, `{frame:06d}.avif`,
- `segmentation_parts/cam{NAME}.zip` (optional): `{frame:06d}.png` class maps; everything but the
  background (0) and the chair (3) is taken as the subject's mask.
The intrinsics are for the full-size images (4096 x 2668 px); released images of another size
(1024 x 667, 2048 x 1334) scale them.

    python scripts/datasets/ava256.py DECODER_DIR --frame 000123 [--cameras 400029,...] --out capture/
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from dp360.errors import Dp360Error
from dp360.eval.capture import check_new_folder, export_capture, scaled_intrinsics

FULL_WIDTH, FULL_HEIGHT = 2668, 4096  # the calibrated image size (portrait)
NOT_SUBJECT = (0, 3)  # background, chair


def _matrix(value, size: int) -> np.ndarray:
    """A size x size matrix, transposed back when it was stored column-major."""
    matrix = np.asarray(value, np.float64).reshape(size, size) if np.size(value) == size * size else None
    if matrix is None:
        raise ValueError(f"not a {size}x{size} matrix")
    last = np.eye(size)[-1]
    if not np.allclose(matrix[-1], last) and np.allclose(matrix[:, -1], last):
        matrix = matrix.T
    return matrix


def _read(zip_path: Path, member: str) -> Image.Image | None:
    if not zip_path.is_file():
        return None
    with zipfile.ZipFile(zip_path) as archive:
        if member not in archive.namelist():
            return None
        data = archive.read(member)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except OSError:
        raise Dp360Error(
            f"'{member}' in '{zip_path}' cannot be decoded; AVIF needs Pillow 11.2 or newer (pip install -U pillow)."
        ) from None
    return image


def convert(decoder: Path, frame: str, out: Path, cameras: list[str] | None = None) -> Path:
    check_new_folder(out)
    if not str(frame).isdigit():
        raise Dp360Error(f"--frame must be a frame number from frame_list.csv, not {frame!r}.")
    decoder = Path(decoder)
    try:
        calibration = json.loads((decoder / "camera_calibration.json").read_text())["KRT"]
        entries = [(str(item["cameraId"]), _matrix(item["K"], 3), _matrix(item["T"], 4)) for item in calibration]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Dp360Error(
            f"'{decoder / 'camera_calibration.json'}' is not Ava-256's camera calibration ({type(error).__name__}); "
            "pass the capture's decoder/ folder."
        ) from None
    frame = f"{int(frame):06d}"
    frames = []
    for name, intrinsics, world_to_cam in entries:
        if cameras and name not in cameras:
            continue
        image = _read(decoder / "image" / f"cam{name}.zip", f"{frame}.avif")
        if image is None:
            continue  # a dropped frame
        rgb = np.asarray(image.convert("RGB"))
        parts = _read(decoder / "segmentation_parts" / f"cam{name}.zip", f"{frame}.png")
        mask = None
        if parts is not None:
            classes = np.asarray(parts.resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))
            mask = np.where(np.isin(classes, NOT_SUBJECT), 0, 255).astype(np.uint8)
        frames.append(
            {
                "name": f"cam{name}",
                "image": rgb,
                "mask": mask,
                "cam2world": np.linalg.inv(world_to_cam),
                "intrinsics": scaled_intrinsics(intrinsics, rgb.shape[1] / FULL_WIDTH, rgb.shape[0] / FULL_HEIGHT),
            }
        )
    return export_capture(out, frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder", type=Path, help="one capture's decoder/ folder")
    parser.add_argument("--frame", required=True, help="frame id (as in frame_list.csv)")
    parser.add_argument("--cameras", help="comma-separated camera names to keep (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the capture")
    args = parser.parse_args(argv)
    try:
        path = convert(args.decoder, args.frame, args.out, args.cameras.split(",") if args.cameras else None)
    except Dp360Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
