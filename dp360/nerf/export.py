"""Exporting a run's fitted field: the mesh (one connected head, UV-textured from the views) in each
asked format, or a splat field's Gaussians as a standard 3DGS PLY (a splat field has no density to
mesh). `export_field` serves the run's export stage and `dp360 export` alike; `export_run` adds
what the command needs around it: the target (default: inside the run), the run's lock, and the
link checks of what it writes there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import layout
from ..errors import Dp360Error
from ..layout import RunLayout
from ..outputs import check_suffix_matches
from .checkpoint import is_splat_fit
from .fit import load_field
from .mesh import MeshSettings, coloured_mesh, is_textured, write_mesh

MESH_SUFFIXES = {".glb": "glb", ".obj": "obj", ".ply": "ply"}  # a --out file's suffix -> its format
SPLAT_FORMAT = "splat.ply"


def export_field(
    run_dir: str | Path,
    target_of: Callable[[str], Path],
    formats: tuple[str, ...],
    settings: MeshSettings,
    device: str,
    overwrite: bool = False,
    before_write: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Any], list[Path]]:
    """Export the field of `run_dir`: for a splat field its Gaussians at `target_of("splat.ply")`
    (straight from the checkpoint: no CUDA needed), else the mesh at `target_of(format)` for each of
    `formats`. `before_write` runs once the result is computed, just before anything is written (a
    last check of the target). Returns the summary the export stage records and the files written."""
    run = RunLayout(run_dir)
    if is_splat_fit(run.nerf):
        from .splat import NO_MESH, splat_parameters_of_checkpoint, write_splat_ply

        parameters = splat_parameters_of_checkpoint(run.nerf)
        before_write()
        written = write_splat_ply(parameters, target_of(SPLAT_FORMAT), overwrite)
        summary = {
            "splats": int(len(parameters["means"])),
            "formats": [SPLAT_FORMAT],
            "mesh": f"not written: {NO_MESH}",
        }
        return summary, [written]
    mesh = coloured_mesh(load_field(run.nerf, device, run.views), settings, run.views)
    before_write()
    written = []
    for mesh_format in formats:
        written += write_mesh(mesh, target_of(mesh_format), mesh_format, overwrite)
    summary = {
        "files": [path.name for path in written],
        "texture": mesh.metadata.get("texture") if is_textured(mesh) else "vertex colours",
        "faces": int(len(mesh.faces)),
        "vertices": int(len(mesh.vertices)),
        "surface_from": mesh.metadata["surface_from"],
        "iso_level": None if mesh.metadata["iso_level"] is None else round(mesh.metadata["iso_level"], 4),
        "bounds": [[round(float(x), 4) for x in row] for row in mesh.bounds],
        "formats": list(formats),
    }
    return summary, written


def export_target(run_dir: str | Path, out: Path | None, asked_format: str | None) -> tuple[Path, str]:
    """Where `dp360 export` writes and in which format: `out` (its suffix names the format unless
    `asked_format` does), else RUN_DIR/export/head.FORMAT (head.splat.ply for a splat field)."""
    suffix_format = MESH_SUFFIXES.get(out.suffix.lower()) if out is not None else None
    mesh_format = asked_format or suffix_format or "glb"
    if out is not None:
        check_suffix_matches(out, mesh_format, MESH_SUFFIXES)
    splats = is_splat_fit(RunLayout(run_dir).nerf)
    if splats and asked_format not in (None, "ply"):
        raise Dp360Error(
            f"'{run_dir}' holds a splat field, which has no density to mesh as {mesh_format}; export its "
            "Gaussians with --format ply, or refit with `dp360 reconstruct --field nerfacto --force` for a mesh."
        )
    if splats:
        return out or RunLayout(run_dir) / layout.SPLATS, SPLAT_FORMAT
    return out or RunLayout(run_dir).export / f"{layout.MESH_STEM}.{mesh_format}", mesh_format


def export_run(
    run_dir: str | Path,
    out: Path | None,
    asked_format: str | None,
    settings: MeshSettings,
    device: str,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any], list[Path]]:
    """`dp360 export`: the field of a run folder exported to `out`, or into the run's export/. The
    default target lies inside the run folder, which dp360 owns (its run.json shows it): it may be
    replaced, never through a link, under the run's lock so that no run writes there at the same
    time. A target given with `out` is replaced only with `overwrite`."""
    from ..manifest import RunLock, check_no_links, read_manifest
    from ..outputs import check_file_target

    run_dir = Path(run_dir)
    settings.check()
    if not run_dir.is_dir():
        state = "is not a folder" if run_dir.exists() else "does not exist"
        raise Dp360Error(
            f"Run folder '{run_dir}' {state}; pass a folder written by `dp360 reconstruct` or `dp360 fit`."
        )
    target, mesh_format = export_target(run_dir, out, asked_format)
    inside_run = out is None
    overwrite = overwrite or inside_run
    written_inside = ((layout.EXPORT,), (layout.LOCK, f"{layout.EXPORT}/{target.name}")) if inside_run else ((), ())
    lock = RunLock(run_dir)
    if inside_run:
        lock.check_free()
        if not (run_dir / layout.MANIFEST).is_file():
            raise Dp360Error(
                f"'{run_dir}' holds no {layout.MANIFEST}, so it is not a dp360 run; pass a folder written by "
                "`dp360 reconstruct`."
            )
        read_manifest(run_dir / layout.MANIFEST)  # a folder dp360 did not make is the user's: nothing is written there
        check_no_links(run_dir, *written_inside)
    check_file_target(target, overwrite)  # before the (slow) extraction
    if inside_run:
        lock.acquire()
    try:
        check_no_links(run_dir, *written_inside)  # again, under the lock
        summary, files = export_field(
            run_dir,
            lambda _format: target,
            (mesh_format,),
            settings,
            device,
            overwrite,
            before_write=lambda: check_no_links(run_dir, *written_inside),  # nothing became a link meanwhile
        )
    finally:
        lock.release()
    return target, summary, files
