"""The one interface every stage of a run implements (its settings checks: `dp360.checks`).

A `Stage[C]` is declared by the package that owns it (prepare/, panohead/, diffusion/, nerf/) and
says everything the runner (`dp360.pipeline.runner`) needs: its name and folder, the key of its
config in the run's `RunConfig` (C, its own typed config: the only configuration it sees), its
settings key, the hashes of the files it reads, the weight files it needs, whether it can run,
and how to build its folder. The runner only loops over the list of stages; adding a stage
touches its own module and that list (`dp360.pipeline.registry`).

Loaded models live in a `ModelCache` passed in the context, not in the configs: one run frees
each model after use, a batch worker keeps one cache (and its models) from portrait to portrait.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ..imaging import LoadedImage
    from ..nerf.views_input import ViewsInput
    from ..weights import Need

C = TypeVar("C")
T = TypeVar("T")


class ModelCache:
    """Loaded models by name and key, and values derived from them (camera renders), for the
    stages of one run or, with `keep`, of every portrait a batch worker runs. Without `keep` a
    model is loaded at every call (so one run frees the back-view model before the 360-view model
    loads); `loads` counts the loads per model name either way."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.loads: dict[str, int] = {}
        self._models: dict[tuple[Hashable, ...], Any] = {}
        self._values: dict[tuple[Hashable, ...], Any] = {}

    def model(self, name: str, key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
        """The model `name` at `key` (its location, device, dtype, options), loaded by `load` unless kept."""
        full_key = (name, *key)
        if full_key in self._models:
            return self._models[full_key]
        loaded = load()
        self.loads[name] = self.loads.get(name, 0) + 1
        if self.keep:
            self._models[full_key] = loaded
        return loaded

    def known(self, key: tuple[Hashable, ...]) -> Any | None:
        """The value kept at `key`, or None when none is."""
        return self._values.get(key)

    def value(self, key: tuple[Hashable, ...], compute: Callable[[], T]) -> T:
        """A value computed once per cache (a folder of camera renders), kept whatever `keep` is."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


@dataclass
class StageContext(Generic[C]):
    """What a stage sees of its run: the folder, the input, the device, its own config and the
    model cache. The input is a portrait (`image`) or, in a run of imported views, a views folder
    (`views_input`; `image` is None there)."""

    run_dir: Path
    image: LoadedImage | None
    device: str
    dtype: str
    progress: bool
    config: C  # the stage's own config (RunConfig.of(stage)); None for a stage without one
    seed: int = 42
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # run.json's stage records
    note: Callable[[str], None] = lambda message: None
    views_input: ViewsInput | None = None  # the checked views folder of a `dp360 fit` run
    # name -> the stages of this run that provide its results instead (`Stage.provides`)
    providers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the names of the stages of this kind of run, in order (the report lists them)
    stage_names: tuple[str, ...] = ()
    models: ModelCache = field(default_factory=ModelCache)

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
class Stage(Generic[C]):
    name: str
    folder: str  # relative to the run folder
    description: str
    settings: Callable[[StageContext[C]], dict[str, Any]]  # the settings that enter its key
    inputs: Callable[[StageContext[C]], dict[str, str]]  # sha256 of every file it reads
    build: Callable[[StageContext[C], Path], dict[str, Any]]  # fills a staging folder, returns a summary
    # the key of its config in RunConfig (several stages may share one: fit, render and export
    # read the field's); None: it reads none
    config: str | None = None
    check: Callable[[StageContext[C]], Unavailable | None] = _always
    resolve: Callable[[StageContext[C]], None] = _nothing  # finds or makes what `check` looks for
    needs: tuple[str, ...] = ()  # stages whose results it reads
    # weight files it reads from dp360's cache, fetched before any stage runs (user-given
    # locations such as --weights-dir are not listed: dp360 never writes there)
    weights: Callable[[StageContext[C]], tuple[Need, ...]] = _no_weights
    version: int = 1  # bump when the stage's code changes what it writes
    shared_folder: bool = False  # several stages write into the folder: replace only own files
    # stages whose results it makes in their place, for the stages that need those (importing
    # views provides what the views stage would have made)
    provides: tuple[str, ...] = ()
