"""Views from elsewhere: a folder in nerfstudio's layout as the views of a run (`dp360 fit`).

The folder holds `transforms.json` (a `frames` list, each with `file_path` and a 4x4 OpenGL
`transform_matrix`; `fl_x fl_y cx cy w h` per frame or at the top level) and the images it lists:
a run's own `views/`, another method's views, or a capture. `read_views` checks all of it before
anything is written (a bounded JSON read, every path inside the folder, every image decoded, one
image size, rigid poses, finite positive intrinsics, at least `MIN_VIEWS` views) and returns a
`ViewsInput`, the input a views run belongs to (as a portrait is the input of a reconstruct run).
`IMPORT_STAGE` then copies the views into the run's `views/` (000.png ... as 8-bit RGB PNG, a
`transforms.json` pointing at the copies), so the fit, render, export, consistency and report
stages read `views/` exactly as in a reconstruct run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .. import cameras, layout
from ..errors import Dp360Error
from ..pipeline.stage import Stage, StageContext, Unavailable

TRANSFORMS = "transforms.json"
MIN_VIEWS = 8  # fewer views than this leave most of the head unseen
INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")  # the fit's cameras are pinholes
RIGID_TOLERANCE = 1e-3  # |R^T R - I| and |det R - 1| of a pose written in single precision
# Cameras further than this share of the orbit radius from it, or not looking at the head's
# centre, see the field's box (the unit box around the origin) badly: a note says so.
ORBIT_SLACK = 0.25
LAYOUT = (
    "nerfstudio's layout: a frames list with file_path and transform_matrix per frame, and fl_x, fl_y, cx, cy, "
    "w, h per frame or at the top level"
)


@dataclass
class ViewFrame:
    file_path: str  # as transforms.json writes it
    image: Path  # the image file, inside the folder
    sha256: str
    camera: cameras.ViewCamera  # OpenCV cam2world, normalised intrinsics


@dataclass
class ViewsInput:
    """A checked views folder: the input a views run belongs to."""

    path: Path  # the folder, resolved
    frames: list[ViewFrame]
    size: tuple[int, int]  # (width, height) of every view
    transforms_sha256: str
    notes: list[str] = field(default_factory=list)
    max_pixels: int | None = None  # the bound the images were read with (--max-pixels)
    kind: str = "views"

    def hashes(self) -> dict[str, str]:
        """sha256 of every file the views are made of, by its path in the folder."""
        return {TRANSFORMS: self.transforms_sha256, **{frame.file_path: frame.sha256 for frame in self.frames}}

    @property
    def sha256(self) -> str:
        """One hash of the whole folder's content (transforms.json and every image, in order)."""
        return hashlib.sha256(json.dumps(list(self.hashes().items())).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the input (`input`)."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "size": list(self.size),
            "views": len(self.frames),
            "files": self.hashes(),
            "notes": list(self.notes),
        }


def _refuse(transforms: Path, problem: str) -> Dp360Error:
    return Dp360Error(f"'{transforms}' {problem}; write it in {LAYOUT}.")


def _bad_value(transforms: Path, problem: str) -> Dp360Error:
    return Dp360Error(
        f"'{transforms}' {problem}; fix that value (poses are OpenGL camera-to-world matrices, intrinsics are in "
        "pixels)."
    )


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symbolic link followed, lies in `folder` (resolved)."""
    try:
        return path.resolve(strict=True).is_relative_to(folder)
    except (OSError, RuntimeError):  # missing, or a loop of links
        return False


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _pose(transforms: Path, name: str, value: Any) -> np.ndarray:
    """A frame's transform_matrix: 4x4, finite, rigid (orthonormal rotation, no mirroring)."""
    rows = value if isinstance(value, list) and len(value) == 4 else []
    if not rows or not all(isinstance(row, list) and len(row) == 4 for row in rows):
        raise _refuse(transforms, f"gives frame '{name}' a transform_matrix that is not 4 rows of 4 numbers")
    if any(_number(x) is None for row in rows for x in row):
        raise _refuse(transforms, f"gives frame '{name}' a transform_matrix that is not 4 rows of 4 numbers")
    matrix = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise _bad_value(transforms, f"gives frame '{name}' a transform_matrix with non-finite numbers")
    rotation = matrix[:3, :3]
    rigid = (
        np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6)
        and np.allclose(rotation.T @ rotation, np.eye(3), atol=RIGID_TOLERANCE)
        and abs(np.linalg.det(rotation) - 1.0) < RIGID_TOLERANCE
    )
    if not rigid:
        raise _bad_value(
            transforms,
            f"gives frame '{name}' a transform_matrix that is not a rigid camera pose (its rotation part is not "
            "orthonormal, or it scales, mirrors or projects)",
        )
    return matrix


def _intrinsics(transforms: Path, name: str, frame: dict[str, Any], top: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key in INTRINSICS:
        if key not in frame and key not in top:
            raise _refuse(transforms, f"gives frame '{name}' no {key} (neither in the frame nor at the top level)")
        value = _number(frame.get(key, top.get(key)))
        if value is None or not math.isfinite(value) or value <= 0:
            raise _bad_value(
                transforms,
                f"gives frame '{name}' {key} = {frame.get(key, top.get(key))!r}, not a finite positive number",
            )
        if key in ("w", "h") and value != int(value):
            raise _bad_value(transforms, f"gives frame '{name}' {key} = {value:g}, not a whole number of pixels")
        values[key] = value
    return values


def _image_path(folder: Path, transforms: Path, number: int, file_path: Any) -> Path:
    """The image a frame's file_path names, which must stay inside the folder."""
    if not isinstance(file_path, str) or not file_path.strip():
        raise _refuse(transforms, f"gives frame {number} no file_path")
    pure = PurePosixPath(file_path)
    if pure.is_absolute() or Path(file_path).is_absolute() or ".." in pure.parts:
        raise Dp360Error(
            f"'{transforms}' gives frame {number} the file_path '{file_path}', which leaves the views folder; "
            "give paths relative to the folder, inside it."
        )
    path = folder / pure
    if not path.exists() and not path.is_symlink():
        raise Dp360Error(f"View image '{path}' is missing; fix file_path '{file_path}' in '{transforms}'.")
    if not _inside(path, folder.resolve()):
        raise Dp360Error(
            f"View image '{path}' is a symbolic link that leads out of the views folder (or nowhere); copy the "
            "image into the folder instead."
        )
    if not path.is_file():
        raise Dp360Error(f"View image '{path}' is not a file; fix file_path '{file_path}' in '{transforms}'.")
    return path


def decode_view(path: Path, max_pixels: int | None = None):
    """A view image as `imaging.load_portrait` reads it (bounded, any format Pillow decodes, alpha
    composited on white), at its own size: no portrait's minimum, no downscaling."""
    from ..imaging import MAX_PIXELS, load_portrait

    limit = max_pixels or MAX_PIXELS
    return load_portrait(path, max_side=limit, max_pixels=limit, min_side=1)


def read_views(folder: str | Path, max_pixels: int | None = None) -> ViewsInput:
    """The views folder `folder`, every file checked (see the module's docstring); a Dp360Error
    naming the first problem otherwise. Reads, never writes."""
    from ..atomic import file_sha256
    from ..safety import MAX_CONFIG_BYTES, read_json_object

    folder = Path(folder)
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise Dp360Error(
            f"Views folder '{folder}' {state}; pass a folder holding a nerfstudio {TRANSFORMS} and its images "
            "(a run's views/ is one)."
        )
    root = folder.resolve()
    transforms_path = folder / TRANSFORMS
    if not transforms_path.exists() and not transforms_path.is_symlink():
        raise Dp360Error(f"Views folder '{folder}' has no {TRANSFORMS}; write one in {LAYOUT}.")
    if not _inside(transforms_path, root) or not transforms_path.is_file():
        raise Dp360Error(
            f"'{transforms_path}' is not a file inside the views folder (a folder, or a symbolic link out of it); "
            "put the file itself there."
        )
    if transforms_path.stat().st_size > MAX_CONFIG_BYTES:
        raise _refuse(transforms_path, f"is larger than {MAX_CONFIG_BYTES >> 20} MB, far more than a camera list")
    transforms = read_json_object(transforms_path, f"write it in {LAYOUT}")
    frames = transforms.get("frames")
    if not isinstance(frames, list) or not frames:
        raise _refuse(transforms_path, "has no list of frames")
    if len(frames) < MIN_VIEWS:
        raise Dp360Error(
            f"'{transforms_path}' lists {len(frames)} views; fitting a head needs at least {MIN_VIEWS} around it."
        )
    model = transforms.get("camera_model", "OPENCV")
    if model not in PINHOLE_MODELS:
        raise Dp360Error(
            f"'{transforms_path}' has camera_model {model!r}; dp360 fits pinhole cameras only "
            f"({', '.join(PINHOLE_MODELS)}): undistort or re-render the views first."
        )
    notes: list[str] = []
    checked = []
    for number, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise _refuse(transforms_path, f"has frame {number} that is not an object")
        image_path = _image_path(folder, transforms_path, number, frame.get("file_path"))
        name = frame["file_path"]
        if "transform_matrix" not in frame:
            raise _refuse(transforms_path, f"gives frame '{name}' no transform_matrix")
        matrix = _pose(transforms_path, name, frame["transform_matrix"])
        intrinsics = _intrinsics(transforms_path, name, frame, transforms)
        if any(_number(frame.get(key, transforms.get(key))) for key in DISTORTION) and not notes:
            notes.append("the views' lens distortion coefficients are ignored (the fit's cameras are pinholes)")
        checked.append((name, image_path, matrix, intrinsics))

    size: tuple[int, int] | None = None
    first = ""
    views = []
    for name, image_path, matrix, intrinsics in checked:
        image = decode_view(image_path, max_pixels)
        if size is None:
            size, first = image.size, name
        elif image.size != size:
            raise Dp360Error(
                f"View image '{image_path}' is {image.size[0]}x{image.size[1]} px but '{first}' is "
                f"{size[0]}x{size[1]}; give every view the same size."
            )
        if (int(intrinsics["w"]), int(intrinsics["h"])) != image.size:
            raise Dp360Error(
                f"View image '{image_path}' is {image.size[0]}x{image.size[1]} px but '{transforms_path}' gives it "
                f"w {int(intrinsics['w'])}, h {int(intrinsics['h'])}; fix w and h, or resize the image."
            )
        if image.alpha is not None and not any("transparent" in note for note in notes):
            notes.append("transparent views are composited on white")
        entry = {"file_path": name, "transform_matrix": matrix.tolist(), **intrinsics}
        (camera,) = cameras.from_nerfstudio_transforms({"frames": [entry]})
        views.append(ViewFrame(name, image_path, image.sha256, camera))
    assert size is not None
    off_orbit = sum(not _on_orbit(view.camera.cam2world) for view in views)
    if off_orbit:
        notes.append(
            f"{off_orbit} of {len(views)} cameras are not on dp360's orbit (about {cameras.CAMERA_RADIUS} from the "
            "origin, looking at it): the field covers the unit box around the origin, so those views fit poorly"
        )
    return ViewsInput(root, views, size, file_sha256(transforms_path), notes, max_pixels)


def _on_orbit(cam2world: np.ndarray) -> bool:
    position, forward = cam2world[:3, 3], cam2world[:3, 2]
    distance = float(np.linalg.norm(position))
    if abs(distance - cameras.CAMERA_RADIUS) > ORBIT_SLACK * cameras.CAMERA_RADIUS:
        return False
    return float(forward @ -position) > 0.95 * distance  # within about 18 degrees of the centre


# -- the stage ------------------------------------------------------------------------------------


def view_name(index: int) -> str:
    return f"{index:03d}.png"


def import_views(views: ViewsInput, folder: Path) -> dict[str, Any]:
    """Copy the views into `folder` as 000.png ... (8-bit RGB) with a transforms.json pointing at
    them, written by `cameras.to_nerfstudio_transforms` (per-frame intrinsics where they differ)."""
    from ..atomic import write_json_atomic
    from ..imaging import save_image_atomic

    copies = []
    for index, frame in enumerate(views.frames):
        image = decode_view(frame.image, views.max_pixels)
        if image.sha256 != frame.sha256:
            raise Dp360Error(f"View image '{frame.image}' changed while it was imported; rerun the same command.")
        save_image_atomic(folder / view_name(index), image.rgb)
        copies.append(cameras.ViewCamera(view_name(index), frame.camera.cam2world, frame.camera.intrinsics))
    width, height = views.size
    write_json_atomic(folder / TRANSFORMS, cameras.to_nerfstudio_transforms(copies, width, height))
    return {"views": len(copies), "size": [width, height], "source": str(views.path)}


def _check(context: StageContext) -> Unavailable | None:
    if context.views_input is None:
        return Unavailable("not_available", "no views folder was given to import; run `dp360 fit VIEWS_DIR`")
    return None


IMPORT_STAGE = Stage(
    name="import",
    folder=layout.VIEWS,
    description="import the views (images and cameras)",
    settings=lambda context: {"images": "8-bit RGB PNG", "transparency": "composited on white"},
    inputs=lambda context: context.views_input.hashes(),
    build=lambda context, folder: import_views(context.views_input, folder),
    check=_check,
    provides=("views",),  # the fit reads views/ as it reads generated views
)
