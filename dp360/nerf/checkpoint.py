"""Reading a fitted field back: its record (`fit.json`, every value bounded), nerfstudio's
checkpoint (weights only), and the strict load of both into a pipeline ready to render."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import layout
from ..errors import Dp360Error
from .common import (
    EXPERIMENT,
    FIT_FILE,
    LEGACY_METHODS,
    METHOD,
    SPLAT_METHOD,
    TIMESTAMP,
    FitSettings,
    check_views_folder,
    nerfstudio_quietly,
)


@dataclass
class LoadedField:
    pipeline: Any
    settings: FitSettings
    background: list[float]
    device: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self):
        return self.pipeline.model


# A run's fit.json, bounded before nerfstudio builds anything from it (a hostile value would
# otherwise allocate a huge hash grid or ray batch); the GPU preset's values in comments.
FIT_BOUNDS = {
    "iterations": (0, 10_000_000),  # 3000
    "rays_per_batch": (1, 1 << 20),  # 4096
    "num_levels": (1, 64),  # 16
    "log2_hashmap_size": (1, 26),  # 19
    "max_res": (1, 1 << 16),  # 2048
    "hidden_dim": (1, 1024),  # 64
    "num_nerf_samples": (1, 4096),  # 48
    "proposal_samples": (1, 4096),  # (256, 96)
    "near": (0.0, 1e4),  # 1.9
    "far": (0.0, 1e4),  # 3.5
    "scene_half_size": (1e-6, 1e4),  # 0.5
    "init_density": (1e-6, 1e4),  # 1.0
    "lr_decay_steps": (1, 100_000_000),  # 20000
    "lr_warmup_steps": (0, 100_000_000),  # 20
    "foreground_ray_share": (0.0, 1.0),  # 0.75
    "hull_prime_steps": (0, 1_000_000),  # 200
    "hull_density": (1e-3, 1e6),  # 300
    "seed": (-(2**63), 2**64 - 1),  # 42
}
REFIT = "rerun the fit stage with `dp360 reconstruct --force`"


def read_fit_record(meta_path: Path) -> tuple[dict[str, Any], FitSettings]:
    """fit.json as (record, settings), every value checked for type and bounds."""
    from ..safety import check_bounds, read_json_object

    meta = read_json_object(meta_path, REFIT)
    settings = meta.get("settings")
    names = {item.name for item in dataclasses.fields(FitSettings)}
    colour = meta.get("background")
    if not isinstance(settings, dict) or not set(settings) <= names:
        problem = "its settings are not an object of fit settings"
    elif not isinstance(colour, list) or len(colour) != 3:
        problem = "its background is not a list of three colour values"
    elif settings.get("background", "auto") not in ("auto", "white", "black"):
        problem = "its background setting is not auto, white or black"
    elif not isinstance(settings.get("appearance_embedding", False), bool):
        problem = "its appearance_embedding setting is not true or false"
    elif not isinstance(settings.get("random_background", False), bool):
        problem = "its random_background setting is not true or false"
    elif not isinstance(settings.get("view_dependent_colour", False), bool):
        problem = "its view_dependent_colour setting is not true or false"
    elif not (isinstance(samples := settings.get("proposal_samples", [0, 0]), list) and len(samples) == 2):
        problem = "its proposal_samples setting is not two sample counts"
    elif not isinstance(meta.get("views_dir", ""), str):
        problem = "its views_dir is not a path"
    else:
        problem = None
    if problem:
        raise Dp360Error(f"'{meta_path}' is not a fit record dp360 can use ({problem}); {REFIT}.")
    check_bounds(settings, FIT_BOUNDS, f"'{meta_path}'", REFIT, nullable=())
    check_bounds({"background": colour}, {"background": (0.0, 1.0)}, f"'{meta_path}'", REFIT, nullable=())
    settings = dict(settings)
    # fits recorded before the setting existed had nerfacto's view-dependent colour head
    settings.setdefault("view_dependent_colour", True)
    if "proposal_samples" in settings:
        settings["proposal_samples"] = tuple(settings["proposal_samples"])
    return meta, FitSettings(**settings)


def checkpoint_numpy_globals() -> list[Any]:
    """The numpy scalar types nerfstudio's trainer stores next to the tensors of a checkpoint (its
    schedulers' learning rates): what `torch.load(weights_only=True)` must allow to read one."""
    import numpy.core.multiarray as multiarray

    return [multiarray.scalar, np.dtype] + [
        type(np.dtype(kind)) for kind in (np.float64, np.float32, np.int64, np.int32, np.bool_)
    ]


def run_folder(nerf_dir: Path) -> Path:
    """nerfstudio's folder of the fit in a run's `nerf/` (config.yml, nerfstudio_models/): this
    version's, or that of a splat fit (`--field splatfacto`) or of a run made before the method was
    registered, when only that exists."""
    folder = Path(nerf_dir) / EXPERIMENT / METHOD / TIMESTAMP
    for legacy in (SPLAT_METHOD, *LEGACY_METHODS):
        old = Path(nerf_dir) / EXPERIMENT / legacy / TIMESTAMP
        if not folder.is_dir() and old.is_dir():
            return old
    return folder


def is_splat_fit(nerf_dir: Path) -> bool:
    """Whether a run's `nerf/` holds a splat field (its fit.json names dp360-splat)."""
    try:
        return json.loads((Path(nerf_dir) / FIT_FILE).read_text()).get("method") == SPLAT_METHOD
    except (OSError, ValueError, AttributeError):
        return False


def fit_checkpoints(nerf_dir: Path) -> list[Path]:
    return sorted((run_folder(nerf_dir) / "nerfstudio_models").glob("step-*.ckpt"))


def read_fit_checkpoint(path: Path) -> dict[str, Any]:
    """A nerfstudio checkpoint read with weights_only (plus the numpy scalars nerfstudio's trainer
    stores next to the tensors), checked to hold pipeline weights and a step."""
    from ..safety import load_tensors

    state = load_tensors(path, REFIT, safe_globals=checkpoint_numpy_globals())
    pipeline = state.get("pipeline") if isinstance(state, dict) else None
    step = state.get("step") if isinstance(state, dict) else None
    if (
        not isinstance(pipeline, dict)
        or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in pipeline.items())
        or isinstance(step, bool)
        or not isinstance(step, int)
    ):
        raise Dp360Error(f"'{path}' is not a nerfstudio checkpoint (no pipeline weights and step); {REFIT}.")
    return state


# (settings, device, views folder, background) -> the nerfstudio TrainerConfig of a field method
ConfigBuilder = Callable[[FitSettings, str, Path, Sequence[float]], Any]


def load_fitted(nerf_dir: Path, device: str, views_dir: Path | None, build_config: ConfigBuilder) -> LoadedField:
    """The fitted field of a run's `nerf/` folder, built by `build_config` (its method's), ready to
    render (eval mode). Its files are checked before nerfstudio builds anything, and the weights
    must fill the model exactly."""
    from ..safety import one_line

    nerf_dir = Path(nerf_dir)
    meta, settings = read_fit_record(nerf_dir / FIT_FILE)
    checkpoints = fit_checkpoints(nerf_dir)
    if not checkpoints:
        raise Dp360Error(f"{nerf_dir} has no nerfstudio checkpoint; rerun the fit stage (`dp360 reconstruct --force`).")
    state = read_fit_checkpoint(checkpoints[-1])
    views = fit_views_dir(nerf_dir, meta, views_dir)
    config = build_config(settings, device, views.resolve(), meta["background"])
    with nerfstudio_quietly():
        pipeline = config.pipeline.setup(device=device, test_mode="inference")
    try:
        # nerfstudio's load_pipeline, but strict: its default quietly keeps random weights for
        # whatever the checkpoint lacks.
        pipeline.model.update_to_step(state["step"])
        pipeline.load_state_dict(
            {key.removeprefix("module."): value for key, value in state["pipeline"].items()}, strict=True
        )
    except RuntimeError as error:
        details = " ".join(line.strip() for line in str(error).splitlines()[1:]) or str(error)
        raise Dp360Error(f"'{checkpoints[-1]}' does not fit this run's field ({one_line(details)}); {REFIT}.") from None
    pipeline.eval()
    return LoadedField(pipeline, settings, meta["background"], device, meta)


def fit_views_dir(nerf_dir: Path, meta: dict[str, Any], views_dir: Path | None = None) -> Path:
    """The views a field was fitted to: `views_dir`, else the run's `views/`, else the folder its
    record names (a `dp360 fit` of views elsewhere); checked to hold a transforms.json."""
    views = Path(views_dir) if views_dir is not None else Path(nerf_dir).parent / layout.VIEWS
    if not (views / "transforms.json").is_file() and meta.get("views_dir"):
        views = Path(meta["views_dir"])
    check_views_folder(views)
    return views


def fit_method(nerf_dir: Path) -> str | None:
    """The method name a run's `nerf/` records (fit.json), or None when it has no readable record."""
    meta_path = Path(nerf_dir) / FIT_FILE
    if not meta_path.is_file():
        return None
    return read_fit_record(meta_path)[0].get("method")
