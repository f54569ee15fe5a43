"""Where dp360's weight files come from, where they live, and how they are fetched on first use.

Cache root (`dp360.cache` names every location): `$DP360_CACHE`, else `$XDG_CACHE_HOME/dp360`,
else `~/.cache/dp360`:
- `bundles/{main,back}-{fp16,fp32}/`, `bundles/panohead/`: converted models (safetensors);
- `sphere32/`: the 32 camera images from the official inference data;
- `perceptual/`: torchvision's VGG16 weights (the PanoHead inversion's LPIPS backbone);
- `facexlib/`: RetinaFace weights (or `$DP360_FACEXLIB_DIR`, or `--detector-weights`);
- `downloads/`: raw files while they download (resumable `.partial` files) and until converted,
  and checkpoints kept with `--keep-checkpoints`.

`WEIGHT_FILES` lists every file; a stage lists the `Need`s it reads from the cache, and `ensure`
fetches and converts the missing ones before any stage runs. Downloads are off with
`HF_HUB_OFFLINE=1`, `DP360_OFFLINE=1` or `--no-download`; HF_ENDPOINT points at a hub mirror and
DP360_FILES_ENDPOINT at a mirror of the two files that are not on the hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .cache import (
    PERCEPTUAL_FILE,
    PERCEPTUAL_HOME,
    downloads_dir,
    facexlib_dir,
)
from .errors import DetectorUnavailableError, Dp360Error

RETINAFACE_FILES = {
    "resnet50": "detection_Resnet50_Final.pth",
    "mobile0.25": "detection_mobilenet0.25_Final.pth",
}
FACEXLIB_RELEASE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"


def offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "DP360_OFFLINE")
    )


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
    from .download import DownloadError, fetch, probe

    try:
        url = files_url(FACEXLIB_RELEASE_URL, file_name)
        return fetch(probe(url, file_name, hub=False), path, progress=False)
    except DownloadError as error:
        raise DetectorUnavailableError(f"RetinaFace weights could not be downloaded ({error}); {how}.") from None


# --------------------------------------------------------------------------------------------
# Every file the pipeline needs: where it comes from and what it becomes
# --------------------------------------------------------------------------------------------

OFFICIAL_REPO = "gym890/diffportrait360"
# Mirrors for the two files that are not on the hub serve them by file name under this address.
FILES_ENDPOINT_VARIABLE = "DP360_FILES_ENDPOINT"


@dataclass(frozen=True)
class WeightFile:
    """One downloadable file: the official hub files, and two from their projects' own pages."""

    name: str  # what `dp360 weights download NAME` calls it
    file_name: str
    what: str
    size_gb: float | None  # approximate download size (None: not published)
    home_url: str | None = None  # None: a file of OFFICIAL_REPO on the hub
    sha256_prefix: str | None = None  # a published hash (the hub's own files carry theirs)
    installed: bool = False  # converted or extracted into something else, then removed

    @property
    def hub(self) -> bool:
        return self.home_url is None

    def url(self) -> str:
        if self.hub:
            from .download import hub_file_url

            return hub_file_url(OFFICIAL_REPO, self.file_name)
        return files_url(self.home_url, self.file_name)


WEIGHT_FILES = {
    item.name: item
    for item in (
        WeightFile(
            "main",
            "model_state-340000.th",
            "360-view model: SD1.5 UNet + view-consistency modules + reference net + camera ControlNet + VAE + CLIP",
            10.8,
            installed=True,
        ),
        WeightFile("back", "back_head-230000.th", "back-view model F", 9.2, installed=True),
        WeightFile(
            "panohead",
            "easy-khair-180-gpc0.8-trans10-025000.pkl",
            "PanoHead generator (non-commercial licence)",
            0.563,
            installed=True,
        ),
        WeightFile(
            "data", "inference_data.zip", "inference data with the 32 'sphere32' camera images", 0.49, installed=True
        ),
        WeightFile(
            "perceptual",
            PERCEPTUAL_FILE,
            "torchvision VGG16 ImageNet weights: LPIPS backbone of the PanoHead inversion (BSD-3)",
            0.53,
            home_url=PERCEPTUAL_HOME,
            sha256_prefix="397923af",
        ),
        WeightFile(
            "retinaface",
            RETINAFACE_FILES["resnet50"],
            "RetinaFace face detector of facexlib (MIT)",
            0.11,
            home_url=FACEXLIB_RELEASE_URL,
        ),
    )
}
# name -> (file, approximate GB, what it is): the hub's files, and the others
OFFICIAL_FILES = {item.name: (item.file_name, item.size_gb, item.what) for item in WEIGHT_FILES.values() if item.hub}
EXTRA_FILES = {item.name: (item.file_name, item.size_gb, item.what) for item in WEIGHT_FILES.values() if not item.hub}


def files_url(home_url: str, file_name: str) -> str:
    mirror = os.environ.get(FILES_ENDPOINT_VARIABLE, "").strip()
    return f"{mirror.rstrip('/')}/{file_name}" if mirror else home_url + file_name


def cached_official(name: str, cache: str | None = None) -> Path | None:
    """The official file if it is on disk: kept in dp360's downloads, or in the Hugging Face cache
    (for example from `hf download`). Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    item = WEIGHT_FILES[name]
    kept = downloads_dir() / item.file_name
    if kept.is_file():
        return kept
    if not item.hub:
        return None
    found = try_to_load_from_cache(OFFICIAL_REPO, item.file_name, cache_dir=cache)
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class Installer:
    """How the owner of a file that is converted or extracted (a bundle, the PanoHead generator, the
    camera images) recognises its usable form at a place, and makes it from the raw file (checking
    what it writes). The owner supplies it with the `Need`s it lists: this module knows no format."""

    present: Callable[[Path], bool]  # target -> whether the usable form is there
    install: Callable[[Path, Path], None]  # (raw file, target)


@dataclass(frozen=True)
class Need:
    """A usable form of a weight file at a place: a converted bundle, the extracted camera images,
    the file itself. Stages list their needs; `ensure` fetches what is missing."""

    name: str  # a WEIGHT_FILES key
    target: Path
    fp16: bool = False  # main/back: a half-precision bundle
    optional: bool = False  # fetched when downloads are on; its stage copes without it otherwise
    # None: the file is used as downloaded (WeightFile.installed is False)
    installer: Installer | None = field(default=None, compare=False, repr=False)

    @property
    def file(self) -> WeightFile:
        return WEIGHT_FILES[self.name]

    def present(self) -> bool:
        target = Path(self.target)
        return self.installer.present(target) if self.installer is not None else target.is_file()

    def command(self) -> str:
        return f"dp360 weights download {self.name}" + (" --dtype fp16" if self.fp16 else "")

    def converted_gb(self, download_gb: float) -> float:
        """Disk the usable form takes beside the raw file while it is made."""
        if not self.file.installed:
            return 0.0
        return download_gb / 2 if self.fp16 else download_gb

    def install(self, raw: Path) -> None:
        """Make the usable form from the raw file (convert, extract), by its owner's installer."""
        if self.installer is None:
            raise Dp360Error(f"{self.name} is used as downloaded; there is nothing to install from {raw}.")
        self.installer.install(Path(raw), Path(self.target))


class MissingWeightsError(Dp360Error):
    """Weight files are missing and cannot be fetched now."""


def size_text(gb: float | None) -> str:
    return f"about {gb:.1f} GB" if gb else "size not published"


def describe_missing(needs: list[Need], sizes: dict[str, int] | None = None) -> str:
    """One line per missing file: name, file, size and the command that fetches it."""
    sizes = sizes or {}
    lines = []
    order = list(WEIGHT_FILES)
    for need in sorted(needs, key=lambda need: order.index(need.name)):
        size = sizes.get(need.name)
        gb = size / 1e9 if size else need.file.size_gb
        lines.append(f"  {need.name}: {need.file.file_name} ({size_text(gb)}) - run `{need.command()}`")
    return "\n".join(lines)


@dataclass
class FetchPlan:
    """The missing needs, and for each where its raw file comes from."""

    needs: list[Need]
    local: dict[str, Path]  # raw files already on disk (kept downloads, the Hugging Face cache)
    remote: dict[str, object]  # download.RemoteFile of the others
    partial: dict[str, int]  # bytes already downloaded towards them

    def disk_needed(self, keep_checkpoints: bool) -> int:
        """The most free disk the fetch takes at any moment: raw files are removed after their
        conversion (unless kept), so the peak is one raw file beside everything made so far."""
        used = peak = 0
        for need in self.needs:
            remote = self.remote.get(need.name)
            if need.name in self.local:
                raw = self.local[need.name].stat().st_size
                new = 0
            else:
                raw = getattr(remote, "size", None) or int((need.file.size_gb or 0) * 1e9)
                new = raw - self.partial.get(need.name, 0)
            converted = int(need.converted_gb(raw / 1e9) * 1e9)
            used += new
            peak = max(peak, used + converted)
            used += converted
            if need.file.installed and need.name not in self.local and not keep_checkpoints:
                used -= raw
        return peak


def download_gb(needs: list[Need]) -> float:
    """What fetching `needs` downloads, from the registry's sizes (the README's and doctor's figure)."""
    return sum(need.file.size_gb or 0.0 for need in needs)


def estimated_disk_needed(needs: list[Need], keep_checkpoints: bool = False) -> int:
    """`FetchPlan.disk_needed` of the missing needs without asking any server: raw files already on
    disk count as they are, the rest at the registry's sizes."""
    missing = [need for need in needs if not need.present()]
    local = {}
    for need in missing:
        raw = cached_official(need.name) if need.file.installed else None
        if raw is not None:
            local[need.name] = raw
    return FetchPlan(missing, local, {}, {}).disk_needed(keep_checkpoints)


def _disk_free(path: Path) -> tuple[Path, int]:
    import shutil

    probe = next(parent for parent in (path, *path.parents) if parent.exists())
    return probe, shutil.disk_usage(probe).free


def plan_fetch(needs: list[Need], cache: str | None = None) -> FetchPlan:
    """Which needs are missing and where their raw files come from; asks the servers for sizes
    and hashes (one request per file, no retries). Raises MissingWeightsError when a server
    cannot be reached, listing everything missing."""
    from .download import HubUnreachable, partial_bytes, probe

    unique: dict[tuple[str, str], Need] = {}
    for need in needs:
        unique.setdefault((need.name, str(need.target)), need)
    missing = [need for need in unique.values() if not need.present()]
    plan = FetchPlan(missing, {}, {}, {})
    unreachable: list[tuple[Need, str]] = []
    down: dict[str, str] = {}  # host -> why it did not answer
    for need in missing:
        raw = cached_official(need.name, cache) if need.file.installed else None
        if raw is not None:
            plan.local[need.name] = raw
            continue
        url = need.file.url()
        host = url.split("/")[2]
        if host in down:  # one timeout per server, not one per file
            unreachable.append((need, down[host]))
            continue
        try:
            remote = probe(url, need.file.file_name, need.file.hub)
        except HubUnreachable as error:
            down[host] = str(error)
            unreachable.append((need, str(error)))
            continue
        plan.remote[need.name] = remote
        plan.partial[need.name] = partial_bytes(_raw_destination(need), remote)
    required = [(need, reason) for need, reason in unreachable if not need.optional]
    if required:
        from .download import endpoint

        hosts = sorted({(endpoint() if need.file.hub else need.file.url()).split("/")[2] for need, _ in required})
        raise MissingWeightsError(
            f"Cannot reach {', '.join(hosts)} ({required[0][1]}), and these files are missing:\n"
            + describe_missing([need for need, _ in required])
            + "\nConnect to the internet (or set HF_ENDPOINT to a mirror) and rerun; the run stopped before any stage."
        )
    plan.needs = [need for need in missing if need.name in plan.local or need.name in plan.remote]
    return plan


def _raw_destination(need: Need) -> Path:
    return downloads_dir() / need.file.file_name if need.file.installed else Path(need.target)


def ensure(
    needs: list[Need],
    download: bool = True,
    keep_checkpoints: bool = False,
    progress: bool = True,
    note=lambda message: None,
    cache: str | None = None,
) -> list[str]:
    """Fetch and install every missing need, before any stage runs; returns the names fetched.
    With downloads off (`download=False`, HF_HUB_OFFLINE, DP360_OFFLINE) a missing need that is
    not optional is a MissingWeightsError listing all of them, with sizes and commands."""
    from .download import fetch

    missing = [need for need in needs if not need.present()]
    if not missing:
        return []
    if not download or offline():
        required = [need for need in missing if not need.optional]
        if required:
            why = "--no-download was given" if not download else "downloads are off (HF_HUB_OFFLINE / DP360_OFFLINE)"
            raise MissingWeightsError(
                f"These weight files are missing and {why}:\n"
                + describe_missing(required)
                + "\nRun those commands where there is internet (the same cache: DP360_CACHE, HF_HOME), or rerun "
                "without --no-download; the run stopped before any stage."
            )
        return []
    plan = plan_fetch(missing, cache)
    if not plan.needs:
        return []
    needed = plan.disk_needed(keep_checkpoints)
    where, free = _disk_free(downloads_dir())
    if free < needed:
        raise MissingWeightsError(
            f"The missing weights need {needed / 1e9:.1f} GB of free disk at {where}, but only {free / 1e9:.1f} GB "
            "are free; free some space, or set DP360_CACHE to a disk with room, and rerun:\n"
            + describe_missing(plan.needs, {name: getattr(remote, "size", 0) for name, remote in plan.remote.items()})
        )
    fetched = []
    for need in plan.needs:
        if need.name in plan.local:
            raw = plan.local[need.name]
            note(f"{need.name}: converting {raw}")
        else:
            remote = plan.remote[need.name]
            resumed = plan.partial.get(need.name, 0)
            note(
                f"{need.name}: downloading {need.file.file_name}"
                + (f" ({remote.size / 1e9:.2f} GB)" if remote.size else "")
                + (f", resuming after {resumed / 1e9:.2f} GB" if resumed else "")
            )
            raw = fetch(remote, _raw_destination(need), need.file.sha256_prefix, progress)
        if need.file.installed:
            need.install(raw)
            if need.name not in plan.local and not keep_checkpoints:
                raw.unlink(missing_ok=True)  # ours, and now converted and checked
        fetched.append(need.name)
    return fetched
