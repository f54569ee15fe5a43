"""NeRSemble subject -> a dp360 capture (nerfstudio transforms.json layout) for `dp360 eval --truth`.

Data: NeRSemble (Kirschstein et al., "NeRSemble: Multi-view Radiance Field Reconstruction of
Human Heads", SIGGRAPH 2023), 16 synchronized cameras around the head. It is released by the
Technical University of Munich under its terms of use, the licence you agree to when you request
access on the project's page (https://tobias-kirschstein.github.io/nersemble/; research use, no
redistribution), and this script downloads nothing: point it at what you downloaded.

It reads, from the downloaded release:
- the calibration `camera_params.json`: {"world_2_cam": {SERIAL: 4x4 world-to-camera, OpenCV
  axes}, "intrinsics": 3x3 pixel intrinsics of the full-resolution images (3208 x 2200 px, portrait)},
- one timestep's images, a folder with `cam_SERIAL.jpg|png` (e.g. `.../timesteps/frame_00000/images-2x/`;
  downscaled images are fine: the intrinsics are scaled by the image's size against
  --full-width x --full-height),
- optionally that timestep's alpha maps, a folder with `cam_SERIAL.png` (`--alpha`).

    python scripts/datasets/nersemble.py --calibration CAMERA_PARAMS.json --images IMAGES_DIR \\
        [--alpha ALPHA_DIR] [--cameras SERIAL,...] --out capture/

Then `dp360 reconstruct` the frontal camera's image and `dp360 eval RUN --truth capture/
--reference cam_SERIAL` (that camera's frame is the input's view).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dp360.errors import Dp360Error
from dp360.eval.capture import check_new_folder, export_capture, scaled_intrinsics

FULL_WIDTH, FULL_HEIGHT = 2200, 3208  # the calibrated image size (portrait)


def convert(
    calibration: Path,
    images: Path,
    out: Path,
    alpha: Path | None = None,
    cameras: list[str] | None = None,
    full_size: tuple[int, int] = (FULL_WIDTH, FULL_HEIGHT),
) -> Path:
    check_new_folder(out)
    try:
        params = json.loads(Path(calibration).read_text())
        world_to_cam = {str(serial): np.asarray(pose, np.float64) for serial, pose in params["world_2_cam"].items()}
        intrinsics = np.asarray(params["intrinsics"], np.float64)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise Dp360Error(f"'{calibration}' is not NeRSemble's camera_params.json ({type(error).__name__}).") from None
    frames = []
    for serial in sorted(world_to_cam):
        if cameras and serial not in cameras:
            continue
        found = [
            path for path in sorted(Path(images).glob(f"cam_{serial}.*")) if path.suffix.lower() in (".jpg", ".png")
        ]
        if not found:
            continue  # a camera without an image at this timestep
        with Image.open(found[0]) as image:
            rgb = np.asarray(image.convert("RGB"))
        mask = None
        if alpha is not None and (Path(alpha) / f"cam_{serial}.png").is_file():
            with Image.open(Path(alpha) / f"cam_{serial}.png") as image:
                mask = np.asarray(image.convert("L").resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
        scale_x, scale_y = rgb.shape[1] / full_size[0], rgb.shape[0] / full_size[1]
        frames.append(
            {
                "name": f"cam_{serial}",
                "image": rgb,
                "mask": mask,
                "cam2world": np.linalg.inv(world_to_cam[serial]),
                "intrinsics": scaled_intrinsics(intrinsics, scale_x, scale_y),
            }
        )
    return export_capture(out, frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, required=True, help="NeRSemble's camera_params.json")
    parser.add_argument("--images", type=Path, required=True, help="one timestep's folder of cam_SERIAL images")
    parser.add_argument("--alpha", type=Path, help="that timestep's folder of cam_SERIAL.png alpha maps")
    parser.add_argument("--cameras", help="comma-separated serials to keep (default: all)")
    parser.add_argument("--full-width", type=int, default=FULL_WIDTH, help="width the intrinsics are calibrated at")
    parser.add_argument("--full-height", type=int, default=FULL_HEIGHT, help="height the intrinsics are calibrated at")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the capture")
    args = parser.parse_args(argv)
    try:
        cameras = args.cameras.split(",") if args.cameras else None
        path = convert(
            args.calibration, args.images, args.out, args.alpha, cameras, (args.full_width, args.full_height)
        )
    except Dp360Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
