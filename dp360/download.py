"""Resumable, verified downloads over huggingface_hub's HTTP layer.

huggingface_hub's `hf_hub_download` writes to a process-unique temporary file and deletes it when
the download fails, so an interrupted 10 GB download starts again from nothing. dp360 keeps its own
partial file instead (`<name>.partial` beside the destination, with `<name>.partial.json` saying
which remote file it is a prefix of) and resumes it with an HTTP range request through
huggingface_hub's `get_hf_file_metadata` and `http_get`, which also follow the hub's redirects,
retry transient errors, send the user's token to the hub (never to other hosts) and honour
HF_ENDPOINT.

A finished file is checked before it takes its name: its size, and its hash against the hub's
(the LFS etag is the file's sha256; a git etag is its git blob sha1) or a published one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import Dp360Error

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
PROBE_TIMEOUT_S = 10.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class DownloadError(Dp360Error):
    """A file could not be fetched; the message names it and what to do."""


class HubUnreachable(DownloadError):
    """The server did not answer at all (offline, DNS, refused connection, timeout)."""


@dataclass(frozen=True)
class RemoteFile:
    """A file on a server, as its metadata request describes it."""

    url: str  # what was asked for (the hub's resolve URL, or a plain URL)
    file_name: str
    location: str  # where the bytes are served from (after the hub's redirect)
    etag: str | None
    size: int | None
    hub: bool  # the user's hub token goes only to the hub

    def identity(self) -> dict:
        """What a partial file must match to be resumed."""
        return {"url": self.url, "etag": self.etag, "size": self.size}


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT, read at call time (huggingface_hub reads it at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_file_url(repo: str, file_name: str, revision: str | None = None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, file_name, revision=revision, endpoint=endpoint())


# huggingface_hub's HTTP stack (httpx or its successor httpx2, with httpcore and h11 below)
_TRANSPORT_PACKAGES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "huggingface_hub", "ssl", "socket")


def _is_transport_error(error: BaseException) -> bool:
    """A network or HTTP failure (as opposed to a bug): offline, refused, reset, timed out, 5xx."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in _TRANSPORT_PACKAGES


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def probe(url: str, file_name: str, hub: bool, timeout: float = PROBE_TIMEOUT_S) -> RemoteFile:
    """One metadata request, without retries: an unreachable server is reported at once."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        metadata = get_hf_file_metadata(url, timeout=timeout, token=None if hub else False, retry_on_errors=False)
    except GatedRepoError:
        raise DownloadError(
            f"{file_name} is in a gated repository: accept its terms on the model page and log in "
            "(`hf auth login` or HF_TOKEN), then rerun."
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError):
        raise DownloadError(f"{url} does not exist (404); check HF_ENDPOINT / DP360_FILES_ENDPOINT.") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"{url} answered with an error ({_reason(error)}).") from None
    except Exception as error:
        if _is_transport_error(error):
            raise HubUnreachable(_reason(error)) from None
        raise
    return RemoteFile(url, file_name, metadata.location, metadata.etag, metadata.size, hub)


def partial_path(destination: Path) -> Path:
    return destination.with_name(destination.name + PARTIAL_SUFFIX)


def partial_bytes(destination: Path, remote: RemoteFile | None = None) -> int:
    """Bytes already downloaded towards `destination` (of `remote`, when given)."""
    partial = partial_path(destination)
    if not partial.is_file():
        return 0
    if remote is not None and _read_identity(destination) != remote.identity():
        return 0
    return partial.stat().st_size


def _identity_path(destination: Path) -> Path:
    return destination.with_name(destination.name + PARTIAL_SUFFIX + ".json")


def _read_identity(destination: Path) -> dict | None:
    try:
        return json.loads(_identity_path(destination).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _download_lock(destination: Path) -> Iterator[None]:
    """One process at a time appends to a partial file; a second one waits, then finds the file."""
    lock_path = destination.with_name(destination.name + ".lock")
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another dp360 process is downloading %s; waiting for it", destination.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm)
    digest.update(prefix)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def hash_problem(path: Path, etag: str | None, sha256_prefix: str | None = None) -> str | None:
    """Why `path` is not the file its server or its publisher describes, or None."""
    if sha256_prefix:
        found = file_digest(path, "sha256")
        if not found.startswith(sha256_prefix):
            return f"its sha256 is {found[:16]}..., the published one starts {sha256_prefix}"
    if etag and _SHA256.match(etag):  # an LFS file: the etag is its sha256
        found = file_digest(path, "sha256")
        if found != etag:
            return f"its sha256 is {found[:16]}..., the server's is {etag[:16]}..."
    elif etag and _GIT_SHA1.match(etag):  # a small git file: the etag is its git blob id
        found = file_digest(path, "sha1", f"blob {path.stat().st_size}\0".encode())
        if found != etag:
            return f"its git blob id is {found[:12]}..., the server's is {etag[:12]}..."
    return None


def fetch(remote: RemoteFile, destination: Path, sha256_prefix: str | None = None, progress: bool = True) -> Path:
    """Download `remote` to `destination`, resuming a partial file of the same remote file, and
    give it its name only once its size and hash check out."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial, identity_path = partial_path(destination), _identity_path(destination)
    with _download_lock(destination):
        if destination.is_file():  # another process finished it while we waited
            return destination
        resume = partial_bytes(destination, remote)
        if resume == 0 or (remote.size is not None and resume > remote.size):
            partial.unlink(missing_ok=True)
            resume = 0
        identity_path.write_text(json.dumps(remote.identity()))
        headers = build_hf_headers() if remote.hub else {"user-agent": "dp360"}
        headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a compressed stream
        bar = progress_bar_class(progress)
        with open(partial, "r+b" if resume else "wb") as handle:
            handle.seek(resume)
            try:
                http_get(
                    remote.location,
                    handle,
                    resume_size=resume,
                    headers=headers,
                    expected_size=remote.size,
                    displayed_filename=remote.file_name,
                    tqdm_class=bar,
                )
            except Exception as error:
                if _is_transport_error(error) or isinstance(error, ValueError):
                    kept = partial.stat().st_size if partial.exists() else 0
                    raise DownloadError(
                        f"The download of {remote.file_name} stopped ({_reason(error)}); {kept / 1e9:.2f} GB are "
                        "kept and the next run resumes from there."
                    ) from None
                raise
        size = partial.stat().st_size
        if remote.size is not None and size != remote.size:
            raise DownloadError(
                f"{remote.file_name} arrived with {size} bytes instead of {remote.size}; rerun to resume it."
            )
        problem = hash_problem(partial, remote.etag, sha256_prefix)
        if problem:
            partial.unlink()
            identity_path.unlink(missing_ok=True)
            raise DownloadError(
                f"The downloaded {remote.file_name} is not the published file ({problem}); it was deleted. "
                "Rerun to download it again; if this repeats, the server or a proxy is serving a damaged file."
            )
        os.replace(partial, destination)
        identity_path.unlink(missing_ok=True)
    return destination


# -- progress bars ---------------------------------------------------------------------------------


class _SilentBar:
    """What `http_get` expects of a progress bar, doing nothing (--quiet, --json)."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class RichBar(_SilentBar):
    """A rich progress bar on stderr in the shape of the tqdm object `http_get` drives."""

    def __init__(self, *args, total: int | None = None, initial: int = 0, desc: str = "", **kwargs):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task(desc, total=total, completed=initial)
        self._progress.start()

    def update(self, count: int = 1) -> None:
        self._progress.advance(self._task, count)

    def close(self) -> None:
        self._progress.stop()

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar_class(progress: bool) -> type:
    return RichBar if progress else _SilentBar
