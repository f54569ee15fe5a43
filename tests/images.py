"""Builders of test input files (each returns the path it wrote)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (0 is allowed) with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def truncated_copy(source: Path, path: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def cut_copy(source: Path, path: Path, length: int) -> Path:
    """The first `length` bytes of `source`."""
    path.write_bytes(source.read_bytes()[:length])
    return path


def two_faces(astronaut: np.ndarray, path: Path) -> Path:
    """The astronaut at full size on the left and at 0.78x on the right."""
    canvas = np.full((512, 1024, 3), 200, np.uint8)
    canvas[:, :512] = astronaut
    canvas[56:456, 600:1000] = np.asarray(Image.fromarray(astronaut).resize((400, 400), Image.LANCZOS))
    Image.fromarray(canvas).save(path)
    return path


def no_face(path: Path, size: int = 512) -> Path:
    """A smooth gradient with a few shapes: an image with no face in it."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    rgb[size // 4 : size // 2, size // 4 : size // 2] = (30, 200, 60)
    Image.fromarray(rgb).save(path)
    return path


def cartoon_head(path: Path, size: int = 512) -> Path:
    """A flat-shaded cartoon head (circles), already centred: detectors are not expected to find it."""
    import cv2

    canvas = np.full((size, size, 3), 255, np.uint8)
    centre = (size // 2, size // 2 + 20)
    cv2.circle(canvas, centre, size // 3, (250, 200, 160), -1)
    for dx in (-size // 8, size // 8):
        cv2.circle(canvas, (centre[0] + dx, centre[1] - size // 16), size // 24, (40, 40, 40), -1)
    cv2.ellipse(canvas, (centre[0], centre[1] + size // 8), (size // 10, size // 24), 0, 0, 180, (150, 40, 40), 6)
    Image.fromarray(canvas).save(path)
    return path
