"""The commands that run the pipeline's stages on a portrait or on views: `prepare`, `reconstruct`,
`views`, `fit`. Each is its options (declared once in cli/options.py) and a call of `dp360.run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.markup import escape

from cli.console import (
    INCOMPLETE_EXIT,
    ConsoleReporter,
    err_console,
    interrupt_exit_code,
    missing_promises,
    print_summary,
    user_errors,
)
from cli.options import (
    DEVICE_OPTION,
    FACE_INDEX_OPTION,
    FIELD_GROUPS,
    FORCE_OPTION,
    MAX_PIXELS_OPTION,
    NO_DOWNLOAD_OPTION,
    OUTPUT_OPTIONS,
    PREPARE_OPTIONS,
    RUN_GROUPS,
    SEED_OPTION,
    VIEW_GROUPS,
    OutOption,
    check_cpu_views,
    field_settings,
    generation_settings,
    prepare_settings,
    reconstruct_settings,
    run_options,
    view_models,
    with_options,
)


@with_options(
    PREPARE_OPTIONS,
    FACE_INDEX_OPTION,
    DEVICE_OPTION,
    FORCE_OPTION,
    MAX_PIXELS_OPTION,
    NO_DOWNLOAD_OPTION,
    OUTPUT_OPTIONS,
)
def prepare(
    image: Annotated[Path, typer.Argument(help="Portrait image (PNG, JPEG, WebP, TIFF, ...).", show_default=False)],
    out: OutOption,
    options: SimpleNamespace,
) -> None:
    """Detect the face, crop it like PanoHead's data and estimate its camera.

    Writes OUT/prepared/crop.png (512x512), dataset.json (PanoHead camera label), overlay.png
    (detection, landmarks, crop and pose drawn on the input) and face.json, plus OUT/input.png
    and OUT/run.json.
    """
    from dp360.run import prepare as prepare_run

    with user_errors():
        summary = prepare_run(
            image,
            out,
            prepare_settings(options),
            run_options(options),
            ConsoleReporter(options.quiet or options.json_output),
        )
    print_summary(summary, options.json_output, options.quiet, "prepare")


@with_options(*VIEW_GROUPS, FACE_INDEX_OPTION, *FIELD_GROUPS, DEVICE_OPTION, FORCE_OPTION, *RUN_GROUPS, OUTPUT_OPTIONS)
def reconstruct(
    images: Annotated[
        list[Path],
        typer.Argument(help="One or more portraits; several go to OUT/<stem>/ one after another.", show_default=False),
    ],
    out: OutOption,
    options: SimpleNamespace,
) -> None:
    """Everything: prepare -> 3D-aware noise -> back view -> views -> NeRF -> turntable + mesh.

    Writes OUT/{input.png, prepared/, noise/, views/, nerf/, export/turntable.mp4,
    export/head.glb, run.json}; a rerun skips every stage whose inputs and settings are unchanged.
    """
    from dp360.errors import Dp360Error
    from dp360.panohead.stage import NoiseModels
    from dp360.run import reconstruct as reconstruct_run

    quiet, json_output = options.quiet, options.json_output
    reporter = ConsoleReporter(quiet or json_output)
    with user_errors():
        checked = reconstruct_settings(options)  # once, before the first portrait is touched

    def run_one(image: Path, target: Path):
        return reconstruct_run(
            image,
            target,
            checked.prepare,
            checked.run,
            reporter,
            checked.views,
            view_models(options, checked.run_dtype),
            checked.noise,
            NoiseModels.locate(options.weights_dir),
            checked.field,
        )

    if len(images) == 1:
        with user_errors():
            summary = run_one(images[0], out)
        print_summary(summary, json_output, quiet, "reconstruct")
        return
    stems = [image.stem for image in images]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        err_console.print(
            f"[red]error:[/] several inputs share the name {', '.join(duplicates)}; "
            "rename them so each gets its own OUT/<stem>/ folder."
        )
        raise typer.Exit(2)
    results, failures, incomplete = [], 0, []
    for position, image in enumerate(images):
        try:
            summary = run_one(image, out / image.stem)
            results.append(summary.as_dict())
            if missing_promises(summary, "reconstruct"):
                incomplete.append(summary)
            if not (quiet or json_output):
                err_console.print(f"[bold]{summary.status}[/]: {image} -> {summary.out_dir}")
        except KeyboardInterrupt as interrupt:
            finished = [result.get("input") or result["out_dir"] for result in results]
            err_console.print(
                f"[red]interrupted[/] during {image}: {len(results)} of {len(images)} portraits had finished"
                + (f" ({', '.join(finished)})" if finished else "")
                + f", {len(images) - position - 1} not started; rerun the same command to resume "
                "(finished portraits and stages are reused).",
                soft_wrap=True,
            )
            raise typer.Exit(interrupt_exit_code(interrupt)) from None
        except Exception as error:
            from dp360.atomic import filesystem_error

            problem = error if isinstance(error, Dp360Error) else filesystem_error(error)
            if problem is None:
                raise
            failures += 1
            results.append({"input": str(image), "status": "failed", "error": str(problem)})
            err_console.print(f"[red]error:[/] {escape(str(image))}: {escape(str(problem))}", soft_wrap=True)
    if json_output:
        sys.stdout.write(json.dumps({"runs": results}, indent=2) + "\n")
    done = len(results) - failures - len(incomplete)
    if incomplete:
        reasons = {name: stage.get("reason", "") for run in incomplete for name, stage in run.stages.items()}
        for name, stage in incomplete[0].stages.items():
            if stage.get("status") == "not_available":
                err_console.print(f"[yellow]not run[/] {name}: {escape(reasons[name])}", soft_wrap=True)
    if failures or incomplete:
        err_console.print(
            f"[red]{done} done, {len(incomplete)} incomplete, {failures} failed[/] of {len(images)} portraits; "
            "fix what is listed above and rerun the same command (finished portraits and stages are reused).",
            soft_wrap=True,
        )
        raise typer.Exit(2 if failures else INCOMPLETE_EXIT)


@with_options(*VIEW_GROUPS, FACE_INDEX_OPTION, DEVICE_OPTION, FORCE_OPTION, *RUN_GROUPS, OUTPUT_OPTIONS)
def views(
    image: Annotated[Path, typer.Argument(help="Portrait image.", show_default=False)],
    out: OutOption,
    options: SimpleNamespace,
) -> None:
    """Prepare the portrait, generate its back view, then the consistent views around the head.

    Writes OUT/views/: back_ref.png, 000.png ... (one per view), grid.png, orbit.mp4 and
    transforms.json (nerfstudio cameras of the orbit).
    """
    from dp360.panohead.stage import NoiseModels
    from dp360.run import check_portrait_settings
    from dp360.run import views as views_run

    with user_errors():
        settings = prepare_settings(options)
        view_settings, noise_settings = generation_settings(options)
        run = run_options(options)
        # the bundles of the precision the run computes in (fp16 on CUDA): checked settings first
        run_device, run_dtype = check_portrait_settings(run, "views", settings, view_settings, noise_settings)
        check_cpu_views(options, run_device, run_dtype, view_settings)
        summary = views_run(
            image,
            out,
            settings,
            run,
            ConsoleReporter(options.quiet or options.json_output),
            view_settings,
            view_models(options, run_dtype),
            noise_settings,
            NoiseModels.locate(options.weights_dir),
        )
    print_summary(summary, options.json_output, options.quiet, "views")


@with_options(*FIELD_GROUPS, DEVICE_OPTION, SEED_OPTION, FORCE_OPTION, MAX_PIXELS_OPTION, OUTPUT_OPTIONS)
def fit(
    views_dir: Annotated[
        Path,
        typer.Argument(
            help="Views in nerfstudio's layout: a folder with transforms.json and the images it lists (a run's "
            "views/, another method's views, a capture).",
            show_default=False,
        ),
    ],
    out: OutOption,
    options: SimpleNamespace,
) -> None:
    """Fit a radiance field to views made elsewhere, then turntable, mesh, consistency score and report.

    VIEWS_DIR is checked first (transforms.json, paths inside the folder, every image decoded, one
    size, at least 8 views, rigid poses, positive intrinsics); its views are then copied into
    OUT/views/ and run through the same stages as `dp360 reconstruct` from the fit on. Writes
    OUT/{views/, nerf/, export/turntable.mp4, export/head.glb, export/report.html, run.json}; a
    rerun skips every stage whose inputs and settings are unchanged (a changed image redoes the fit).
    """
    from dp360.run import fit_views
    from dp360.runtime import resolve_device

    with user_errors():
        field = field_settings(options, lambda: resolve_device(options.device).startswith("cuda"))
        reporter = ConsoleReporter(options.quiet or options.json_output)
        summary = fit_views(views_dir, out, run_options(options), reporter, field)
    print_summary(summary, options.json_output, options.quiet, "fit")
