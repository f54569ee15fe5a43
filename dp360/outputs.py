"""Who may replace what: every single-file or frames-folder output of dp360 is checked here first.

The rule is that a command replaces only what it created. A file output may replace an existing
file of one of dp360's own output kinds, and only when asked to (`overwrite`); a frames folder
may replace a folder that holds nothing but dp360 frames, again only when asked to. Folders
holding anything else (a user's photos, a run folder) and files of other kinds are never
replaced, and nothing is replaced through (or in place of) a symbolic link, whatever the flags. A
converted weights folder may replace only a new or empty folder or dp360's own
bundle of the same kind, never the folder holding its source (`check_output_folder`). The checks
raise `Dp360Error` with one sentence naming the path and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import Dp360Error

# Suffixes of the files dp360 writes as single outputs (turntables and meshes).
OWN_FILE_SUFFIXES = (".mp4", ".gif", ".glb", ".obj", ".ply")
# The names `write_frames` gives to frames; a folder holding only these is a frames folder.
FRAME_NAME = re.compile(r"\d{4}\.png")


def _check_ancestors(path: Path) -> None:
    """The nearest existing ancestor must be a folder (it is where missing parents get created)."""
    for ancestor in path.parents:
        if os.path.lexists(ancestor):
            if not ancestor.is_dir():
                raise Dp360Error(
                    f"Cannot write '{path}' because '{ancestor}' is a file, not a folder; choose another --out."
                )
            return


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise Dp360Error(
            f"'{path}' is a symbolic link, which dp360 never writes through nor replaces; choose another --out."
        )


def check_file_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write a single output file at `path` where that would destroy something."""
    path = Path(path)
    _check_ancestors(path)
    _refuse_link(path)
    if os.path.lexists(path) and not path.is_file() and not path.is_dir():
        raise Dp360Error(
            f"'{path}' is a special file (a FIFO, socket or device), which dp360 never replaces; choose another --out."
        )
    if path.is_dir():
        raise Dp360Error(f"'{path}' is an existing folder, which dp360 never replaces; pass a file name as --out.")
    if os.path.lexists(path):
        if path.suffix.lower() not in OWN_FILE_SUFFIXES:
            raise Dp360Error(
                f"'{path}' already exists and is not of a kind dp360 writes ({', '.join(OWN_FILE_SUFFIXES)}); "
                "choose another --out."
            )
        if not overwrite:
            raise Dp360Error(f"'{path}' already exists; pass --overwrite to replace it, or choose another --out.")
    return path


def check_frames_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write a frames folder at `path` unless it is new, empty, or holds only dp360 frames."""
    path = Path(path)
    _check_ancestors(path)
    if path.name in ("", ".."):  # ".", "..", "/": folders the swap cannot rename
        raise Dp360Error(f"'{path}' cannot be replaced as a whole; name a new folder as --out.")
    _refuse_link(path)
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise Dp360Error(
            f"'{path}' is a file, not a folder; frames go into a new or empty folder, so choose another --out."
        )
    try:
        names = sorted(entry.name for entry in os.scandir(path))
    except OSError as error:
        raise Dp360Error(f"Cannot list '{path}' ({error.strerror}); choose another --out.") from None
    if "run.json" in names:
        raise Dp360Error(f"'{path}' is a dp360 run folder, which frames never replace; choose another --out.")
    foreign = [name for name in names if not (FRAME_NAME.fullmatch(name) and (path / name).is_file())]
    if foreign:
        raise Dp360Error(
            f"'{path}' holds files dp360 did not write (such as '{foreign[0]}'); "
            "frames go only into a new or empty folder, so choose another --out."
        )
    if names and not overwrite:
        raise Dp360Error(
            f"'{path}' already holds dp360 frames; pass --overwrite to replace them, or choose another --out."
        )
    return path


def check_output_folder(
    out_dir: str | Path, sources: Iterable[str | Path], refusal: Callable[[Path], str | None]
) -> Path:
    """The resolved `out_dir` if a converter may replace it as a whole: a new path, an empty folder,
    or a folder that `refusal` recognises as dp360's own output of the same kind (it returns None
    for those and otherwise says what the folder is). Never a file, a folder holding one of
    `sources`, or the current folder unless it is such an output. Call it before the slow work."""
    given = Path(out_dir).expanduser()
    out = given.resolve()
    shown = str(out) if given.name in ("", ".", "..") else str(given)

    def refuse(reason: str) -> Dp360Error:
        return Dp360Error(f"'{shown}' {reason}; choose a new or empty folder.")

    for source in sources:
        source = Path(source).expanduser()
        for candidate in {source.absolute(), source.resolve()}:
            if candidate == out:
                raise refuse("is the checkpoint being converted")
            if out in candidate.parents:
                raise refuse(
                    f"holds the checkpoint being converted ('{source}'), which replacing the folder would delete"
                )
    if not out.exists():
        parent = next(parent for parent in out.parents if parent.exists())
        if not parent.is_dir():
            raise refuse(f"cannot be created because '{parent}' is a file")
        return out
    if not out.is_dir():
        raise refuse("is a file, not a folder")
    try:
        empty = next(out.iterdir(), None) is None
        reason = None if empty else refusal(out)
    except OSError as error:
        raise refuse(f"cannot be read ({error.strerror or type(error).__name__})") from None
    if reason:
        raise refuse(reason)
    if empty and (out == Path.cwd() or out in Path.cwd().parents):
        raise refuse("is the current folder, which dp360 will not replace")
    return out


def check_suffix_matches(out: Path, chosen: str, by_suffix: dict[str, str]) -> None:
    """Refuse an --out whose suffix names another format than the one that would be written there
    (PLY bytes in `m.obj`)."""
    named = by_suffix.get(out.suffix.lower())
    if (named is not None and named != chosen) or (chosen == "frames" and out.suffix.lower() in by_suffix):
        raise Dp360Error(
            f"'{out.name}' names a .{named} file but --format is {chosen}; make the two agree "
            f"(or leave out --format to write what the name says)."
        )
