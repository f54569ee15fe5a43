"""The one interface every stage of a run implements (its settings checks: `dp360.checks`).

A `Stage` is declared by the package that owns it (prepare/, panohead/, diffusion/, nerf/) and
says everything the runner (`dp360.run`) needs: its name and folder, its settings key, the
hashes of the files it reads, the weight files it needs, whether it can run, and how to build
its folder. The runner only
loops over the list of stages; adding a stage touches its own module and that list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .diffusion.stage import ViewModels, ViewSettings
    from .imaging import LoadedImage
    from .nerf.stage import FieldStageSettings
    from .nerf.views_input import ViewsInput
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings
    from .weights import Need


@dataclass
class RunConfig:
    """Everything the stages of one run are configured with (settings and model locations); a
    run of imported views (`dp360 fit`) has only the field's."""

    prepare: PrepareSettings | None = None
    noise: NoiseSettings | None = None
    views: ViewSettings | None = None
    field: FieldStageSettings | None = None
    view_models: ViewModels | None = None
    noise_models: NoiseModels | None = None


@dataclass
class StageContext:
    """What a stage sees of its run: the folder, the input, the device and the configuration.
    The input is a portrait (`image`) or, in a run of imported views, a views folder
    (`views_input`; `image` is None there)."""

    run_dir: Path
    image: LoadedImage | None
    device: str
    dtype: str
    progress: bool
    config: RunConfig
    seed: int = 42
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # run.json's stage records
    note: Callable[[str], None] = lambda message: None
    views_input: ViewsInput | None = None  # the checked views folder of a `dp360 fit` run
    # name -> the stages of this run that provide its results instead (`Stage.provides`)
    providers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the names of the stages of this kind of run, in order (the report lists them)
    stage_names: tuple[str, ...] = ()

    def done(self, name: str) -> bool:
        """Whether the results of stage `name`, or of a stage providing them, are there."""
        return any(self.records.get(each, {}).get("status") == "done" for each in (name, *self.providers.get(name, ())))


@dataclass(frozen=True)
class Unavailable:
    """Why a stage does not run: `skipped` (turned off) or `not_available` (missing weights)."""

    status: str
    reason: str
    note: str | None = None  # shown to the user; None: the reason is in run.json only


def _always(context: StageContext) -> Unavailable | None:
    return None


def _nothing(context: StageContext) -> None:
    return None


def _no_weights(context: StageContext) -> tuple[Need, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # relative to the run folder
    description: str
    settings: Callable[[StageContext], dict[str, Any]]  # the settings that enter its key
    inputs: Callable[[StageContext], dict[str, str]]  # sha256 of every file it reads
    build: Callable[[StageContext, Path], dict[str, Any]]  # fills a staging folder, returns a summary
    check: Callable[[StageContext], Unavailable | None] = _always
    resolve: Callable[[StageContext], None] = _nothing  # finds or makes what `check` looks for
    needs: tuple[str, ...] = ()  # stages whose results it reads
    # weight files it reads from dp360's cache, fetched before any stage runs (user-given
    # locations such as --weights-dir are not listed: dp360 never writes there)
    weights: Callable[[StageContext], tuple[Need, ...]] = _no_weights
    version: int = 1  # bump when the stage's code changes what it writes
    shared_folder: bool = False  # several stages write into the folder: replace only own files
    # stages whose results it makes in their place, for the stages that need those (importing
    # views provides what the views stage would have made)
    provides: tuple[str, ...] = ()
