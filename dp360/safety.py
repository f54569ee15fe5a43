"""Reading weight and config files that dp360 did not write in this process.

Every reader here turns a damaged or hostile file into one `Dp360Error` sentence that names the
file: configs are read with a size cap and their sizes bounded *before* a module is built (a
config asking for 10^9 layers would otherwise hang construction), safetensors headers are
validated without reading the data, and pickles go through `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import Dp360Error

# Real configs are a few kB; anything this large is not one (and would be slow to parse).
MAX_CONFIG_BYTES = 1 << 20
# Lists of per-block values (block_out_channels, ...): SD1.5 has 4 blocks.
MAX_LIST_ITEMS = 8

Bounds = Mapping[str, tuple[float, float]]


class ConfigError(Dp360Error, ValueError):
    """A configuration value is missing, of the wrong type or out of dp360's bounds."""


def one_line(text: object, limit: int = 200) -> str:
    """The first line of a library's error text, shortened, for use inside our own sentence."""
    lines = str(text).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _shown(value: Any) -> str:
    return one_line(repr(value), 60)


def read_json_object(path: str | Path, advice: str) -> dict[str, Any]:
    """The JSON object in `path`; anything else (missing, huge, not JSON, a list) is an error."""
    path = Path(path)
    # ConfigError is a ValueError: the size checks stay outside the `except ValueError` below, which
    # would otherwise report a missing or oversized file as "not valid JSON".
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as error:
        raise ConfigError(f"'{path}' cannot be read ({error.strerror or type(error).__name__}); {advice}.") from None
    if size is None:
        what = "is not a regular file" if path.exists() else "is missing"
        raise ConfigError(f"'{path}' {what}; {advice}.")
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"'{path}' is too large ({size / 2**20:.1f} MB, more than dp360's limit of "
            f"{MAX_CONFIG_BYTES >> 20} MB for a config file); {advice}."
        )
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"'{path}' cannot be read ({error.strerror or type(error).__name__}); {advice}.") from None
    except (ValueError, RecursionError):  # undecodable, not JSON, or nested beyond the parser's depth
        raise ConfigError(f"'{path}' is not valid JSON; {advice}.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"'{path}' holds a JSON {type(value).__name__}, not an object; {advice}.")
    return value


def _items(value: Any) -> list[Any] | None:
    """A scalar as [value], a list of scalars or of short lists flattened; None when too long."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if len(value) > MAX_LIST_ITEMS:
        return None
    flat = []
    for item in value:
        if isinstance(item, (list, tuple)):  # per-block lists of per-layer values
            if len(item) > MAX_LIST_ITEMS:
                return None
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def check_bounds(
    config: Mapping[str, Any], bounds: Bounds, source: str, advice: str, nullable: Iterable[str] | None = None
) -> None:
    """Refuse values of `config` outside `bounds` (key -> (low, high); int bounds demand whole
    numbers, float bounds any finite number). Absent keys are left to the defaults; null is
    accepted for the keys in `nullable` (all of them when None: diffusers' "off")."""
    for key, (low, high) in bounds.items():
        if key not in config or (config[key] is None and (nullable is None or key in nullable)):
            continue
        value = config[key]
        items = _items(value)
        if items is None:
            raise ConfigError(
                f"{source} sets {key} to a list of {len(value)} items, more than dp360's limit of {MAX_LIST_ITEMS}; {advice}."
            )
        whole = isinstance(low, int) and isinstance(high, int)
        for item in items:
            ok = (
                not isinstance(item, bool)
                and isinstance(item, int if whole else (int, float))
                and math.isfinite(item)
                and low <= item <= high
            )
            if not ok:
                kind = "a whole number" if whole else "a number"
                raise ConfigError(
                    f"{source} sets {key} to {_shown(value)}, but dp360 accepts {kind} from {low} to {high} there; {advice}."
                )


def safetensors_header(path: str | Path, advice: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of a safetensors file, validated (offsets, sizes, header length)
    by the safetensors library without reading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise Dp360Error(f"'{path}' is missing; {advice}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                for name in handle.keys()
            }
    except Exception as error:  # noqa: BLE001 - SafetensorError and OSError alike mean an unusable file
        reason = one_line(error).removeprefix("Error while deserializing header: ")
        raise Dp360Error(
            f"'{path}' is not a valid safetensors file ({reason or type(error).__name__}); {advice}."
        ) from None


def shape_problems(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], optional: Iterable[str] = ()
) -> str | None:
    """'missing: ...; unexpected: ...; wrong shape: ...' (a few of each), or None when they match."""
    optional = set(optional)
    missing = [key for key in expected if key not in found and key not in optional]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key} {tuple(found[key])} != {tuple(expected[key])}"
        for key in expected
        if key in found and tuple(found[key]) != tuple(expected[key])
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    return "; ".join(problems) or None


def check_zip_sizes(path: str | Path, advice: str) -> None:
    """Refuse, before torch or any pickle reader opens it, a zip archive whose members declare more
    bytes than the archive holds: PyTorch stores its members uncompressed, so a member that would
    expand (a zip bomb: a few MB declaring gigabytes) is not one of its files."""
    path = Path(path)
    try:
        on_disk = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError) as error:
        raise Dp360Error(
            f"'{path}' is not a readable zip archive ({one_line(error) or type(error).__name__}); {advice}."
        ) from None
    declared = 0
    for member in members:
        declared += member.file_size
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size or declared > on_disk:
            raise Dp360Error(
                f"'{path}' holds a zip member ('{one_line(member.filename, 60)}') that is compressed or larger "
                f"than the file itself ({declared / 2**20:.0f} MB declared in {on_disk / 2**20:.0f} MB), which "
                f"PyTorch never writes, so dp360 refuses to load it; {advice}."
            )


def load_tensors(path: str | Path, advice: str, safe_globals: Sequence[Any] = ()) -> Any:
    """`torch.load(weights_only=True)` (memory-mapped when the file is a zip archive), with our
    own sentence instead of torch's, which invites retrying with weights_only=False."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise Dp360Error(f"'{path}' is missing; {advice}.")
    damaged = f"'{path}' cannot be read as PyTorch weights (it is truncated, damaged or in another format); {advice}."
    if zipfile.is_zipfile(path):
        check_zip_sizes(path, advice)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        # torch refuses both a forbidden global (code, non-tensor objects) and plain garbage with
        # this error; its text (which we never show: it advises weights_only=False) tells which.
        what = (
            "contains pickled code or objects that are not plain tensors"
            if "global" in str(error).lower()
            else "is damaged or contains pickled data that is not plain tensors"
        )
        raise Dp360Error(f"'{path}' {what}, so dp360 refuses to load it; {advice}.") from None
    except Exception:  # noqa: BLE001 - includes RecursionError and MemoryError; never KeyboardInterrupt
        raise Dp360Error(damaged) from None


def read_plain_file(path: Path, limit: int) -> bytes:
    """The bytes of `path`, never through a link, a FIFO or a device, and at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise ValueError("not a plain file of a manifest's size")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)
