"""User-facing errors: each carries one sentence saying what is wrong and what to do.

The CLI prints the message of a `Dp360Error` without a traceback and exits non-zero; any other
exception is a bug and keeps its traceback.
"""


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
