"""The commands that set a machine up: `weights download|list|verify|convert` and `doctor`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.console import (
    INTERRUPTED_DOWNLOAD,
    INTERRUPTED_NOTHING_CHANGED,
    INTERRUPTED_NOTHING_WRITTEN,
    Command,
    Group,
    err_console,
    user_errors,
)
from cli.options import (
    CheckpointKind,
    DType,
    Family,
    JsonOption,
    KeepCheckpointsOption,
    QuietNoJsonOption,
    WeightName,
)
from dp360 import cache
from dp360.diffusion.models.configs import FAMILIES

weights_app = typer.Typer(
    cls=Group, help="Download, list, verify and convert the official DiffPortrait360 weights.", no_args_is_help=True
)
WhatArgument = Annotated[
    Optional[list[WeightName]], typer.Argument(help="Which files (default: all).", show_default=False)
]
KindArgument = Annotated[CheckpointKind, typer.Argument(help="Which official checkpoint.", show_default=False)]
CacheDirOption = Annotated[
    Optional[str],
    typer.Option("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's).", show_default=False),
]


def _console_note(message: str) -> None:
    err_console.print(message, soft_wrap=True, markup=False)


def _quiet_note(message: str) -> None:
    pass


@weights_app.command("download", cls=Command)
def weights_download(
    what: WhatArgument = None,
    dtype: Annotated[
        DType,
        typer.Option(
            help="Precision of the converted DiffPortrait360 bundles (auto: fp16 where CUDA is, as runs use there)."
        ),
    ] = DType.auto,
    keep_checkpoints: KeepCheckpointsOption = False,
    cache_dir: CacheDirOption = None,
    quiet: QuietNoJsonOption = False,
) -> None:
    """Fetch what runs need ahead of time, as `reconstruct` does on first use: download (resumable,
    hash-checked), convert the checkpoints into safetensors bundles, extract the camera images."""
    from dp360 import weights
    from dp360.pipeline.registry import default_needs
    from dp360.runtime import resolve_device

    with user_errors(INTERRUPTED_DOWNLOAD):
        names = [name.value for name in what] if what else [name.value for name in WeightName]
        fp16 = dtype in (DType.fp16, DType.bf16) or (dtype is DType.auto and resolve_device("auto").startswith("cuda"))
        needs = [need for need in default_needs(fp16=fp16) if need.name in names]
        present = [need for need in needs if need.present()]
        for need in present:
            if not quiet:
                err_console.print(f"[green]✓[/] {need.name}: present at {need.target}", soft_wrap=True)
        fetched = weights.ensure(
            needs,
            keep_checkpoints=keep_checkpoints,
            progress=not quiet,
            note=_quiet_note if quiet else _console_note,
            cache=cache_dir,
        )
        for need in needs:
            if need.name in fetched and not quiet:
                err_console.print(f"[green]✓[/] {need.name}: {need.target}", soft_wrap=True)


@weights_app.command("list", cls=Command)
def weights_list(cache_dir: CacheDirOption = None, json_output: JsonOption = False) -> None:
    """Show, for every weight file, whether runs will find it (converted or in place) and whether
    its raw download is on disk."""
    from dp360 import weights
    from dp360.pipeline.registry import default_needs

    rows = []
    for fp16 in (False, True):
        for need in default_needs(fp16=fp16):
            if fp16 and need.name not in ("main", "back"):
                continue
            raw = weights.cached_official(need.name, cache_dir) if need.file.installed else None
            rows.append(
                {
                    "name": need.name + (" (fp16)" if need.name in ("main", "back") and fp16 else ""),
                    "file": need.file.file_name,
                    "description": need.file.what,
                    "target": str(need.target),
                    "present": need.present(),
                    "raw_file": str(raw) if raw else None,
                }
            )
    if json_output:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    for row in rows:
        mark = "[green]present[/]" if row["present"] else "[yellow]missing[/]"
        kept = f" (raw file: {escape(row['raw_file'])})" if row["raw_file"] else ""
        err_console.print(f"{mark} {row['name']}: {escape(row['target'])}{kept}", soft_wrap=True)


@weights_app.command("verify", cls=Command)
def weights_verify(
    kind: KindArgument,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint file (default: the cached official file).", show_default=False)
    ] = None,
    family: Annotated[
        Family, typer.Option(help="Model family the checkpoint should match (sd15: the official one).")
    ] = Family.sd15,
    cache_dir: CacheDirOption = None,
) -> None:
    """Check that a checkpoint's keys and shapes match dp360's components exactly (no leftovers)."""
    import torch

    if kind is CheckpointKind.panohead:
        from dp360.panohead.store import check_panohead_pickle

        with user_errors(INTERRUPTED_NOTHING_CHANGED):
            path = _official_checkpoint(kind.value, checkpoint, cache_dir)
            network, _ = check_panohead_pickle(path)
            err_console.print(
                f"[green]✓[/] {path}: {len(network.state_dict)} tensors of {network.class_name} fill dp360's PanoHead generator exactly (read without running pickled code)"
            )
        return

    from dp360.diffusion.models.bundle import KIND_COMPONENTS, load_official_checkpoint
    from dp360.diffusion.models.components import build_components, component_config
    from dp360.diffusion.models.convert import convert_official

    with user_errors(INTERRUPTED_NOTHING_CHANGED):
        path = _official_checkpoint(kind.value, checkpoint, cache_dir)
        state = load_official_checkpoint(path)
        chosen = FAMILIES[family.value]
        with torch.device("meta"):
            components = build_components(chosen, KIND_COMPONENTS[kind.value])
        report = convert_official(
            state,
            {
                n: (component_config(chosen, n), {k: v.shape for k, v in m.state_dict().items()})
                for n, m in components.items()
            },
        )
        used = sum(len(s) for s in report.state_dicts.values())
        err_console.print(
            f"[green]✓[/] {path}: {used} tensors map onto {len(report.state_dicts)} components; {len(report.ignored)} schedule/obsolete buffers ignored"
        )


def _official_checkpoint(kind: str, checkpoint: Path | None, cache_dir: str | None) -> Path:
    """The checkpoint given, else the official file if it is on disk; never a download."""
    from dp360 import weights
    from dp360.errors import Dp360Error

    found = checkpoint or weights.cached_official(kind, cache_dir)
    if found is None:
        file_name = weights.WEIGHT_FILES[kind].file_name
        raise Dp360Error(
            f"{file_name} is not on this machine (not kept in {cache.downloads_dir()}, not in the Hugging Face "
            f"cache); pass it with --checkpoint FILE, or fetch and keep it with "
            f"`dp360 weights download {kind} --keep-checkpoints`."
        )
    return found


@weights_app.command("convert", cls=Command)
def weights_convert(
    kind: KindArgument,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint file (default: the cached official file).", show_default=False)
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Bundle folder (default: the dp360 cache).", show_default=False)
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store the weights in half precision (half the disk).")] = False,
    family: Annotated[
        Family, typer.Option(help="Model family of the checkpoint (sd15: the official one).")
    ] = Family.sd15,
    cache_dir: CacheDirOption = None,
) -> None:
    """Convert an official checkpoint into per-component diffusers folders in safetensors."""
    import torch

    from dp360.diffusion.models.bundle import convert_to_bundle

    with user_errors(INTERRUPTED_NOTHING_WRITTEN):
        path = _official_checkpoint(kind.value, checkpoint, cache_dir)
        if kind is CheckpointKind.panohead:
            from dp360.panohead.store import convert_panohead_pickle

            err_console.print(f"[green]✓[/] {convert_panohead_pickle(path, out)}")
            return
        target = out or cache.bundle_path(kind.value, fp16)
        convert_to_bundle(path, target, kind.value, family=family.value, dtype=torch.float16 if fp16 else torch.float32)
        err_console.print(f"[green]✓[/] {target}")


def doctor(
    json_output: JsonOption = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke", help="Also run prepare -> back view -> views end to end on tiny random models (CPU, < 1 minute)."
        ),
    ] = False,
) -> None:
    """Check this machine: torch/CUDA, GPU memory, packages, weight cache, disk, video encoding."""
    from rich.markup import escape

    from dp360.doctor import FAIL, run_checks, smoke_check

    checks = run_checks() + ([smoke_check()] if smoke else [])
    if json_output:
        sys.stdout.write(json.dumps([check.as_dict() for check in checks], indent=2) + "\n")
    else:
        colours = {"OK": "green", "WARN": "yellow", "FAIL": "red"}
        for check in checks:
            # Details hold paths and listings with brackets: printed literally, not as markup.
            line = (
                f"[{colours[check.status]}]{check.status:<4}[/] [bold]{escape(check.name)}[/]: {escape(check.detail)}"
            )
            if check.advice:
                line += f" [dim]-> {escape(check.advice)}[/]"
            err_console.print(line, soft_wrap=True)
    if any(check.status == FAIL for check in checks):
        raise typer.Exit(1)
