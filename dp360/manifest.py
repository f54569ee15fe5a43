"""A run folder's own record: `run.json` (what marks a folder as a run dp360 made), its lock, and
the link checks of every path dp360 writes, removes or locks there.

The bottom layer: it knows no stage. `dp360.run` (the runner), the report, eval and batch read runs
through it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from . import __version__, layout
from .errors import RunDirectoryError
from .safety import read_plain_file

MANIFEST_NAME = layout.MANIFEST
INPUT_IMAGE = layout.INPUT  # the portrait of a portrait run, as decoded
RUN_FORMAT = "dp360-run"  # run.json's `format`: what marks a folder as a run dp360 made
MANIFEST_FORMAT = 2  # run.json's `format_version` (1: before runs were marked; not taken for a run)
MAX_MANIFEST_BYTES = 64 << 20  # a run.json is a few kB; far larger is not one of ours
LOCK_NAME = layout.LOCK


# -- links ---------------------------------------------------------------------------------------


def check_no_links(run_dir: str | Path, folders: Any = (), files: Any = ()) -> None:
    """Refuse, with one sentence, when a path dp360 writes, removes or locks inside `run_dir` (each
    of `folders` and `files`, relative to it, and every folder on the way there) is a symbolic link
    or resolves outside the run folder; also when one of `folders` is not a folder, or one of
    `files` not a plain file. Missing paths pass. The run folder itself may be a link (the user
    named it); `--force` and `--overwrite` never change this."""
    run_dir = Path(run_dir)
    root = run_dir.resolve()
    advice = "nothing is ever written through a link, so remove it (or choose another run folder)."
    for relative, want_folder in (*((f, True) for f in folders), *((f, False) for f in files)):
        current = run_dir
        for part in Path(relative).parts:
            current = current / part
            if current.is_symlink():
                raise RunDirectoryError(f"'{current}' inside the run folder is a symbolic link; {advice}")
            if not os.path.lexists(current):
                break
        else:
            if not current.resolve().is_relative_to(root):
                raise RunDirectoryError(f"'{current}' resolves outside the run folder '{run_dir}'; {advice}")
            mode = os.lstat(current).st_mode
            if want_folder and not stat.S_ISDIR(mode):
                raise RunDirectoryError(
                    f"'{current}' is not a folder, so it is not dp360's '{relative}' folder; move it out of the run "
                    "folder, or choose another run folder."
                )
            if not want_folder and not stat.S_ISREG(mode):
                raise RunDirectoryError(
                    f"'{current}' is not a plain file (it is a folder or a special file), so it is not dp360's; "
                    "move it out of the run folder, or choose another run folder."
                )


# -- the lock ------------------------------------------------------------------------------------

# O_NOFOLLOW: a symbolic link planted as the lock is refused, never opened (and truncated) through.
LOCK_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
# How long a lock seen taken is tried again before the refusal: `check_free` holds it for an instant.
LOCK_RETRY_SECONDS = 0.5


class RunLock:
    """An exclusive `flock` on `<run>/.dp360.lock`, held for the whole run.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a dead
    run is simply taken over (its pid, written into the file, is reported). Hand-written rather
    than `filelock` because the file must be checked to be the one still linked in the folder
    (a failing first run removes it), must carry the holder's pid for the refusal message, and is
    never opened through a symbolic link nor when it is not a plain file of its own (a hard link
    to a user's file would be truncated)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.previous_pid: int | None = None  # the pid of a dead run whose lock was taken over

    def _not_a_lock(self) -> RunDirectoryError:
        return RunDirectoryError(
            f"'{self.path}' is not dp360's lock file (it is a link or a special file); dp360 never writes through "
            "one, so remove it, or choose another run folder."
        )

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):  # a link (O_NOFOLLOW), a socket
                raise self._not_a_lock() from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise self._not_a_lock()
        return fd

    def _flock(self, fd: int) -> bool:
        """Take the exclusive lock on `fd`, trying again for a moment; False when it stays taken."""
        import fcntl

        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def acquire(self) -> None:
        while True:
            fd = self._open(LOCK_OPEN_FLAGS)
            if not self._flock(fd):
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise self._taken(holder)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder before us removed the file: lock the one now in its place
        previous = os.read(fd, 64).decode(errors="replace").strip()
        self.previous_pid = int(previous) if previous.isdigit() and int(previous) != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _taken(self, holder: str) -> RunDirectoryError:
        return RunDirectoryError(
            f"Another dp360 run (pid {holder}) is writing to '{self.path.parent}'; wait for it to finish "
            "or choose another --out folder."
        )

    def check_free(self) -> None:
        """Refuse, as `acquire` would, when a live run holds the lock (or the lock is a link); takes
        nothing, creates nothing."""
        try:
            fd = self._open(LOCK_OPEN_FLAGS & ~(os.O_CREAT | os.O_RDWR) | os.O_RDONLY)  # never creates it
        except FileNotFoundError:
            return
        try:
            if not self._flock(fd):
                raise self._taken(os.read(fd, 64).decode(errors="replace").strip() or "?")
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# -- the manifest --------------------------------------------------------------------------------


def not_dp360s(folder: Path, manifest: Any) -> str | None:
    """The sentence that refuses `folder` when its run.json (`manifest`, parsed) lacks the fields
    that only dp360 writes; None when they are there."""
    if isinstance(manifest, dict) and manifest.get("format") == RUN_FORMAT:
        run_id = manifest.get("run_id")
        version = manifest.get("format_version")
        if isinstance(run_id, str) and len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id):
            if (
                isinstance(version, int)
                and not isinstance(version, bool)
                and isinstance(manifest.get("dp360_version"), str)
            ):
                if version > MANIFEST_FORMAT:
                    return (
                        f"'{folder}' holds a run of a newer dp360 (run.json format {version}), which this version "
                        f"({__version__}) does not change; upgrade dp360, or choose another folder."
                    )
                return None
    if isinstance(manifest, dict) and manifest.get("format") == 1 and isinstance(manifest.get("dp360_version"), str):
        return (
            f"'{folder}' holds the run.json of an earlier dp360 that did not mark its runs as its own, so dp360 changes "
            "nothing in it; choose another --out folder to start the run again (and delete the old one yourself)."
        )
    return (
        f"'{folder}' holds a run.json that dp360 did not write (it lacks dp360's run id), so dp360 takes the "
        "folder for yours and changes nothing in it, whatever the flags; choose another --out folder."
    )


def run_identity(run_id: str | None = None) -> dict[str, Any]:
    """The fields that mark a run.json as dp360's (a new run id unless one is given)."""
    return {
        "format": RUN_FORMAT,
        "format_version": MANIFEST_FORMAT,
        "dp360_version": __version__,
        "run_id": run_id or uuid.uuid4().hex,
    }


def new_manifest() -> dict[str, Any]:
    """The run.json of a run with no stage yet (a run folder assembled by hand, in tests)."""
    return {**run_identity(), "stages": {}}


def read_manifest(path: Path) -> dict[str, Any]:
    """A run.json that dp360 wrote, of the expected shape, or a RunDirectoryError that says what to
    do. A damaged or foreign run.json is refused whatever the flags: without dp360's own record
    nothing in the folder can be shown to be dp360's to replace."""
    path = Path(path)
    damaged = RunDirectoryError(
        f"'{path}' is damaged, so dp360 cannot tell which files in '{path.parent}' are its own and changes none "
        "of them, whatever the flags; choose another --out folder, or move out what you want to keep and delete "
        "the folder."
    )
    try:
        manifest = json.loads(read_plain_file(path, MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise damaged from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunDirectoryError(
                f"'{path}' is a symbolic link; dp360 never reads or writes its record through one, so remove it "
                "(or choose another run folder)."
            ) from None
        raise RunDirectoryError(f"'{path}' cannot be read ({error.strerror}); check its permissions.") from None
    refusal = not_dp360s(path.parent, manifest)
    if refusal:
        raise RunDirectoryError(refusal)
    if not isinstance(manifest.get("stages"), dict):
        raise damaged
    if not isinstance(manifest.get("input", {}), dict):
        raise damaged
    notes = manifest.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise damaged
    for record in manifest["stages"].values():
        if not isinstance(record, dict) or not isinstance(record.get("outputs", {}), dict):
            raise damaged
        for rel, size in record.get("outputs", {}).items():
            if isinstance(size, bool) or not isinstance(size, int):
                raise damaged
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                raise damaged
    return manifest
