"""Load, validate and normalise input images; write files atomically.

Every image that enters dp360 goes through `load_portrait`, which turns whatever Pillow can
decode (grayscale, 16-bit, palette, CMYK, RGBA, multi-frame, EXIF-rotated, huge) into an 8-bit
RGB array plus an optional alpha mask, or raises `InputImageError` with one sentence that says
what is wrong and what to do. Images are saved through `dp360.atomic`, as every file dp360 writes,
so an interrupted or failed run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .atomic import atomic_path, file_sha256
from .errors import InputImageError

# Smallest side we accept: below this a face crop has too few pixels to align or to condition on.
MIN_SIDE = 128
# Larger inputs are downscaled on load (the crop is 512 px; detection runs at <= 1024 px anyway).
MAX_SIDE = 4096
# Images whose header declares more pixels are refused before decoding (Pillow's own default is
# about 89 MP): decoding costs about 4 bytes a pixel and more in the conversions that follow.
MAX_PIXELS = 90_000_000
# What a truncated or corrupt file raises from Pillow's decoders, in the header or in the data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class LoadedImage:
    """An input image normalised to 8-bit RGB (H, W, 3) with an optional alpha mask (H, W)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path
    sha256: str
    original_size: tuple[int, int]  # (width, height) as decoded, after EXIF rotation
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def _to_rgb_and_alpha(image: Image.Image, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert any Pillow mode to 8-bit RGB; alpha (if any) is returned separately in [0, 255]."""
    mode = image.mode
    if mode == "P":
        # Palette images may carry transparency in the palette or in info["transparency"].
        image = image.convert("RGBA" if "transparency" in image.info or image.palette.mode == "RGBA" else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            # 16-bit files decode to I;16 or I (32-bit) with values in [0, 65535].
            top = 65535.0 if values.max(initial=0.0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} (high bit depth grayscale) to 8-bit RGB")
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    if mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        array = np.asarray(image)
        alpha = array[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(array[:, :, :3]), None
        weight = alpha.astype(np.float32)[:, :, None] / 255.0
        rgb = array[:, :, :3].astype(np.float32) * weight + 255.0 * (1.0 - weight)
        notes.append("composited the transparent background on white and kept the alpha as a mask")
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8), np.ascontiguousarray(alpha)
    if mode != "RGB":
        if mode == "CMYK":
            notes.append("converted CMYK to RGB")
        elif mode == "L":
            notes.append("converted grayscale to RGB")
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image)), None


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _sniff_format(path: Path) -> str | None:
    """Name of the image format whose signature the file starts with, if any."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def _megapixels(pixels: int) -> str:
    return f"{round(pixels / 1e6, 2):g}"


# Bytes of memory per pixel at the peak of `load_portrait`: the decoded image, its EXIF-rotated
# copy, the RGB and alpha arrays and the downscaled copy (a 900 MP PNG was measured at 10.6 GB).
DECODE_BYTES_PER_PIXEL = 12


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _check_decode_memory(path: Path, image: Image.Image, max_side: int) -> None:
    """Refuse, before decoding, an image the machine's free memory cannot hold, whatever
    --max-pixels allows (JPEGs decode downscaled, by up to 8 per side)."""
    pixels = image.width * image.height
    if image.format == "JPEG" and max(image.width, image.height) > max_side:
        scale = 1
        while scale < 8 and max(image.width, image.height) / (scale * 2) >= max_side:
            scale *= 2
        pixels //= scale * scale
    needed, free = pixels * DECODE_BYTES_PER_PIXEL, available_memory()
    if free is not None and needed > free:
        raise InputImageError(
            f"Input image '{path}' is {image.width}x{image.height} pixels; decoding it needs about "
            f"{needed / 2**30:.1f} GB of memory and this machine has {free / 2**30:.1f} GB free, so downscale it first."
        )


def downscaled_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size an image of width x height is loaded at: the longest side brought down to
    `max_side`, but never a side below MIN_SIDE (a thin image is shrunk only until its shortest
    side reaches MIN_SIDE, and its longest side may stay above `max_side`: it has few pixels)."""
    longest, shortest = max(width, height), min(width, height)
    if longest <= max_side or shortest <= MIN_SIDE:
        return width, height
    scale = max(max_side / longest, MIN_SIDE / shortest)
    if scale >= 1.0:
        return width, height
    # Never round the short side below the minimum.
    return max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))


def load_portrait(
    path: str | os.PathLike, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> LoadedImage:
    """Read an image file into 8-bit RGB, or raise `InputImageError` with a one-sentence reason.

    Images whose header declares more than `max_pixels` pixels are refused before any decoding;
    images with a side below `min_side` after decoding (a portrait's minimum by default) too."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"Input image '{path}' does not exist; check the path.")
    if path.is_dir():
        raise InputImageError(f"Input '{path}' is a folder, not an image file; pass the image file itself.")
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block, or never end
            raise InputImageError(
                f"Input '{path}' is not a regular file (it is a FIFO, device or socket); pass an image file."
            )
        size_bytes = path.stat().st_size
        if size_bytes == 0:
            raise InputImageError(f"Input image '{path}' is an empty file (0 bytes); pass a real image.")
        sha256 = file_sha256(path)
    except PermissionError:
        raise InputImageError(
            f"Input image '{path}' cannot be read (permission denied); check its permissions."
        ) from None

    def corrupt(error: Exception) -> InputImageError:
        return InputImageError(f"Input image '{path}' is corrupt or truncated ({error}); re-export or re-download it.")

    notes: list[str] = []
    previous_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own check would refuse only at twice its limit, and without the size: ours,
            # right after the header is read, replaces it for the header's size.
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(path)
            except UnidentifiedImageError:
                kind = _sniff_format(path)
                if kind:
                    raise InputImageError(
                        f"'{path}' looks like a {kind} file but cannot be decoded (corrupt, truncated or zero-sized); "
                        "re-export or re-download it."
                    ) from None
                raise InputImageError(
                    f"'{path}' is not an image file dp360 can read; pass a PNG, JPEG, WebP, TIFF, BMP or GIF portrait."
                ) from None
            except _DECODE_ERRORS as error:  # a header cut short ("Truncated File Read")
                raise corrupt(error) from None
            # Pillow's check stays on for what the header did not show (other frames, tiles).
            Image.MAX_IMAGE_PIXELS = max_pixels
            with image:
                pixels = image.width * image.height
                if pixels > max_pixels:
                    raise InputImageError(
                        f"Input image '{path}' is {image.width}x{image.height} pixels ({_megapixels(pixels)} MP), "
                        f"more than the limit of {_megapixels(max_pixels)} MP; downscale it or pass --max-pixels."
                    )
                if image.width == 0 or image.height == 0:
                    raise InputImageError(f"Input image '{path}' has zero width or height; pass a real image.")
                _check_decode_memory(path, image, max_side)
                try:
                    frames = getattr(image, "n_frames", 1)
                    if frames > 1:
                        image.seek(0)
                        notes.append(f"the file holds {frames} frames; using the first")
                    if max(image.width, image.height) > max_side and image.format == "JPEG":
                        # Let the JPEG decoder downscale by a power of two while decoding (fast, low memory).
                        image.draft("RGB", (max_side, max_side))
                    image.load()
                    image = ImageOps.exif_transpose(image) or image
                except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                    raise InputImageError(
                        f"Input image '{path}' holds a frame or tile of more than {_megapixels(max_pixels)} MP; "
                        "downscale it or pass --max-pixels."
                    ) from None
                except _DECODE_ERRORS as error:
                    raise corrupt(error) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit

    original_size = (image.width, image.height)
    if min(original_size) < min_side:
        raise InputImageError(
            f"Input image '{path}' is only {original_size[0]}x{original_size[1]} pixels; "
            f"dp360 needs at least {min_side} px on each side, so use a larger portrait."
        )
    rgb, alpha = _to_rgb_and_alpha(image, notes)
    new_size = downscaled_size(rgb.shape[1], rgb.shape[0], max_side)
    if new_size != (rgb.shape[1], rgb.shape[0]):
        rgb = np.asarray(Image.fromarray(rgb).resize(new_size, Image.LANCZOS))
        if alpha is not None:
            alpha = np.asarray(Image.fromarray(alpha).resize(new_size, Image.LANCZOS))
        capped = max(new_size) > max_side
        notes.append(
            f"downscaled from {original_size[0]}x{original_size[1]} to {new_size[0]}x{new_size[1]} "
            + (
                f"(only so far: its shortest side stays at the {MIN_SIDE} px minimum)"
                if capped
                else f"(longest side at most {max_side} px)"
            )
        )
    return LoadedImage(rgb=rgb, alpha=alpha, path=path, sha256=sha256, original_size=original_size, notes=notes)


# Images are written atomically too (`atomic.atomic_path`).


def save_image_atomic(destination: str | os.PathLike, array: np.ndarray) -> None:
    """Save an 8-bit array (H, W), (H, W, 3) or (H, W, 4) as PNG/JPEG by the destination's suffix."""
    destination = Path(destination)
    with atomic_path(destination) as temporary:
        Image.fromarray(np.ascontiguousarray(array)).save(temporary, format=_format_for(destination))


def _format_for(path: Path) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
