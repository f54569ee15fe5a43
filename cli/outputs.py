"""The commands that read a fitted run: `render` (turntable), `export` (mesh or splats), `report`
(the HTML page) and `view` (the interactive viewer). Each is its options and a library call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.console import INTERRUPTED_NOTHING_WRITTEN, INTERRUPTED_VIEWER, err_console, user_errors
from cli.options import (
    DEVICE_OPTION,
    MESH_OPTIONS,
    TURNTABLE_OPTIONS,
    DeviceOption,
    MeshFormat,
    QuietNoJsonOption,
    VideoFormat,
    mesh_settings,
    turntable_settings,
    with_options,
)
from dp360 import layout

RunDirArgument = Annotated[
    Path,
    typer.Argument(
        help="A run folder written by `dp360 reconstruct` or `dp360 fit` (with nerf/ and views/).", show_default=False
    ),
]


def check_run_dir(run_dir: Path) -> None:
    """`render` and `export` read a run folder: say so when there is none."""
    from dp360.errors import Dp360Error

    if not run_dir.is_dir():
        state = "is not a folder" if run_dir.exists() else "does not exist"
        raise Dp360Error(
            f"Run folder '{run_dir}' {state}; pass a folder written by `dp360 reconstruct` or `dp360 fit`."
        )


@with_options(TURNTABLE_OPTIONS, DEVICE_OPTION)
def render(
    run_dir: RunDirArgument,
    out: Annotated[
        Path, typer.Option("--out", help="Output file (.mp4 / .gif) or folder (frames).", show_default=False)
    ],
    output_format: Annotated[
        Optional[VideoFormat],
        typer.Option("--format", help="Video, GIF or PNG frames (default: from --out's suffix).", show_default=False),
    ] = None,
    radius: Annotated[
        float, typer.Option("--radius", help="Camera distance from the head's centre, 0.6 to 100 (the views use 2.7).")
    ] = 2.7,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing output file of the same kind (never a folder that is not dp360 frames).",
        ),
    ] = False,
    quiet: QuietNoJsonOption = False,
    *,
    options: SimpleNamespace,
) -> None:
    """Render a turntable video (or GIF, or PNG frames) from a run's fitted radiance field."""
    from dp360.errors import Dp360Error
    from dp360.nerf.fit import load_field
    from dp360.nerf.render import check_turntable_target, render_turntable, write_frames
    from dp360.outputs import check_suffix_matches
    from dp360.runtime import resolve_device

    with user_errors():
        chosen = (
            output_format.value
            if output_format
            else {".mp4": "mp4", ".gif": "gif"}.get(out.suffix.lower(), "frames" if not out.suffix else None)
        )
        if chosen is None:
            raise Dp360Error(
                f"Cannot tell the format from '{out.name}'; use a .mp4 or .gif name, a folder name, or --format."
            )
        check_suffix_matches(out, chosen, {".mp4": "mp4", ".gif": "gif"})
        settings = turntable_settings(options, radius=radius)
        settings.check()
        check_run_dir(run_dir)
        check_turntable_target(out, chosen, overwrite)  # before the (slow) rendering
        field = load_field(Path(run_dir) / layout.NERF, resolve_device(options.device), Path(run_dir) / layout.VIEWS)
        images, speed = render_turntable(field, settings, progress=not quiet)
        write_frames(images, out, chosen, options.fps, overwrite)
    if not quiet:
        err_console.print(f"[green]✓[/] {out} ({len(images)} frames, {speed:.1f} frames/s)")


@with_options(MESH_OPTIONS, DEVICE_OPTION)
def export(
    run_dir: RunDirArgument,
    output_format: Annotated[
        Optional[MeshFormat],
        typer.Option("--format", help="Mesh file format (default: glb; a splat field: ply).", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output file (default: RUN_DIR/export/head.FORMAT, or head.splat.ply for a splat field).",
            show_default=False,
        ),
    ] = None,
    mesh_density: Annotated[
        Optional[float],
        typer.Option(
            "--mesh-density",
            help="Mesh this iso-level of the density (default: the surface the views see, from the field's depth).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing mesh file given with --out.")
    ] = False,
    quiet: QuietNoJsonOption = False,
    *,
    options: SimpleNamespace,
) -> None:
    """Export a mesh (one connected head, UV-textured from the views) from a run's fitted radiance field.

    OBJ writes its MTL and PNG texture beside it; PLY holds the texture's colours per vertex.

    A splat field (`dp360 reconstruct PORTRAIT --out RUN_DIR --field splatfacto`) has no density
    to mesh: its Gaussians are written as a standard 3DGS PLY instead (positions, normals,
    f_dc/f_rest, opacity, scale, rotation), which splat viewers open; this needs no GPU.
    """
    from dp360.nerf.export import export_run
    from dp360.runtime import resolve_device

    with user_errors():
        settings = mesh_settings(options, density=mesh_density)
        asked = output_format.value if output_format else None
        target, summary, files = export_run(run_dir, out, asked, settings, resolve_device(options.device), overwrite)
        if "splats" in summary:
            written = f"{summary['splats']} splats"
        else:
            written = f"{summary['faces']} faces" + (
                f"; with {', '.join(p.name for p in files[1:])}" if files[1:] else ""
            )
    if not quiet:
        err_console.print(f"[green]✓[/] {target} ({written})")


def report(
    run_dir: RunDirArgument,
    self_contained: Annotated[
        bool,
        typer.Option(
            "--self-contained",
            help="Write export/report-standalone.html instead, every image and the video inlined: one file to send.",
        ),
    ] = False,
) -> None:
    """Rewrite RUN_DIR/export/report.html (as `reconstruct` writes it) and print its path.

    One page, no network needed: the input with its detection overlay, the crop, the PanoHead
    inversion, the back view, the views with their cameras, the turntable, the mesh from four sides,
    the stages' timings and settings, and the notes and warnings (a stage that did not run shows why).
    """
    from dp360.manifest import LOCK_NAME, RunLock, check_no_links
    from dp360.pipeline.registry import stage_names_of
    from dp360.report import REPORT_FOLDER, REPORT_NAME, STANDALONE_NAME, read_run, write_report

    with user_errors(INTERRUPTED_NOTHING_WRITTEN):
        check_run_dir(run_dir)
        RunLock(Path(run_dir)).check_free()
        manifest = read_run(run_dir)  # a folder dp360 did not make is refused before the lock file is made there
        name = STANDALONE_NAME if self_contained else REPORT_NAME
        inside = ((REPORT_FOLDER,), (LOCK_NAME, f"{REPORT_FOLDER}/{name}"))
        check_no_links(run_dir, *inside)  # never written through a link, whatever points where
        lock = RunLock(Path(run_dir))
        lock.acquire()  # no run writes into the folder while the page reads it
        try:
            check_no_links(run_dir, *inside)  # again, under the lock
            path = write_report(run_dir, stage_names=stage_names_of(manifest), self_contained=self_contained)
        finally:
            lock.release()
    typer.echo(str(path))


def view(
    run_dir: RunDirArgument,
    port: Annotated[int, typer.Option("--port", help="Port to serve on, 1 to 65535 (0 picks a free one).")] = 7007,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network)."),
    ] = "127.0.0.1",
    device: DeviceOption = "auto",
) -> None:
    """Open the interactive viewer (nerfstudio's viser viewer) on a run's fitted radiance field.

    Prints the URL on its own line on stdout and serves until Ctrl-C. On a remote GPU machine, keep
    the default host and forward the port: `ssh -L 7007:127.0.0.1:7007 MACHINE`.
    """
    from dp360.nerf.viewer import fitted_config, start_viewer
    from dp360.runtime import resolve_device
    from dp360.serving import check_address

    with user_errors(INTERRUPTED_VIEWER):
        address = check_address(host, port)  # before the (slow) loading
        fitted_config(run_dir)
        running = start_viewer(run_dir, address, resolve_device(device))
    typer.echo(running.url)
    note = address.network_note()
    if note:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    err_console.print("Serving the viewer; press Ctrl-C to stop.")
    running.wait()
    # Stopped, with nothing left to write. After nerfstudio has rendered in its worker threads,
    # the interpreter's teardown sometimes aborts in native code ("terminate called without an
    # active exception", SIGABRT, about every other run): end the process here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
