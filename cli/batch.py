"""`dp360 batch`: many portraits on Ray (argument parsing and presentation over `dp360.batch`).

Registered on the `dp360` app by cli/app.py; its options are cli/options.py's groups.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.console import INCOMPLETE_EXIT, err_console, interrupt_exit_code, user_errors
from cli.options import (
    FIELD_GROUPS,
    OUTPUT_OPTIONS,
    RUN_GROUPS,
    VIEW_GROUPS,
    field_settings,
    generation_settings,
    prepare_settings,
    run_options,
    with_options,
)


class Until(str, Enum):
    reconstruct = "reconstruct"
    views = "views"


class BatchDevice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class ProgressReporter:
    """A rich progress bar over the portraits (done, incomplete, failed, running, mean seconds of
    each stage) on stderr; each failure is printed as it ends."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.counts = {"done": 0, "incomplete": 0, "failed": 0}
        self.running = 0
        self.stage_spans: dict[str, list[float]] = {}
        self.progress = None
        self.bar = None
        self.started = 0.0  # time.monotonic() when the workers had started

    def _text(self) -> str:
        counts = ", ".join(f"{count} {status}" for status, count in self.counts.items())
        stages = " · ".join(
            f"{name} {sum(spans) / len(spans):.1f} s" for name, spans in self.stage_spans.items() if spans
        )
        ended = self.counts["done"] + self.counts["incomplete"]
        hours = (time.monotonic() - self.started) / 3600 if self.started else 0.0
        rate = f", {ended / hours:.0f}/h" if ended and hours > 0 else ""
        return f"{counts}, {self.running} running{rate}" + (f" [dim]| per portrait: {stages}[/]" if stages else "")

    def batch_started(self, total: int, workers: int, kind: str) -> None:
        self.started = time.monotonic()
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        err_console.print(
            f"[bold]batch[/]: {total} portraits on {workers} {'GPU' if kind == 'cuda' else 'CPU'} workers"
        )
        self.progress = Progress(
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err_console,
            transient=False,
        )
        self.progress.start()
        self.bar = self.progress.add_task(self._text(), total=total)

    def _refresh(self, advance: int = 0) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, advance=advance, description=self._text())

    def portrait_started(self, task, worker: int, pid: int | None) -> None:
        self.running += 1
        self._refresh()

    def portrait_retried(self, result) -> None:
        self.running -= 1
        if not self.quiet:
            err_console.print(
                f"[yellow]note:[/] {escape(result.input)}: {escape(result.error or '')}; trying again", soft_wrap=True
            )
        self._refresh()

    def portrait_finished(self, result) -> None:
        self.running -= 1
        if result.status in self.counts:
            self.counts[result.status] += 1
        for name, seconds in result.seconds.items():
            self.stage_spans.setdefault(name, []).append(seconds)
        if result.status == "failed":
            err_console.print(f"[red]error:[/] {escape(result.input)}: {escape(result.error or '')}", soft_wrap=True)
        self._refresh(advance=int(result.status != "interrupted"))

    def note(self, message: str) -> None:
        if not self.quiet:
            err_console.print(f"[yellow]note:[/] {escape(message)}", soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_table(summary) -> None:
    from rich.table import Table

    counts = summary.counts()
    shown = [status for status, count in counts.items() if count or status != "interrupted"]
    table = Table(title=f"batch in {summary.out_dir}", title_justify="left")
    for column in ("portraits", *shown, "portraits/h"):
        table.add_column(column, justify="right")
    table.add_row(
        str(len(summary.results)), *[str(counts[status]) for status in shown], f"{summary.portraits_per_hour():.1f}"
    )
    err_console.print(table)
    stage_seconds = summary.stage_seconds()
    if stage_seconds:
        stages = Table(title="mean seconds per portrait (stages that ran)", title_justify="left")
        for name in stage_seconds:
            stages.add_column(name, justify="right")
        stages.add_row(*[f"{seconds:.1f}" for seconds in stage_seconds.values()])
        err_console.print(stages)
    unfinished = [result for result in summary.results if result.status != "done"]
    if unfinished:
        problems = Table(title="portraits not done", title_justify="left")
        for column in ("input", "status", "tries", "why"):
            problems.add_column(column)
        for result in unfinished:
            problems.add_row(escape(result.input), result.status, str(result.attempts), escape(result.error or ""))
        err_console.print(problems)


@with_options(*VIEW_GROUPS, *FIELD_GROUPS, *RUN_GROUPS, OUTPUT_OPTIONS)
def batch(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Portraits: image files, folders (their images), glob patterns (quoted; ** recurses), or .txt/.csv "
            "lists of image paths (CSV: a 'path' column, else the first).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Batch folder: OUT/<stem>/ per portrait, OUT/batch.jsonl, OUT/batch.json (created; resumed if it "
            "holds this batch).",
            show_default=False,
        ),
    ],
    until: Annotated[
        Until, typer.Option("--until", help="reconstruct: the whole pipeline; views: stop after the 360-degree views.")
    ] = Until.reconstruct,
    address: Annotated[
        Optional[str],
        typer.Option(
            "--address",
            help="A running Ray cluster to join: the address that `ray start` printed on its head node ('auto' finds one "
            "on this machine); "
            "default: start one on this machine.",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            help="At most this many workers, 1 to 100000 (default: as many as the GPUs or CPUs allow).",
            show_default=False,
        ),
    ] = None,
    gpus_per_task: Annotated[
        float, typer.Option("--gpus-per-task", help="GPUs each worker holds, 0.01 to 64 (0.5: two workers a GPU).")
    ] = 1.0,
    cpus_per_task: Annotated[
        float,
        typer.Option("--cpus-per-task", help="CPU cores each worker holds, 0.01 to 1024 (CPU workers: their threads)."),
    ] = 1.0,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            help="Tries after the first for a portrait that crashed or whose worker died, 0 to 100 (a bad input is "
            "not retried).",
        ),
    ] = 2,
    device: Annotated[
        BatchDevice, typer.Option(help="Workers on GPUs (cuda), on CPUs, or auto (GPUs when the cluster has them).")
    ] = BatchDevice.auto,
    force: Annotated[
        bool,
        typer.Option("--force", help="Redo every portrait's stages even when their inputs and settings are unchanged."),
    ] = False,
    *,
    options: SimpleNamespace,
) -> None:
    """Many portraits: `reconstruct` (or `--until views`) on each, spread over Ray workers.

    Each worker holds a GPU (CPU cores when there is none), keeps its models loaded and takes portraits from the queue.

    Every portrait gets its own run folder OUT/<stem>/: a rerun skips finished portraits and resumes partial ones.

    A bad input is recorded in OUT/batch.jsonl and the others go on; a crash, or a worker that dies, is retried (--retries).

    Exit status: 0 when every portrait is done, 2 when one failed, 3 when one is incomplete.
    """
    from dp360.batch import BatchRecipe, ClusterSettings, run_batch

    json_output, quiet = options.json_output, options.quiet
    reporter = ProgressReporter(quiet or json_output)
    try:
        with user_errors():

            def on_gpus() -> bool:
                import torch

                return device is BatchDevice.cuda or (device is BatchDevice.auto and torch.cuda.is_available())

            views, noise = generation_settings(options)
            settings = dict(
                options=run_options(options, device=device.value, force=force),
                prepare=prepare_settings(options),
                views=views,
                noise=noise,
                field=field_settings(options, on_gpus),
                weights_dir=options.weights_dir,
                camera_dir=options.cameras,
                offload=options.offload,
                low_vram=options.low_vram,
                compile_models=options.compile_models,
            )
            recipe = (BatchRecipe.until_views if until is Until.views else BatchRecipe.reconstruct)(**settings)
            cluster = ClusterSettings(address, gpus_per_task, cpus_per_task, workers, retries)
            try:
                # Ray prints its raylet's messages (a worker died, ...) on stdout: keep that for --json
                with contextlib.redirect_stdout(sys.stderr):
                    summary = run_batch(inputs, out, recipe, cluster, reporter)
            except KeyboardInterrupt as interrupt:
                reporter.stop()
                ended = sum(reporter.counts.values())
                log = out / "batch.jsonl"  # absent when Ctrl-C came before any portrait started
                err_console.print(
                    f"[red]interrupted[/]: {ended} portraits had ended ({', '.join(f'{n} {s}' for s, n in reporter.counts.items())}); "
                    + (f"see {log}; " if log.is_file() else "")
                    + "rerun the same command to resume (finished portraits and stages are reused).",
                    soft_wrap=True,
                )
                raise typer.Exit(interrupt_exit_code(interrupt)) from None
    finally:
        reporter.stop()
    if json_output:
        sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    elif not quiet:
        _print_table(summary)
    counts = summary.counts()
    if counts["failed"] or counts["incomplete"]:
        err_console.print(
            f"[red]{counts['done']} done, {counts['incomplete']} incomplete, {counts['failed']} failed[/] of "
            f"{len(summary.results)} portraits; fix what is listed above and rerun the same command (finished "
            "portraits and stages are reused).",
            soft_wrap=True,
        )
        raise typer.Exit(2 if counts["failed"] else INCOMPLETE_EXIT)
