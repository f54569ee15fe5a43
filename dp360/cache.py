"""Where dp360 keeps what it fetches and converts, and the names of those files.

Root: `$DP360_CACHE`, else `$XDG_CACHE_HOME/dp360`, else `~/.cache/dp360` (the layout is in
`dp360.weights`, which fetches into it). The bottom layer: every owner of a file (the PanoHead
store, the perceptual loss, the detector, the bundles) finds it here without importing the
registry that downloads it.
"""

from __future__ import annotations

import os
from pathlib import Path

# torchvision's VGG16 ImageNet weights (the PanoHead inversion's LPIPS backbone): the file's
# name (its hash prefix in it) and the folder torchvision serves it from.
PERCEPTUAL_FILE = "vgg16-397923af.pth"
PERCEPTUAL_HOME = "https://download.pytorch.org/models/"


def cache_dir() -> Path:
    if os.environ.get("DP360_CACHE"):
        return Path(os.environ["DP360_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dp360"


def facexlib_dir() -> Path:
    if os.environ.get("DP360_FACEXLIB_DIR"):
        return Path(os.environ["DP360_FACEXLIB_DIR"]).expanduser()
    return cache_dir() / "facexlib"


def describe_cache() -> list[tuple[Path, int]]:
    """Files in the dp360 cache with their sizes in bytes."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted((path, path.stat().st_size) for path in root.rglob("*") if path.is_file())


def bundles_dir() -> Path:
    return cache_dir() / "bundles"


def bundle_path(kind: str, fp16: bool = False) -> Path:
    return bundles_dir() / f"{kind}-{'fp16' if fp16 else 'fp32'}"


def downloads_dir() -> Path:
    """Raw downloads (and their resumable partial files) before conversion."""
    return cache_dir() / "downloads"


def panohead_dir() -> Path:
    """The converted PanoHead generator (`dp360.panohead.store`'s layout)."""
    return bundles_dir() / "panohead"


def perceptual_dir() -> Path:
    return cache_dir() / "perceptual"
