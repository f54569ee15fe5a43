"""Rendering a fitted field: single cameras, and the turntable (an orbit path of our own)
written as H.264 MP4 (imageio-ffmpeg's bundled ffmpeg), GIF or PNG frames."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cameras
from ..atomic import atomic_directory, atomic_path
from ..errors import Dp360Error
from ..imaging import save_image_atomic
from ..outputs import check_file_target, check_frames_target
from .checkpoint import LoadedField

FORMATS = ("mp4", "gif", "frames")


@dataclass
class TurntableSettings:
    frames: int = 120
    elevation: float = 0.0  # degrees above eye level
    fps: int = 30
    resolution: int = 512
    radius: float = cameras.CAMERA_RADIUS
    focal: float = cameras.FOCAL_NORMALIZED  # normalised, as the views

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        from ..checks import check_float, check_int

        check_int("--frames", self.frames, 1, 10_000)
        check_int("--resolution", self.resolution, 16, 4096)
        if self.resolution % 2:
            raise Dp360Error("--resolution must be an even number of pixels (H.264 needs even sizes).")
        check_float("--elevation", self.elevation, -89.0, 89.0)
        # The head fills +-0.5 around the origin: a camera closer than 0.6 is inside it.
        check_float("--radius", self.radius, 0.6, 100.0)
        check_int("--fps", self.fps, 1, 240)


def turntable_poses(settings: TurntableSettings) -> list[np.ndarray]:
    """OpenCV cam2world matrices on a full turn starting at the front."""
    return [
        cameras.orbit_pose(360.0 * k / settings.frames, settings.elevation, settings.radius)
        for k in range(settings.frames)
    ]


@torch.no_grad()
def render_pose(
    field: LoadedField,
    cam2world: np.ndarray,
    width: int,
    height: int | None = None,
    focal: float = cameras.FOCAL_NORMALIZED,
) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] from an OpenCV cam2world and a normalised focal length."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    height = height or width
    opengl = torch.tensor(cameras.opencv_to_opengl(cam2world)[:3], dtype=torch.float32)
    camera = Cameras(
        camera_to_worlds=opengl[None],
        fx=focal * width,
        fy=focal * height,
        cx=width / 2,
        cy=height / 2,
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    ).to(field.device)
    outputs = field.model.get_outputs_for_camera(camera)
    return outputs["rgb"].clamp(0, 1).float().cpu().numpy()


def render_turntable(
    field: LoadedField, settings: TurntableSettings, progress: bool = False
) -> tuple[list[np.ndarray], float]:
    """uint8 frames and frames per second achieved."""
    from tqdm.auto import tqdm

    settings.check()
    frames = []
    start = time.perf_counter()
    for pose in tqdm(turntable_poses(settings), desc="turntable", disable=not progress, leave=False):
        frames.append(
            (render_pose(field, pose, settings.resolution, focal=settings.focal) * 255).round().astype(np.uint8)
        )
    return frames, len(frames) / max(time.perf_counter() - start, 1e-9)


def check_turntable_target(out: Path, output_format: str, overwrite: bool = False) -> Path:
    """Refuse, before any rendering, an `out` that writing the turntable would destroy (see dp360.outputs)."""
    if output_format not in FORMATS:
        raise Dp360Error(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}.")
    return (check_frames_target if output_format == "frames" else check_file_target)(out, overwrite)


def write_frames(frames: list[np.ndarray], out: Path, output_format: str, fps: int, overwrite: bool = False) -> Path:
    """Write to `out` atomically: an .mp4, a .gif, or a folder of PNGs (NNNN.png)."""
    out = check_turntable_target(out, output_format, overwrite)
    if output_format == "mp4":
        from ..video import write_mp4

        return write_mp4(out, frames, fps=fps)
    if output_format == "gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        with atomic_path(out) as temporary:
            images[0].save(
                temporary, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
            )
        return out
    with atomic_directory(out) as staging:
        for index, frame in enumerate(frames):
            save_image_atomic(staging / f"{index:04d}.png", frame)
    return out
