"""User-facing errors: each carries one sentence saying what is wrong and what to do.

The CLI prints the message of a `Dp360Error` without a traceback and exits non-zero; any other
exception is a bug and keeps its traceback.
"""

import errno
import os


class Dp360Error(Exception):
    """An error caused by the user's input or environment, with a message fit to print as is."""

    exit_code = 2


class InputImageError(Dp360Error):
    """The input image cannot be used (missing, unreadable, corrupt, too small, ...)."""


class NoFaceError(Dp360Error):
    """No face was found where one is needed."""


class DetectorUnavailableError(Dp360Error):
    """The requested face detector cannot run (missing weights or package)."""


class RunDirectoryError(Dp360Error):
    """The output folder cannot be used for a run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds like Ctrl-C: stages record
    that they were interrupted and temporaries are removed."""


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
    from pathlib import Path

    if not filename:
        return "the output"
    path = Path(str(filename))
    from .imaging import is_dp360_temporary

    return f"'{path.parent}'" if is_dp360_temporary(path.name) else f"'{path}'"
