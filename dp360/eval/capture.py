"""Ground-truth captures in nerfstudio's `transforms.json` layout, and resampling their images.

A capture is a folder with `transforms.json` (OpenGL cam2world per frame, pixel intrinsics per
frame or at the top level, `file_path` relative to the folder, optional `mask_path`: white is
the subject) and its images. A run's own `views/` folder is one, and so is what the dataset
scripts in `scripts/datasets/` write. Lens distortion coefficients are not applied (a note says
so when a frame has any).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import cameras
from ..errors import Dp360Error

TRANSFORMS = "transforms.json"
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


@dataclass
class CaptureFrame:
    name: str  # file_path as transforms.json writes it
    image_path: Path
    mask_path: Path | None
    cam2world: np.ndarray  # OpenCV axes, the capture's world frame
    intrinsics: np.ndarray  # pixels
    width: int
    height: int


@dataclass
class Capture:
    folder: Path
    frames: list[CaptureFrame]
    notes: list[str] = field(default_factory=list)

    def index_of(self, reference: str | int | None) -> int:
        """The frame a `--reference` names: an index, or a file name (with or without folders)."""
        if reference is None:
            return 0
        if isinstance(reference, int) or str(reference).isdigit():
            index = int(reference)
            if not 0 <= index < len(self.frames):
                raise Dp360Error(
                    f"--reference {index} is not a frame of '{self.folder}' (it has {len(self.frames)}); "
                    f"give an index from 0 to {len(self.frames) - 1} or a file name."
                )
            return index
        for index, frame in enumerate(self.frames):
            if reference in (frame.name, Path(frame.name).name, Path(frame.name).stem):
                return index
        raise Dp360Error(
            f"--reference '{reference}' names no frame of '{self.folder}'; give a file_path from its {TRANSFORMS}."
        )


def _bad(folder: Path, problem: str) -> Dp360Error:
    return Dp360Error(
        f"'{folder / TRANSFORMS}' is not a capture dp360 can read ({problem}); "
        "write it in nerfstudio's transforms.json layout (see scripts/datasets/)."
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_capture(path: str | Path) -> Capture:
    """The capture at `path` (its folder, or its transforms.json), every frame checked: a 4x4
    finite pose, positive intrinsics and image size, and image (and mask) files that exist."""
    path = Path(path)
    folder = path.parent if path.name == TRANSFORMS or path.is_file() else path
    transforms_path = path if path.is_file() else folder / TRANSFORMS
    if not transforms_path.is_file():
        state = "does not exist" if not folder.exists() else f"has no {TRANSFORMS}"
        raise Dp360Error(
            f"Capture '{path}' {state}; pass a folder with a nerfstudio {TRANSFORMS} (a run's views/ is one)."
        )
    try:
        transforms = json.loads(transforms_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise _bad(folder, f"it cannot be read as JSON: {type(error).__name__}") from None
    if not isinstance(transforms, dict) or not isinstance(transforms.get("frames"), list) or not transforms["frames"]:
        raise _bad(folder, "no list of frames")
    notes: list[str] = []
    frames = []
    for number, frame in enumerate(transforms["frames"]):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str) or not frame["file_path"]:
            raise _bad(folder, f"frame {number} has no file_path")
        name = frame["file_path"]
        try:
            matrix = np.asarray(frame.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            matrix = np.zeros(0)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise _bad(folder, f"frame '{name}' has no 4x4 transform_matrix of finite numbers")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
            raise _bad(folder, f"frame '{name}' has a singular rotation")

        def get(key: str, frame: dict[str, Any] = frame) -> float | None:
            return _number(frame.get(key, transforms.get(key)))

        image_path = folder / name
        if not image_path.is_file():
            raise Dp360Error(f"Capture image '{image_path}' is missing; fix file_path '{name}' in {transforms_path}.")
        mask_name = frame.get("mask_path")
        mask_path = folder / mask_name if isinstance(mask_name, str) and mask_name else None
        if mask_path is not None and not mask_path.is_file():
            raise Dp360Error(f"Capture mask '{mask_path}' is missing; fix mask_path of '{name}' in {transforms_path}.")
        width, height = get("w"), get("h")
        if width is None or height is None:
            from PIL import Image

            with Image.open(image_path) as image:
                width, height = float(image.width), float(image.height)
        fx, fy, cx, cy = get("fl_x"), get("fl_y"), get("cx"), get("cy")
        if fx is None and fy is not None:
            fx = fy
        if fy is None and fx is not None:
            fy = fx
        cx = width / 2 if cx is None else cx
        cy = height / 2 if cy is None else cy
        if fx is None or fx <= 0 or fy <= 0 or width < 1 or height < 1:
            raise _bad(folder, f"frame '{name}' has no positive focal length (fl_x, fl_y) and image size (w, h)")
        if any(get(key) for key in _DISTORTION_KEYS) and not any("distortion" in note for note in notes):
            notes.append("lens distortion coefficients in the capture are ignored (undistort the images first)")
        intrinsics = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        frames.append(
            CaptureFrame(
                name, image_path, mask_path, cameras.opengl_to_opencv(matrix), intrinsics, int(width), int(height)
            )
        )
    return Capture(folder, frames, notes)


def write_capture(folder: str | Path, frames: list[dict[str, Any]]) -> Path:
    """`transforms.json` for frames given as {file_path, cam2world (OpenCV), intrinsics (pixels),
    width, height, optional mask_path}: the layout `read_capture` reads (for the dataset scripts)."""
    from ..atomic import write_json_atomic

    entries = []
    for frame in frames:
        intrinsics = np.asarray(frame["intrinsics"], dtype=np.float64)
        entry = {
            "file_path": frame["file_path"],
            "transform_matrix": cameras.opencv_to_opengl(frame["cam2world"]).tolist(),
            "fl_x": float(intrinsics[0, 0]),
            "fl_y": float(intrinsics[1, 1]),
            "cx": float(intrinsics[0, 2]),
            "cy": float(intrinsics[1, 2]),
            "w": int(frame["width"]),
            "h": int(frame["height"]),
        }
        if frame.get("mask_path"):
            entry["mask_path"] = frame["mask_path"]
        entries.append(entry)
    target = Path(folder) / TRANSFORMS
    write_json_atomic(target, {"camera_model": "OPENCV", "frames": entries})
    return target


# -- images -------------------------------------------------------------------------------------


def load_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB float image in [0, 1], alpha in [0, 1] or None)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255 if "A" in image.getbands() else None
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except (OSError, ValueError) as error:
        raise Dp360Error(f"'{path}' cannot be read as an image ({type(error).__name__}); replace it.") from None
    return rgb, alpha


def load_mask(frame: CaptureFrame, alpha: np.ndarray | None) -> np.ndarray | None:
    """The subject's mask in [0, 1]: the frame's mask_path, else the image's alpha, else None."""
    if frame.mask_path is None:
        return alpha
    from PIL import Image

    try:
        with Image.open(frame.mask_path) as image:
            mask = np.asarray(image.convert("L"), dtype=np.float32) / 255
    except (OSError, ValueError) as error:
        raise Dp360Error(
            f"'{frame.mask_path}' cannot be read as a mask ({type(error).__name__}); replace it."
        ) from None
    if mask.shape != (frame.height, frame.width):
        raise Dp360Error(
            f"Mask '{frame.mask_path}' is {mask.shape[1]} x {mask.shape[0]} px but its image is "
            f"{frame.width} x {frame.height}; give masks of the images' size."
        )
    return mask


def resample(
    image: np.ndarray,
    source_cam2world: np.ndarray,
    source_intrinsics: np.ndarray,
    target_cam2world: np.ndarray,
    target_intrinsics: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`image` (seen by the source camera) as a `size` px image of the target camera, and the
    target pixels it covers (1 inside, 0 outside), through the plane at the head's centre facing
    the target (`cameras.plane_homography`; a pure rotation when both share a centre). A much
    larger source is first shrunk by area averaging, so that the resampling does not alias."""
    import cv2

    image = np.asarray(image, dtype=np.float32)
    source_intrinsics = np.asarray(source_intrinsics, dtype=np.float64).copy()
    homography = cameras.plane_homography(source_cam2world, source_intrinsics, target_cam2world, target_intrinsics)
    if image.shape[:2] == (size, size) and np.allclose(homography, np.eye(3), atol=1e-9):
        return image.copy(), np.ones((size, size), np.float32)  # the same camera: no resampling at all
    shrink = float(source_intrinsics[0, 0] / target_intrinsics[0, 0])
    if shrink > 1.5:
        height, width = image.shape[:2]
        small = (max(1, round(width / shrink)), max(1, round(height / shrink)))
        scale = np.diag([small[0] / width, small[1] / height, 1.0])
        image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
        source_intrinsics = scale @ source_intrinsics
        homography = cameras.plane_homography(source_cam2world, source_intrinsics, target_cam2world, target_intrinsics)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(image, homography, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT)
    ones = np.ones(image.shape[:2], np.float32)
    covered = cv2.warpPerspective(ones, homography, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT)
    return warped, covered


# -- writing captures (the dataset scripts) -------------------------------------------------------


def looks_inward(cam2worlds: list[np.ndarray], share: float = 0.8) -> bool:
    """Whether the cameras (OpenCV cam2world) look at the point their optical axes meet, as a rig
    around a head does: it lies in front of at least `share` of them. A wrong pose convention
    (world-to-camera read as camera-to-world) fails this."""
    try:
        centre = cameras.axes_meeting_point(cam2worlds)
    except ValueError:
        return False
    ahead = [float((centre - pose[:3, 3]) @ pose[:3, 2]) > 0 for pose in cam2worlds]
    return sum(ahead) >= share * len(ahead)


def check_new_folder(out: str | Path) -> Path:
    """A capture goes into a new or empty folder (a dataset script never replaces anything)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Dp360Error(f"'{out}' exists and is not an empty folder; choose a new --out folder for the capture.")
    return out


def export_capture(out: str | Path, frames: list[dict[str, Any]]) -> Path:
    """Write a capture: images/NAME.png, masks/NAME.png (where a frame has a mask) and
    transforms.json. Each frame: name, image (uint8 RGB), mask (uint8, 255 = subject, or None),
    cam2world (OpenCV), intrinsics (pixels)."""
    from ..imaging import save_image_atomic

    out = check_new_folder(out)
    if not frames:
        raise Dp360Error("No camera frames to write; check the source folder and the --frame and --cameras options.")
    if not looks_inward([frame["cam2world"] for frame in frames]):
        raise Dp360Error(
            "The cameras do not look at a common point in front of them, so their poses were read in the wrong "
            "convention; report this with the dataset's release name."
        )
    entries = []
    for frame in frames:
        image = np.ascontiguousarray(frame["image"])
        save_image_atomic(out / "images" / f"{frame['name']}.png", image)
        entry = {
            "file_path": f"images/{frame['name']}.png",
            "cam2world": frame["cam2world"],
            "intrinsics": frame["intrinsics"],
            "width": image.shape[1],
            "height": image.shape[0],
        }
        if frame.get("mask") is not None:
            save_image_atomic(out / "masks" / f"{frame['name']}.png", np.ascontiguousarray(frame["mask"]))
            entry["mask_path"] = f"masks/{frame['name']}.png"
        entries.append(entry)
    return write_capture(out, entries)


def scaled_intrinsics(intrinsics: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Pixel intrinsics of an image resized by (scale_x, scale_y) (pixel centres at +0.5)."""
    return np.diag([scale_x, scale_y, 1.0]) @ np.asarray(intrinsics, dtype=np.float64)
