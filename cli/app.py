"""The `dp360` command: the Typer app, its commands registered in the order `--help` lists them,
and the entry point. Each command lives in its family's module (runs, outputs, setup, batch, eval)
and is a library call plus printing; their options are declared once, in cli/options.py."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

import dp360
from cli import batch, eval, outputs, runs, setup, web
from cli.console import Command, Group, raise_terminated

app = typer.Typer(
    name="dp360",
    cls=Group,
    help=(
        "One portrait to 32 consistent 360-degree views of the whole head (DiffPortrait360), "
        "a radiance field, a turntable video and a mesh."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dp360 {dp360.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """dp360: 360-degree heads from one portrait."""


for command in (runs.prepare, runs.reconstruct, runs.views, runs.fit, outputs.render, outputs.export):
    app.command(cls=Command)(command)
app.add_typer(setup.weights_app, name="weights")
for command in (setup.doctor, outputs.report, outputs.view, batch.batch):
    app.command(cls=Command)(command)
app.command("eval", cls=Command)(eval.eval_command)
app.command("app", cls=Command)(web.serve_app)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C: the running stage is recorded as interrupted, temporaries go.
    signal.signal(signal.SIGTERM, raise_terminated)
    app()
