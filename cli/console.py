"""What dp360's commands print and how they end: the console (stderr, so that --json keeps stdout
machine-readable), help formatting, the progress reporter, one sentence per user error, and the
summary of a run with its exit status."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup


def _show_flags_bare(command, ctx) -> None:
    """Typer's rich help prints a value placeholder (`<bool>`) after every flag, as if it took a
    value; an empty metavar shows flags (and --help) bare."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        _show_flags_bare(self, ctx)
        return super().format_help(ctx, formatter)


class Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        _show_flags_bare(self, ctx)
        return super().format_help(ctx, formatter)


# Human-readable output goes to stderr so that --json keeps stdout machine-readable.
err_console = Console(stderr=True, highlight=False)


class ConsoleReporter:
    """Shows stage progress with rich on stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._status = None

    def stage_started(self, name: str, description: str) -> None:
        if not self.quiet:
            self._status = err_console.status(f"[bold]{name}[/]: {description} ...")
            self._status.start()

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        # A failure is reported once, by the error message itself.
        if not self.quiet and outcome != "failed":
            timing = f" in {seconds:.1f} s" if seconds else ""
            err_console.print(f"[green]✓[/] [bold]{name}[/]: {outcome}{timing}")

    def note(self, message: str) -> None:
        if not self.quiet:
            err_console.print(f"[yellow]note:[/] {escape(message)}", soft_wrap=True)


# What Ctrl-C (or SIGTERM) leaves behind, said after "interrupted:" (a run's stages by default).
INTERRUPTED_RUN = "finished stages are kept; rerun the same command to resume."
INTERRUPTED_DOWNLOAD = "what was fetched is kept; rerun the same command to resume the download."
INTERRUPTED_NOTHING_CHANGED = "nothing was changed."
INTERRUPTED_NOTHING_WRITTEN = "nothing was written (dp360 writes to a temporary name, then renames)."
INTERRUPTED_VIEWER = "the viewer stopped while it loaded the field, before it served; nothing was written."


@contextlib.contextmanager
def user_errors(interrupted: str = INTERRUPTED_RUN) -> Iterator[None]:
    """Turn dp360's user-facing errors into one line on stderr and a non-zero exit; `interrupted`
    says what an interruption leaves behind."""
    from dp360.errors import Dp360Error

    try:
        yield
    except Dp360Error as error:
        err_console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as interrupt:
        err_console.print(f"[red]interrupted[/]: {interrupted}", soft_wrap=True)
        raise typer.Exit(interrupt_exit_code(interrupt)) from None
    except Exception as error:
        from dp360.atomic import filesystem_error

        translated = filesystem_error(error)
        if translated is None:
            raise
        err_console.print(f"[red]error:[/] {escape(str(translated))}", soft_wrap=True)
        raise typer.Exit(translated.exit_code) from None


def interrupt_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process ended by it."""
    from dp360.errors import Terminated

    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def raise_terminated(signum, frame) -> None:
    from dp360.errors import Terminated

    raise Terminated()


INCOMPLETE_EXIT = 3  # distinct from 2 (bad input or settings); what a command promises: dp360.recipes


def missing_promises(summary, command: str) -> list[str]:
    from dp360.pipeline.recipes import recipe

    return recipe(command).missing(summary.stages)


def print_summary(summary, as_json: bool, quiet: bool, command: str) -> None:
    """The run's outputs; for a run without what `command` promises, every stage that did not run
    with its reason (which names the command that fixes it), and exit status 3."""
    missing = missing_promises(summary, command)
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    elif not quiet:
        err_console.print(f"[bold]{summary.status}[/]: {summary.out_dir}")
        for rel in summary.outputs:
            err_console.print(f"  {rel}")
    if missing:
        for name, stage in summary.stages.items():
            if stage.get("status") == "not_available":
                err_console.print(f"[yellow]not run[/] {name}: {escape(stage.get('reason', ''))}", soft_wrap=True)
        err_console.print(
            f"[red]incomplete[/]: no {' or '.join(missing)} results in {summary.out_dir}; "
            "fix what is listed above and rerun the same command (finished stages are reused).",
            soft_wrap=True,
        )
        raise typer.Exit(INCOMPLETE_EXIT)
