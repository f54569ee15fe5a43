"""The one list of stages, in the order a run runs them: the full pipeline of a portrait, and a run
of views made elsewhere (`dp360 fit`); the run's configuration (`RunConfig`: each stage's typed
config under its key); and every weight file's installer, supplied by its owner. Adding a stage
touches its own module and this one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import cache
from ..errors import Dp360Error
from ..weights import RETINAFACE_FILES, Installer, Need
from .stage import Stage

if TYPE_CHECKING:
    from ..diffusion.stage import ViewModels, ViewSettings
    from ..nerf.stage import FieldStageSettings
    from ..panohead.stage import NoiseModels, NoiseSettings
    from ..prepare import PrepareSettings


def pipeline_stages() -> tuple[Stage, ...]:
    """The stages of the full pipeline, in order."""
    from ..diffusion.stage import VIEWS_STAGE
    from ..eval.consistency import CONSISTENCY_STAGE
    from ..nerf.stage import EXPORT_STAGE, FIT_STAGE, RENDER_STAGE
    from ..panohead.stage import NOISE_STAGE
    from ..prepare.stage import PREPARE_STAGE
    from ..report import REPORT_STAGE

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
    from ..nerf.views_input import IMPORT_STAGE

    stages = pipeline_stages()
    fit = next(index for index, stage in enumerate(stages) if stage.name == "fit")
    return (IMPORT_STAGE, *stages[fit:])


def stage_names_of(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The stage names, in order, of the kind of run `manifest` (a run.json) records: a run of
    imported views (`dp360 fit`) or a portrait's."""
    source = manifest.get("input")
    imported = isinstance(source, dict) and source.get("kind") == "views"
    return tuple(stage.name for stage in (views_run_stages() if imported else pipeline_stages()))


def installer_of(name: str, fp16: bool = False) -> Installer | None:
    """The installer of a weight file by its owner (None: the file is used as downloaded)."""
    from ..diffusion.models.bundle import bundle_installer
    from ..diffusion.stage import SPHERE32_INSTALLER
    from ..panohead.store import PANOHEAD_INSTALLER

    if name in ("main", "back"):
        return bundle_installer(name, fp16)
    return {"panohead": PANOHEAD_INSTALLER, "data": SPHERE32_INSTALLER}.get(name)


def need(name: str, target: str | Path, fp16: bool = False, optional: bool = False) -> Need:
    """A `Need` of the weight file `name` at `target`, with its owner's installer."""
    return Need(name, Path(target), fp16, optional, installer=installer_of(name, fp16))


def default_needs(view_count: int = 32, fp16: bool = False) -> list[Need]:
    """What a full run with default locations needs (the doctor's list, `dp360 weights download`),
    each with its owner's installer."""
    needs = [
        need("main", cache.bundle_path("main", fp16), fp16),
        need("back", cache.bundle_path("back", fp16), fp16),
        need("panohead", cache.panohead_dir()),
        need("perceptual", cache.perceptual_dir() / cache.PERCEPTUAL_FILE),
        need("retinaface", cache.facexlib_dir() / RETINAFACE_FILES["resnet50"], optional=True),
    ]
    if view_count == 32:
        needs.insert(3, need("data", cache.cache_dir() / "sphere32"))
    return needs


@dataclass
class RunConfig:
    """The configuration of one run: each stage's typed config under the key its stages declare
    (`Stage.config`). A stage sees only its own (`of`); every config checks itself (`check(device)`)."""

    configs: dict[str, Any] = field(default_factory=dict)

    def of(self, stage: Stage) -> Any:
        """The config `stage` reads (None for a stage without one)."""
        if stage.config is None:
            return None
        if stage.config not in self.configs:
            raise Dp360Error(f"The run has no '{stage.config}' configuration, which the {stage.name} stage reads.")
        return self.configs[stage.config]

    def check(self, stages: Iterable[Stage], device: str) -> None:
        """Check, before any work, the config of every stage among `stages`, each config once."""
        checked: set[str] = set()
        for stage in stages:
            if stage.config is not None and stage.config not in checked:
                checked.add(stage.config)
                self.of(stage).check(device)


def portrait_config(
    seed: int = 42,
    prepare: PrepareSettings | None = None,
    views: ViewSettings | None = None,
    noise: NoiseSettings | None = None,
    field: FieldStageSettings | None = None,
    view_models: ViewModels | None = None,
    noise_models: NoiseModels | None = None,
) -> RunConfig:
    """The configuration of a portrait's run (`pipeline_stages`), defaults filled in. Each shared
    value is declared once and handed to the stages that use it here: the run's `seed` (the
    views' and the inversion's), the view count and whether the views start from PanoHead's
    noise (`ViewSettings.views`, `use_3d_noise`: the noise stage's too). The callers' objects are
    not changed."""
    from ..diffusion.stage import ViewModels, ViewSettings, ViewStageConfig
    from ..nerf.stage import FieldStageSettings
    from ..panohead.stage import NoiseModels, NoiseSettings, NoiseStageConfig
    from ..prepare import PrepareSettings

    views = replace(views or ViewSettings(), seed=seed)
    noise = replace(noise or NoiseSettings(), seed=seed, views=views.views)
    noise_models = noise_models or NoiseModels.locate()
    return RunConfig(
        {
            "prepare": prepare or PrepareSettings(),
            "noise": NoiseStageConfig(noise, noise_models, views.use_3d_noise),
            "views": ViewStageConfig(views, view_models or ViewModels.default(views.views), noise_models),
            "field": field or FieldStageSettings(),
        }
    )


def views_run_config(field: FieldStageSettings | None = None) -> RunConfig:
    """The configuration of a run of views made elsewhere (`views_run_stages`): the field's only."""
    from ..nerf.stage import FieldStageSettings

    return RunConfig({"field": field or FieldStageSettings()})
