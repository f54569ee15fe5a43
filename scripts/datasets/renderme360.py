"""RenderMe360 subject -> a dp360 capture (nerfstudio transforms.json layout) for `dp360 eval --truth`.

Data: RenderMe360 (Pan et al., "RenderMe-360: A Large Digital Asset Library and Benchmarks Towards
High-fidelity Head Avatars", NeurIPS 2023 Datasets and Benchmarks), 60 cameras around the head;
the benchmark of the DiffPortrait360 paper's Table 1. It is released by its authors (OpenXDLab,
https://renderme-360.github.io/) after you sign their data licence agreement (non-commercial
research only, no redistribution); this script downloads nothing: point it at what you downloaded.

It reads one performance's SMC files (HDF5 containers; needs h5py, installed with dp360):
- the annotation file (`{actor}_{performance}_anno.smc`): `Camera_Parameter/{camera}/K` (3x3 pixel
  intrinsics), `.../RT` (4x4 pose, OpenCV axes; camera-to-world in the releases we know of: the
  script checks that the cameras look inwards and reads it the other way round if not), and
  optionally `Mask/{camera}/mask/{frame}` (encoded images, white = subject),
- the raw file (`{actor}_{performance}_raw.smc`): `Camera_5mp/{camera}/color/{frame}` (encoded
  images; `--group Camera_12mp` for the other camera set), with K for that image size.
Camera and frame keys are matched by number, so `5`, `05` and `000005` all name camera 5.

    python scripts/datasets/renderme360.py --anno ANNO.smc --raw RAW.smc --frame 0 [--cameras 0,5,...] --out capture/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dp360.errors import Dp360Error
from dp360.eval.capture import check_new_folder, export_capture, looks_inward


def _by_number(group, number: int):
    """The member of an HDF5 group whose key is `number`, however it is zero-padded."""
    for key in group.keys():
        if key.isdigit() and int(key) == number:
            return group[key]
    return None


def _decode(data, flags) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(bytes(np.asarray(data).tobytes()), np.uint8), flags)
    if image is None:
        raise Dp360Error("an image in the SMC file cannot be decoded; check that the file is complete.")
    return image


def convert(
    anno: Path, raw: Path, frame: int, out: Path, cameras: list[int] | None = None, group: str = "Camera_5mp"
) -> Path:
    import cv2
    import h5py

    check_new_folder(out)
    try:
        anno_file, raw_file = h5py.File(anno, "r"), h5py.File(raw, "r")
    except OSError as error:
        raise Dp360Error(
            f"Cannot open the SMC files as HDF5 ({error}); pass RenderMe360's _anno.smc and _raw.smc."
        ) from None
    with anno_file, raw_file:
        if "Camera_Parameter" not in anno_file or group not in raw_file:
            raise Dp360Error(
                f"'{anno}' has no Camera_Parameter or '{raw}' no {group}; pass RenderMe360's _anno.smc and _raw.smc."
            )
        poses, frames = [], []
        for key in sorted(anno_file["Camera_Parameter"].keys(), key=lambda k: int(k) if k.isdigit() else -1):
            if not key.isdigit() or (cameras and int(key) not in cameras):
                continue
            number = int(key)
            camera = _by_number(raw_file[group], number)
            colours = camera.get("color") if camera is not None else None
            data = _by_number(colours, frame) if colours is not None else None
            if data is None:
                continue
            rgb = cv2.cvtColor(_decode(data[()], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            mask = None
            masks = _by_number(anno_file["Mask"], number) if "Mask" in anno_file else None
            if masks is not None and "mask" in masks and _by_number(masks["mask"], frame) is not None:
                mask = _decode(_by_number(masks["mask"], frame)[()], cv2.IMREAD_GRAYSCALE)
                if mask.shape != rgb.shape[:2]:
                    mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
            parameters = anno_file["Camera_Parameter"][key]
            poses.append(np.asarray(parameters["RT"], np.float64).reshape(4, 4))
            frames.append(
                {
                    "name": f"cam{number:02d}",
                    "image": rgb,
                    "mask": mask,
                    "intrinsics": np.asarray(parameters["K"], np.float64).reshape(3, 3),
                }
            )
    if not looks_inward(poses):  # world-to-camera after all
        poses = [np.linalg.inv(pose) for pose in poses]
    for entry, pose in zip(frames, poses):
        entry["cam2world"] = pose
    return export_capture(out, frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anno", type=Path, required=True, help="the performance's _anno.smc")
    parser.add_argument("--raw", type=Path, required=True, help="the performance's _raw.smc")
    parser.add_argument("--frame", type=int, default=0, help="frame number (default 0)")
    parser.add_argument("--cameras", help="comma-separated camera numbers to keep (default: all)")
    parser.add_argument("--group", default="Camera_5mp", help="camera set in the raw file (Camera_5mp or Camera_12mp)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the capture")
    args = parser.parse_args(argv)
    try:
        cameras = [int(name) for name in args.cameras.split(",")] if args.cameras else None
        path = convert(args.anno, args.raw, args.frame, args.out, cameras, args.group)
    except ValueError:
        print("error: --cameras must be comma-separated camera numbers.", file=sys.stderr)
        return 2
    except Dp360Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
