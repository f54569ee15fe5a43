"""Several candidates side by side: one row each, written as markdown and CSV.

The table replaces only a table of its own: an existing `.md` must start with `MARKER` and an
existing `.csv` with the header line of `COLUMNS` (and `--overwrite` must be given); anything
else at those paths is refused before any work.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ..errors import Dp360Error

MARKER = "<!-- dp360 eval comparison -->"
# (column, where in a candidate's results it is read from)
COLUMNS = (
    ("candidate", ("candidate",)),
    ("front_psnr", ("truth", "summary", "front", "psnr")),
    ("front_ssim", ("truth", "summary", "front", "ssim")),
    ("front_lpips", ("truth", "summary", "front", "lpips")),
    ("front_csim", ("truth", "summary", "front", "csim")),
    ("front_fid", ("truth", "summary", "front", "fid")),
    ("front_frames", ("truth", "summary", "front", "frames")),
    ("back_psnr", ("truth", "summary", "back", "psnr")),
    ("back_ssim", ("truth", "summary", "back", "ssim")),
    ("back_lpips", ("truth", "summary", "back", "lpips")),
    ("back_fid", ("truth", "summary", "back", "fid")),
    ("back_frames", ("truth", "summary", "back", "frames")),
    ("consistency_psnr", ("consistency", "summary", "psnr")),
    ("consistency_lpips", ("consistency", "summary", "lpips")),
    ("consistency_csim", ("consistency", "summary", "csim")),
    ("path", ("path",)),
)
HEADER = ",".join(name for name, _ in COLUMNS)


def _lookup(result: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per candidate's results ({candidate, path, truth, consistency})."""
    return [{name: _lookup(result, keys) for name, keys in COLUMNS} for result in results]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown(results: list[dict[str, Any]], truth: str | None) -> str:
    table = rows(results)
    names = [name for name, _ in COLUMNS]
    lines = [MARKER, ""]
    if truth:
        lines += [f"Truth: `{truth}`. Front: |yaw| <= 90 degrees; CSIM on front frames only; n/a: not computed.", ""]
    else:
        lines += ["No truth capture: consistency scores only (n/a: not computed).", ""]
    lines.append("| " + " | ".join(names) + " |")
    lines.append("|" + "---|" * len(names))
    lines += ["| " + " | ".join(_cell(row[name]) for name in names) + " |" for row in table]
    return "\n".join(lines) + "\n"


def csv_text(results: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in COLUMNS])
    for row in rows(results):
        writer.writerow(["" if row[name] is None else row[name] for name, _ in COLUMNS])
    return buffer.getvalue()


def table_paths(out: str | Path) -> tuple[Path, Path]:
    """(markdown, csv) for `--table`: NAME.md and NAME.csv (a name without .md gets both suffixes)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".md", ".csv") else out
    return stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")


def _ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline().rstrip("\n")
    except OSError:
        return False
    return first == (MARKER if path.suffix == ".md" else HEADER)


def check_table_target(out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Refuse, before any work, a --table whose files would replace something not ours."""
    paths = table_paths(out)
    for path in paths:
        parent = next((p for p in path.parents if os.path.lexists(p)), None)
        if parent is not None and not parent.is_dir():
            raise Dp360Error(f"Cannot write '{path}' because '{parent}' is a file; choose another --table.")
        if path.is_dir():
            raise Dp360Error(f"'{path}' is a folder, which dp360 never replaces; choose another --table.")
        if os.path.lexists(path):
            if path.is_symlink() or not _ours(path):
                raise Dp360Error(f"'{path}' exists and is not a dp360 comparison table; choose another --table.")
            if not overwrite:
                raise Dp360Error(f"'{path}' already exists; pass --overwrite to replace it, or choose another --table.")
    return paths


def write_table(out: str | Path, results: list[dict[str, Any]], truth: str | None, overwrite: bool = False):
    from ..atomic import write_bytes_atomic

    md_path, csv_path = check_table_target(out, overwrite)
    write_bytes_atomic(md_path, markdown(results, truth).encode("utf-8"))
    write_bytes_atomic(csv_path, csv_text(results).encode("utf-8"))
    return md_path, csv_path
