"""Where dp360's weight files live and how they are fetched.

Cache root: `$DP360_CACHE`, else `$XDG_CACHE_HOME/dp360`, else `~/.cache/dp360`.
- `facexlib/`: RetinaFace weights (`detection_Resnet50_Final.pth`), fetched on first use from
  facexlib's release page; on an offline machine copy the file there by hand, or point
  `$DP360_FACEXLIB_DIR` (or `--detector-weights`) at a folder that holds it.
Downloads are disabled when `HF_HUB_OFFLINE=1` or `DP360_OFFLINE=1`.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DetectorUnavailableError, Dp360Error
from .imaging import atomic_path

RETINAFACE_FILES = {
    "resnet50": "detection_Resnet50_Final.pth",
    "mobile0.25": "detection_mobilenet0.25_Final.pth",
}
FACEXLIB_RELEASE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
DOWNLOAD_TIMEOUT_S = 20


def cache_dir() -> Path:
    if os.environ.get("DP360_CACHE"):
        return Path(os.environ["DP360_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dp360"


def facexlib_dir() -> Path:
    if os.environ.get("DP360_FACEXLIB_DIR"):
        return Path(os.environ["DP360_FACEXLIB_DIR"]).expanduser()
    return cache_dir() / "facexlib"


def offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "DP360_OFFLINE")
    )


def download_file(url: str, destination: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Stream `url` to `destination` through a temporary name (no partial file on failure)."""
    with atomic_path(destination) as temporary:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(temporary, "wb") as handle:
            while block := response.read(1 << 20):
                handle.write(block)
    return destination


def retinaface_weights(network: str = "resnet50", weights_dir: Path | None = None, allow_download: bool = True) -> Path:
    """Path of RetinaFace weights, downloading them into the cache if needed and allowed."""
    file_name = RETINAFACE_FILES[network]
    folder = Path(weights_dir) if weights_dir is not None else facexlib_dir()
    path = folder / file_name
    if path.is_file():
        return path
    how = f"put {file_name} from {FACEXLIB_RELEASE_URL} into {folder}, or use --detector dlib"
    if not allow_download or offline():
        raise DetectorUnavailableError(f"RetinaFace weights are not in {folder} and downloads are off; {how}.")
    try:
        return download_file(FACEXLIB_RELEASE_URL + file_name, path)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise DetectorUnavailableError(f"RetinaFace weights could not be downloaded ({reason}); {how}.") from None


def describe_cache() -> list[tuple[Path, int]]:
    """Files in the dp360 cache with their sizes in bytes."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted((path, path.stat().st_size) for path in root.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------
# Official DiffPortrait360 files (Hugging Face Hub) and their converted bundles
# --------------------------------------------------------------------------------------------

OFFICIAL_REPO = "gym890/diffportrait360"
# name -> (file in the repo, approximate size in GB, what it is)
OFFICIAL_FILES = {
    "main": (
        "model_state-340000.th",
        10.8,
        "360-view model: SD1.5 UNet + view-consistency modules + reference net + camera ControlNet + VAE + CLIP (fp32)",
    ),
    "back": ("back_head-230000.th", 9.2, "back-view model F (fp32)"),
    "panohead": ("easy-khair-180-gpc0.8-trans10-025000.pkl", 0.3, "PanoHead generator (non-commercial licence)"),
    "data": ("inference_data.zip", None, "inference data with the 32 'sphere32' camera-condition images"),
}


def bundles_dir() -> Path:
    return cache_dir() / "bundles"


def bundle_path(kind: str, fp16: bool = False) -> Path:
    return bundles_dir() / f"{kind}-{'fp16' if fp16 else 'fp32'}"


def download_official(name: str, cache: str | None = None) -> Path:
    """One official file through huggingface_hub (honours HF_HOME and HF_HUB_OFFLINE), or a
    clear error saying what to fetch and how."""
    from huggingface_hub import hf_hub_download

    if name not in OFFICIAL_FILES:
        raise Dp360Error(f"Unknown weight file '{name}'; choose from {', '.join(OFFICIAL_FILES)}.")
    file_name = OFFICIAL_FILES[name][0]
    try:
        return Path(hf_hub_download(OFFICIAL_REPO, file_name, cache_dir=cache))
    except Exception as error:  # noqa: BLE001 - every failure here has the same remedy
        where = cache or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise Dp360Error(
            f"{file_name} is not in the Hugging Face cache ({where}) and could not be downloaded "
            f"({type(error).__name__}); run `dp360 weights download {name}` with internet access, "
            f"or copy the file from huggingface.co/{OFFICIAL_REPO} and pass it with --checkpoint."
        ) from None


def cached_official(name: str, cache: str | None = None) -> Path | None:
    """The cached official file, if present (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(OFFICIAL_REPO, OFFICIAL_FILES[name][0], cache_dir=cache)
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------------------------
# Other files: the perceptual-loss backbone of the PanoHead inversion
# --------------------------------------------------------------------------------------------

EXTRA_FILES = {
    "perceptual": (
        "vgg16-397923af.pth",
        0.53,
        "torchvision VGG16 ImageNet weights: LPIPS backbone of the PanoHead inversion (BSD-3)",
    ),
}


def download_perceptual() -> Path:
    """torchvision's VGG16 weights into `<cache>/perceptual/`, checked against the hash prefix
    in their file name."""
    from .imaging import file_sha256
    from .panohead.perceptual import VGG16_SHA256_PREFIX, VGG16_URL, backbone_path

    path = backbone_path()
    if path.is_file() and file_sha256(path).startswith(VGG16_SHA256_PREFIX):
        return path
    how = f"download {VGG16_URL} by hand into {path.parent}"
    if offline():
        raise Dp360Error(
            f"Downloads are off (HF_HUB_OFFLINE/DP360_OFFLINE) and the VGG16 weights are not at {path}; {how}."
        )
    try:
        download_file(VGG16_URL, path, timeout=60)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise Dp360Error(
            f"The VGG16 weights could not be downloaded ({getattr(error, 'reason', error)}); {how}."
        ) from None
    if not file_sha256(path).startswith(VGG16_SHA256_PREFIX):
        path.unlink()
        raise Dp360Error(f"The downloaded VGG16 weights do not match their published hash; {how}.")
    return path


def extract_sphere32(archive: str | Path, destination: Path | None = None) -> Path:
    """The 32 `sphere32` camera images from the official inference-data zip into
    `<cache>/sphere32/` (atomically). The archive's internal layout is not documented, so the
    images are found by content: the folder named sphere32 holding 32 PNGs, else the only
    folder that holds exactly 32 PNGs."""
    import zipfile
    from collections import defaultdict

    from .imaging import atomic_directory

    destination = Path(destination) if destination is not None else cache_dir() / "sphere32"
    try:
        with zipfile.ZipFile(archive) as bundle:
            folders: dict[str, list[str]] = defaultdict(list)
            for name in bundle.namelist():
                if name.lower().endswith(".png") and not name.startswith("__MACOSX"):
                    folders[name.rsplit("/", 1)[0] if "/" in name else ""].append(name)
            named = [folder for folder, files in folders.items() if "sphere32" in folder.lower() and len(files) == 32]
            candidates = named or [folder for folder, files in folders.items() if len(files) == 32]
            if len(candidates) != 1:
                raise Dp360Error(
                    f"{archive} has no single folder of 32 camera images ({len(candidates)} candidates); "
                    "extract the sphere32 PNGs by hand into " + str(destination) + " or pass --cameras."
                )
            with atomic_directory(destination) as staging:
                for index, member in enumerate(sorted(folders[candidates[0]])):
                    (staging / f"{index:03d}.png").write_bytes(bundle.read(member))
    except zipfile.BadZipFile:
        raise Dp360Error(
            f"{archive} is not a zip archive; download it again with `dp360 weights download data`."
        ) from None
    return destination
