"""H.264 MP4 writing with the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """Encode (H, W, 3) uint8 frames (even sizes) to an H.264 MP4, atomically."""
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    with atomic_path(path) as temporary:
        writer = imageio_ffmpeg.write_frames(
            str(temporary),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            output_params=["-f", "mp4"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        writer.close()
    return Path(path)


def read_mp4(path: str | Path) -> tuple[dict, list[np.ndarray]]:
    """Decode an MP4 into its metadata and (H, W, 3) uint8 frames."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3) for data in reader]
    return meta, frames
