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


def check_suffix_matches(out: Path, chosen: str, by_suffix: dict[str, str]) -> None:
    """Refuse an --out whose suffix names another format than the one that would be written there
    (PLY bytes in `m.obj`)."""
    from dp360.errors import Dp360Error

    named = by_suffix.get(out.suffix.lower())
    if (named is not None and named != chosen) or (chosen == "frames" and out.suffix.lower() in by_suffix):
        raise Dp360Error(
            f"'{out.name}' names a .{named} file but --format is {chosen}; make the two agree "
            f"(or leave out --format to write what the name says)."
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
    from dp360.errors import Dp360Error
    from dp360.manifest import LOCK_NAME, RunLock, check_no_links
    from dp360.nerf.checkpoint import is_splat_fit
    from dp360.nerf.fit import load_field
    from dp360.nerf.mesh import coloured_mesh, write_mesh
    from dp360.outputs import check_file_target
    from dp360.report import read_run
    from dp360.runtime import resolve_device

    with user_errors():
        by_suffix = {".glb": "glb", ".obj": "obj", ".ply": "ply"}
        suffix_format = by_suffix.get(out.suffix.lower()) if out is not None else None
        mesh_format = output_format.value if output_format else suffix_format or "glb"
        if out is not None:
            check_suffix_matches(out, mesh_format, by_suffix)
        settings = mesh_settings(options, density=mesh_density)
        settings.check()
        check_run_dir(run_dir)
        splats = is_splat_fit(Path(run_dir) / layout.NERF)
        if splats and output_format not in (None, MeshFormat.ply):
            raise Dp360Error(
                f"'{run_dir}' holds a splat field, which has no density to mesh as {mesh_format}; export its "
                "Gaussians with --format ply, or refit with `dp360 reconstruct --field nerfacto --force` for a mesh."
            )
        default_name = "head.splat.ply" if splats else f"head.{mesh_format}"
        target = out or Path(run_dir) / layout.EXPORT / default_name
        # The default target lies inside the run folder, which dp360 owns (its run.json shows it):
        # it may replace it, never through a link, under the run's lock so that no run writes there
        # at the same time.
        overwrite = overwrite or out is None
        inside = ((), ()) if out is not None else (("export",), (LOCK_NAME, f"{layout.EXPORT}/{default_name}"))
        if out is None:
            RunLock(Path(run_dir)).check_free()
            read_run(run_dir)  # a folder dp360 did not make is the user's: nothing is written there
            check_no_links(run_dir, *inside)
        check_file_target(target, overwrite)  # before the (slow) extraction
        lock = RunLock(Path(run_dir))
        if out is None:
            lock.acquire()
            check_no_links(run_dir, *inside)  # again, under the lock
        try:
            if splats:
                from dp360.nerf.splat import splat_parameters_of_checkpoint, write_splat_ply

                parameters = splat_parameters_of_checkpoint(Path(run_dir) / layout.NERF)
                check_no_links(run_dir, *inside)
                write_splat_ply(parameters, target, overwrite)
                written = f"{len(parameters['means'])} splats"
            else:
                field = load_field(
                    Path(run_dir) / layout.NERF, resolve_device(options.device), Path(run_dir) / layout.VIEWS
                )
                mesh = coloured_mesh(field, settings, Path(run_dir) / layout.VIEWS)
                check_no_links(run_dir, *inside)  # nothing on the way became a link meanwhile
                files = write_mesh(mesh, target, mesh_format, overwrite)
                written = f"{len(mesh.faces)} faces" + (
                    f"; with {', '.join(p.name for p in files[1:])}" if files[1:] else ""
                )
        finally:
            lock.release()
    if not quiet:
        err_console.print(f"[green]✓[/] {target} ({written})")


def report(run_dir: RunDirArgument) -> None:
    """Rewrite RUN_DIR/export/report.html (as `reconstruct` writes it) and print its path.

    One page, no network needed: the input with its detection overlay, the crop, the back view,
    the views with their cameras, the turntable, the mesh from four sides, the stages' timings and
    settings, and the notes and warnings (a stage that did not run shows why).
    """
    from dp360.manifest import LOCK_NAME, RunLock, check_no_links
    from dp360.registry import stage_names_of
    from dp360.report import REPORT_FOLDER, REPORT_NAME, read_run, write_report

    with user_errors(INTERRUPTED_NOTHING_WRITTEN):
        check_run_dir(run_dir)
        RunLock(Path(run_dir)).check_free()
        manifest = read_run(run_dir)  # a folder dp360 did not make is refused before the lock file is made there
        inside = ((REPORT_FOLDER,), (LOCK_NAME, f"{REPORT_FOLDER}/{REPORT_NAME}"))
        check_no_links(run_dir, *inside)  # never written through a link, whatever points where
        lock = RunLock(Path(run_dir))
        lock.acquire()  # no run writes into the folder while the page reads it
        try:
            check_no_links(run_dir, *inside)  # again, under the lock
            path = write_report(run_dir, stage_names=stage_names_of(manifest))
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
    from dp360.nerf.viewer import check_address, fitted_config, start_viewer
    from dp360.runtime import resolve_device

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
