"""The library's runs: `reconstruct`, `views`, `prepare` (a portrait) and `fit_views` (views made
elsewhere), what the commands of the same names call. Each picks its stages (`dp360.pipeline.recipes`),
builds the run's configuration (`dp360.pipeline.registry`), checks every setting before anything is
read or written, and hands both to the generic runner (`dp360.pipeline.runner`).

A run of views made elsewhere (`fit_views`, `dp360 fit`) imports the views into `views/`, then runs
the same fit -> render -> export -> consistency -> report stages as `reconstruct`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Dp360Error, RunDirectoryError
from .pipeline.recipes import recipe
from .pipeline.registry import pipeline_stages, portrait_config, views_run_config, views_run_stages
from .pipeline.runner import (
    Reporter,
    Run,
    RunOptions,
    RunSummary,
    check_run_settings,
    check_stages,
    fetch_weights,
    run_stages,
)
from .pipeline.stage import ModelCache, StageContext

if TYPE_CHECKING:
    from .diffusion.stage import ViewModels, ViewSettings
    from .nerf.stage import FieldStageSettings
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings

__all__ = [
    "RunOptions",
    "RunSummary",
    "check_portrait_settings",
    "fit_views",
    "prepare",
    "reconstruct",
    "run_pipeline",
    "views",
]


def check_portrait_settings(
    options: RunOptions,
    command: str,
    prepare_settings: PrepareSettings | None = None,
    view_settings: ViewSettings | None = None,
    noise_settings: NoiseSettings | None = None,
    field_settings: FieldStageSettings | None = None,
) -> tuple[str, str]:
    """Check every setting of `command`'s run of a portrait (prepare, views, reconstruct), as the run
    itself does first; returns the resolved (device, dtype). Raises a Dp360Error naming the first
    bad setting."""
    names = recipe(command).stages
    selected = tuple(stage for stage in pipeline_stages() if stage.name in names)
    config = portrait_config(options.seed, prepare_settings, view_settings, noise_settings, field_settings)
    return check_run_settings(options, selected, config)


def run_pipeline(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    stages: tuple[str, ...] = ("prepare",),
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    require: tuple[str, ...] = ("prepare",),
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
    field_settings: FieldStageSettings | None = None,
    model_cache: ModelCache | None = None,
) -> RunSummary:
    """Run the named stages on one portrait into `out_dir`. A stage that cannot run (missing
    weights, or an upstream stage that did not) is recorded and the run ends `incomplete`; a
    stage in `require` that cannot run is an error before anything is written. `model_cache`
    keeps loaded models between runs (a batch worker's); by default each run loads its own."""
    from .imaging import load_portrait

    options = options or RunOptions()
    known = {stage.name: stage for stage in pipeline_stages()}
    unknown = [name for name in stages if name not in known]
    if unknown:
        raise Dp360Error(f"Unknown stage(s) {', '.join(unknown)}; stages are {', '.join(known)}.")
    selected = tuple(stage for stage in known.values() if stage.name in stages)
    config = portrait_config(
        options.seed, prepare_settings, view_settings, noise_settings, field_settings, models, noise_models
    )
    device, dtype = check_run_settings(options, selected, config)
    image = load_portrait(image_path, **({"max_pixels": options.max_pixels} if options.max_pixels else {}))
    run = Run(out_dir, options, reporter)
    run.check_target(image)
    context = StageContext(
        Path(out_dir),
        image,
        device,
        dtype,
        options.progress,
        None,
        options.seed,
        note=run._note,
        stage_names=tuple(known),
        models=model_cache or ModelCache(),
    )
    fetch_weights(selected, context, config, options, run._note)
    check_stages(selected, context, config, require)
    for note in image.notes:
        run._note(f"{Path(image_path).name}: {note}")
    return run_stages(run, image, selected, context, config)


def fit_views(
    views_dir: str | Path,
    out_dir: str | Path,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    field_settings: FieldStageSettings | None = None,
) -> RunSummary:
    """A radiance field, turntable, mesh, consistency score and report for views made elsewhere:
    a folder in nerfstudio's layout (transforms.json + images; a run's views/, another method's
    views, a capture). The views are checked before anything is written, then imported into
    `out_dir/views/` and run through the same stages as `reconstruct`'s from the fit on. The run
    folder belongs to that views folder: a rerun reuses what is unchanged (a changed image redoes
    the fit and what follows), another views folder or a portrait's run there is refused unless
    `options.force`."""
    from .nerf.views_input import read_views

    options = options or RunOptions()
    selected = views_run_stages()
    config = views_run_config(field_settings)
    device, dtype = check_run_settings(options, selected, config)
    views = read_views(views_dir, options.max_pixels)
    out = Path(out_dir)
    if views.path == out.resolve() or views.path.is_relative_to(out.resolve()):
        raise RunDirectoryError(
            f"The views folder '{views_dir}' lies inside the run folder '{out}', whose folders a run replaces; "
            "choose another --out folder, or copy the views elsewhere first."
        )
    run = Run(out, options, reporter)
    run.check_target(views)
    context = StageContext(
        out,
        None,
        device,
        dtype,
        options.progress,
        None,
        options.seed,
        note=run._note,
        views_input=views,
        stage_names=tuple(stage.name for stage in selected),
    )
    fetch_weights(selected, context, config, options, run._note)
    check_stages(selected, context, config, require=recipe("fit").require)
    for note in views.notes:
        run._note(f"{views.path.name}: {note}")
    return run_stages(run, views, selected, context, config)


def reconstruct(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
    field_settings: FieldStageSettings | None = None,
) -> RunSummary:
    """The whole pipeline on one portrait: prepare -> noise -> views -> fit -> render -> export."""
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        stages=recipe("reconstruct").stages,
        view_settings=view_settings,
        models=models,
        noise_settings=noise_settings,
        noise_models=noise_models,
        field_settings=field_settings,
        require=recipe("reconstruct").require,
    )


def views(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
) -> RunSummary:
    """Prepare, PanoHead inversion (3D-aware noise, unless turned off), then the back view and
    the 360-degree views into `out_dir/views/`."""
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        recipe("views").stages,
        view_settings,
        models,
        require=recipe("views").require,
        noise_settings=noise_settings,
        noise_models=noise_models,
    )


def prepare(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
) -> RunSummary:
    """Only the prepare stage: `out_dir/prepared/{crop.png, dataset.json, overlay.png, face.json}`."""
    prepare_only = recipe("prepare")
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        stages=prepare_only.stages,
        require=prepare_only.require,
    )
