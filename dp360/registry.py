"""The one list of stages, in the order a run runs them: the full pipeline of a portrait, and a run
of views made elsewhere (`dp360 fit`). Adding a stage touches its own module and this list."""

from __future__ import annotations

from typing import Any

from .stage import Stage


def pipeline_stages() -> tuple[Stage, ...]:
    """The stages of the full pipeline, in order."""
    from .diffusion.stage import VIEWS_STAGE
    from .eval.consistency import CONSISTENCY_STAGE
    from .nerf.stage import EXPORT_STAGE, FIT_STAGE, RENDER_STAGE
    from .panohead.stage import NOISE_STAGE
    from .prepare.stage import PREPARE_STAGE
    from .report import REPORT_STAGE

    return (
        PREPARE_STAGE,
        NOISE_STAGE,
        VIEWS_STAGE,
        FIT_STAGE,
        RENDER_STAGE,
        EXPORT_STAGE,
        CONSISTENCY_STAGE,
        REPORT_STAGE,
    )


def views_run_stages() -> tuple[Stage, ...]:
    """The stages of a run of views made elsewhere (`fit_views`), in order: the import, then the
    full pipeline's stages from the fit on."""
    from .nerf.views_input import IMPORT_STAGE

    stages = pipeline_stages()
    fit = next(index for index, stage in enumerate(stages) if stage.name == "fit")
    return (IMPORT_STAGE, *stages[fit:])


def stage_names_of(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The stage names, in order, of the kind of run `manifest` (a run.json) records: a run of
    imported views (`dp360 fit`) or a portrait's."""
    source = manifest.get("input")
    imported = isinstance(source, dict) and source.get("kind") == "views"
    return tuple(stage.name for stage in (views_run_stages() if imported else pipeline_stages()))
