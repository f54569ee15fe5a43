"""Files dp360 writes: atomically (a temporary name in the destination's folder, then a rename),
never through a link planted on the way, and the temporaries a killed process leaves; hashing;
and the one sentence for a write a user's setup makes fail (no space, no permission, ...).

The bottom layer: it knows no stage and no subsystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import Dp360Error, RunDirectoryError


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask. /proc tells it without changing it; elsewhere os.umask, which can only
    read it by setting it, sets it back at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool = False) -> None:
    """mkstemp makes files 0600 and mkdtemp folders 0700 whatever the umask; give what we publish
    the mode an ordinary open() or mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `destination`; rename it into place only on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.stem}.", suffix=f".tmp{destination.suffix}", dir=destination.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        _follow_umask(temporary_path)
        os.replace(temporary_path, destination)
    except OSError as error:
        if error.filename is None:  # writers (Pillow, json) rarely say which file failed
            error.filename = str(destination)
        raise
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def write_bytes_atomic(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(destination: str | os.PathLike, payload: Any) -> None:
    write_bytes_atomic(destination, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, guard: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to `destination`; on success it replaces `destination`
    as a whole, so readers see either the old complete folder or the new complete one. `guard`,
    when given, is called just before the swap (a check that may refuse it)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield staging
        if guard is not None:
            guard()
        _follow_umask(staging, directory=True)
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# Opening a folder by a name inside another never follows a link there: the moves and removals
# below go through folder descriptors opened this way, so a link planted (or swapped in) on the
# way cannot redirect them to a user's folder.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_LINK_ADVICE = "nothing is ever written or removed through a link, so remove it (or choose another folder)"


def open_folder_inside(name: str, parent_fd: int, shown: Path) -> int:
    """A descriptor of the folder `name` inside the folder `parent_fd`; a link or a non-folder
    there is refused with one sentence naming `shown`."""
    try:
        return os.open(name, _FOLDER_FLAGS, dir_fd=parent_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RunDirectoryError(f"'{shown}' is a symbolic link or not a folder; {_LINK_ADVICE}.") from None
        raise


def _open_root(folder: Path) -> int:
    """The folder the user named (which may itself be a link: the user chose it)."""
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def _lstat_at(name: str, folder_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _parent_of(root: str | os.PathLike, relative: str | os.PathLike) -> Iterator[tuple[int, str, Path]]:
    """(descriptor of the folder holding `relative` inside `root`, its last name, its shown path),
    reached one folder at a time without following links."""
    root = Path(root)
    parts = Path(relative).parts
    if not parts or any(part in ("", ".", "..") for part in parts) or Path(relative).is_absolute():
        raise ValueError(f"not a plain relative path: {relative!r}")
    fd = _open_root(root)
    shown = root
    try:
        for part in parts[:-1]:
            shown = shown / part
            child = open_folder_inside(part, fd, shown)
            os.close(fd)
            fd = child
        yield fd, parts[-1], shown / parts[-1]
    finally:
        os.close(fd)


def remove_file_inside(root: str | os.PathLike, relative: str | os.PathLike) -> bool:
    """Remove the plain file `relative` inside `root` (never through a link on the way, never a
    link or folder in its place); whether one was removed. A missing path is not an error."""
    try:
        with _parent_of(root, relative) as (fd, name, _shown):
            found = _lstat_at(name, fd)
            if found is None or not stat.S_ISREG(found.st_mode):
                return False
            os.unlink(name, dir_fd=fd)
            return True
    except FileNotFoundError:
        return False


def remove_empty_folder_inside(root: str | os.PathLike, relative: str | os.PathLike) -> bool:
    """Remove the folder `relative` inside `root` when it is empty (a link is never removed, nor
    followed on the way); whether it was removed."""
    try:
        with _parent_of(root, relative) as (fd, name, _shown):
            found = _lstat_at(name, fd)
            if found is None or not stat.S_ISDIR(found.st_mode):
                return False
            os.rmdir(name, dir_fd=fd)
            return True
    except OSError:  # missing, not empty, or refused: left where it is
        return False


def _move_entries(staging_fd: int, destination_fd: int, shown: Path) -> None:
    """Move everything in the folder `staging_fd` into the folder `destination_fd`, merging
    subfolders; a link in the destination where a folder goes is refused, never followed."""
    for entry in sorted(os.scandir(staging_fd), key=lambda each: each.name):
        name = entry.name
        existing = _lstat_at(name, destination_fd)
        if entry.is_dir(follow_symlinks=False):
            if existing is not None and stat.S_ISLNK(existing.st_mode):
                raise RunDirectoryError(f"'{shown / name}' is a symbolic link; {_LINK_ADVICE}.")
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(name, dir_fd=destination_fd)  # an earlier output of ours, now a folder
                existing = None
            if existing is None:
                os.mkdir(name, dir_fd=destination_fd)  # the umask's mode, as mkdir gives
            inner_destination = open_folder_inside(name, destination_fd, shown / name)
            try:
                inner_staging = os.open(name, _FOLDER_FLAGS, dir_fd=staging_fd)
                try:
                    _move_entries(inner_staging, inner_destination, shown / name)
                finally:
                    os.close(inner_staging)
            finally:
                os.close(inner_destination)
        else:
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                shutil.rmtree(name, dir_fd=destination_fd)  # fd-based: never follows a link inside
            # a rename replaces a link in its place; it never writes through it
            os.replace(name, name, src_dir_fd=staging_fd, dst_dir_fd=destination_fd)


@contextlib.contextmanager
def atomic_files_into(destination: str | os.PathLike, guard: Callable[[], None] | None = None) -> Iterator[Path]:
    """For a folder several stages share: yield an empty staging folder; on success move each
    of its files into `destination` (each rename atomic), leaving other files there alone.
    The moves go through folder descriptors: `destination` or any folder inside it that is a
    link is refused (RunDirectoryError), never written through. (Only the staging folder itself
    is mkdtemp's; the files and folders moved out of it have the umask's modes already.)
    `guard`, when given, is called just before the files move."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield staging
        if guard is not None:
            guard()
        parent_fd = _open_root(destination.parent)
        try:
            destination_fd = open_folder_inside(destination.name, parent_fd, destination)
            try:
                staging_fd = os.open(staging.name, _FOLDER_FLAGS, dir_fd=parent_fd)
                try:
                    _move_entries(staging_fd, destination_fd, destination)
                finally:
                    os.close(staging_fd)
            finally:
                os.close(destination_fd)
        finally:
            os.close(parent_fd)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# The names the helpers above give their temporaries: a hidden name, tempfile's eight random
# characters, then .tmp (with the destination's suffix) or .old. Nothing else is ever matched.
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.(?:tmp(?:\.[^.]+)?|(?P<old>old))")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed processes left of the atomic helpers' temporaries in `folder` and its
    immediate subfolders; return what was removed. Call it only while no other process can be
    writing there (the run's lock held): a live writer's temporaries look the same.

    A process killed inside `atomic_directory`'s swap leaves the only copy of the old folder in
    `.NAME.XXXXXXXX.old/NAME`; it is put back first when NAME is missing."""
    removed: list[Path] = []

    def sweep(where_fd: int, shown: Path, descend: bool) -> None:
        try:
            entries = sorted(os.scandir(where_fd), key=lambda each: each.name)
        except OSError:  # unreadable: nothing of ours to remove
            return
        for entry in entries:
            real_dir = entry.is_dir(follow_symlinks=False)
            match = _TEMPORARY_NAME.fullmatch(entry.name)
            if match is None:
                if real_dir and descend:
                    with contextlib.suppress(OSError):
                        inner = os.open(entry.name, _FOLDER_FLAGS, dir_fd=where_fd)
                        try:
                            sweep(inner, shown / entry.name, descend=False)
                        finally:
                            os.close(inner)
                continue
            with contextlib.suppress(OSError):  # one that cannot go is left; the run goes on
                if match["old"] and real_dir:
                    name = match["name"]
                    old_fd = os.open(entry.name, _FOLDER_FLAGS, dir_fd=where_fd)
                    try:
                        if _lstat_at(name, old_fd) is not None and _lstat_at(name, where_fd) is None:
                            os.replace(name, name, src_dir_fd=old_fd, dst_dir_fd=where_fd)
                    finally:
                        os.close(old_fd)
                if real_dir:
                    shutil.rmtree(entry.name, dir_fd=where_fd, ignore_errors=True)  # fd-based: follows no link
                else:
                    os.unlink(entry.name, dir_fd=where_fd)
                removed.append(shown / entry.name)

    try:
        root_fd = _open_root(Path(folder))
    except OSError:  # missing or unreadable: nothing of ours to remove
        return removed
    try:
        sweep(root_fd, Path(folder), descend=True)
    finally:
        os.close(root_fd)
    return removed


def is_dp360_temporary(name: str) -> bool:
    """Whether a file or folder name is one the atomic helpers above give their temporaries."""
    return _TEMPORARY_NAME.fullmatch(name) is not None


# errno -> what to do, for the filesystem errors a user's setup causes.
_FILESYSTEM_ADVICE = {
    errno.ENOSPC: "free some disk space, or write elsewhere (--out for runs, DP360_CACHE for weights)",
    errno.EDQUOT: "free some space within your disk quota, or write elsewhere (--out for runs, DP360_CACHE for weights)",
    errno.EFBIG: "the file size limit (ulimit -f) is too low for it; raise the limit",
    errno.EACCES: "check the permissions, or write elsewhere (--out for runs, DP360_CACHE for weights)",
    errno.EPERM: "check the permissions, or write elsewhere (--out for runs, DP360_CACHE for weights)",
    errno.EROFS: "the file system is read-only; write elsewhere (--out for runs, DP360_CACHE for weights)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "a folder is in the way; choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many files are open; raise the limit (ulimit -n)",
    errno.ENOLCK: "the file system does not support the run's lock; choose a folder on a local disk",
}


def filesystem_error(error: BaseException) -> Dp360Error | None:
    """One sentence for an OSError a user's setup causes (no space, no permission, a file in
    the way ...), found in `error` or in the exceptions it was raised from; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FILESYSTEM_ADVICE:
            return Dp360Error(
                f"Cannot write to {_where(error.filename)}: {os.strerror(error.errno).lower()}; "
                f"{_FILESYSTEM_ADVICE[error.errno]}."
            )
        error = error.__cause__ or error.__context__
    return None


def _where(filename) -> str:
    """The path to name in a message: a temporary's folder rather than its random name."""
    if not filename:
        return "the output"
    path = Path(str(filename))
    return f"'{path.parent}'" if is_dp360_temporary(path.name) else f"'{path}'"
