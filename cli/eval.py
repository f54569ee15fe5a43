"""`dp360 eval`: argument parsing and presentation over `dp360.eval` (registered by cli/app.py)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer

from cli.console import err_console, user_errors
from cli.options import DEVICE_OPTION, OUTPUT_OPTIONS, with_options


class Framing(str, Enum):  # dp360.eval.truth.FRAMINGS (not imported here: it loads numpy and more)
    auto = "auto"
    crop = "crop"
    camera = "camera"


@with_options(DEVICE_OPTION, OUTPUT_OPTIONS)
def eval_command(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders (from `dp360 reconstruct`) or other methods' views as captures in dp360's orbit frame.",
            show_default=False,
        ),
    ],
    truth: Annotated[
        Optional[Path],
        typer.Option(
            "--truth", help="Ground-truth capture: a folder with nerfstudio's transforms.json.", show_default=False
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option(
            "--reference", help="The truth frame that is the input's view (index or file name; default: the first)."
        ),
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Size of the compared crops in pixels, 32 to 2048.")] = 512,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance", help="Degrees from the nearest view beyond which the field is rendered instead, 0 to 180."
        ),
    ] = 2.0,
    framing: Annotated[
        Framing,
        typer.Option(
            "--framing", help="crop: zoom the truth like the run's crop; camera: the truth cameras' own angles."
        ),
    ] = Framing.auto,
    inception: Annotated[
        Optional[Path],
        typer.Option(
            "--inception", help="torch-fidelity's Inception-v3 weight file, for FID (default: the dp360 cache's)."
        ),
    ] = None,
    arcface: Annotated[
        Optional[Path],
        typer.Option(
            "--arcface",
            help="insightface's ArcFace IResNet weights (arcface_torch backbone.pth) for CSIM instead of dlib's network.",
            show_default=False,
        ),
    ] = None,
    table: Annotated[
        Optional[Path],
        typer.Option("--table", help="Write a comparison table as NAME.md and NAME.csv.", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace comparison tables written before.")] = False,
    *,
    options: SimpleNamespace,
) -> None:
    """Measure runs: against a ground-truth capture with the paper's metrics (PSNR, SSIM, LPIPS
    front and back, CSIM front, FID), and by their view-consistency score (no truth needed).

    Writes RUN/eval/metrics.json and RUN/eval/metrics.png (the metrics against yaw) for every run,
    and with --table a comparison of all of them.
    """
    from dp360.eval.evaluate import evaluate_paths
    from dp360.eval.truth import EvalSettings
    from dp360.runtime import resolve_device

    device, json_output, quiet = options.device, options.json_output, options.quiet
    with user_errors():
        if table is not None and (table.name in ("", ".", "..") or table.is_dir()):
            from dp360.errors import Dp360Error

            raise Dp360Error(
                f"--table names the folder '{table}', not a table; give a file name such as results/table "
                "(NAME.md and NAME.csv are written)."
            )
        settings = EvalSettings(
            size=size,
            tolerance=tolerance,
            reference=reference,
            framing=framing.value,
            inception=inception,
            arcface=arcface,
        )
        settings.check()
        settings.device = resolve_device(device)
        results = evaluate_paths(runs, truth, settings, table, overwrite, progress=not quiet)
    if json_output:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    if not quiet:
        for result in results:
            _show(err_console, result)
        if table is not None:
            from dp360.eval.compare import table_paths

            for path in table_paths(table):
                err_console.print(f"[green]✓[/] {path}")


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _show(console, result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(result['candidate'])}[/] ({escape(result['path'])})")
    truth = result.get("truth")
    if truth:
        grid = Table("side", "frames", "PSNR", "SSIM", "LPIPS", "CSIM", "FID (samples)", "from field")
        for side in ("front", "back"):
            summary = truth["summary"][side]
            fid = "n/a" if summary["fid"] is None else f"{summary['fid']:.2f} ({summary['fid_samples']})"
            csim = _number(summary["csim"]) + (f" ({summary['csim_frames']})" if summary["csim"] is not None else "")
            grid.add_row(
                side,
                str(summary["frames"]),
                _number(summary["psnr"], 2),
                _number(summary["ssim"]),
                _number(summary["lpips"]),
                csim if side == "front" else "",
                fid,
                str(summary["from_field"]),
            )
        console.print(grid)
        console.print(
            f"truth {escape(truth['truth'])}, reference {escape(truth['reference'])}, framing {truth['framing']}"
        )
        for name, reason in truth["unavailable"].items():
            console.print(f"[yellow]no {name.upper()}[/]: {escape(reason)}", soft_wrap=True)
        if "csim" not in truth["unavailable"] and truth["summary"]["front"].get("csim_note"):
            console.print(f"[yellow]no CSIM[/]: {escape(truth['summary']['front']['csim_note'])}", soft_wrap=True)
        for note in truth["notes"]:
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    score = result.get("consistency")
    if score:
        summary = score["summary"]
        console.print(
            f"consistency ({summary['views']} views at {summary['resolution']} px): PSNR {_number(summary['psnr'], 2)}, "
            f"LPIPS {_number(summary['lpips'])}, CSIM vs input {_number(summary['csim'])} "
            f"({summary['csim_views']} views with a face)"
        )
        for name, reason in score["unavailable"].items():
            console.print(f"[yellow]no {name.upper()}[/] in the consistency score: {escape(reason)}", soft_wrap=True)
    for path in result.get("files", []):
        console.print(f"[green]✓[/] {escape(path)}")
