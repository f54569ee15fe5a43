"""Fitting a radiance field to the generated views with nerfstudio, used as a library.

Method ("nerfacto-head", registered in `METHODS`): nerfstudio's nerfacto with settings for an
object-centric 360-degree orbit with a plain background and exact cameras:
- the dataparser keeps our world frame as is (no re-orientation, re-centring or auto-scaling),
  so the field, the turntable and the mesh share the frame of `views/transforms.json`;
- a bounded scene box (+-1, the head lives in PanoHead's +-0.5 box) without scene contraction;
- near/far planes around the orbit radius (the cameras sit at 2.7);
- the background colour is that of the views (median of their borders), composited behind
  the field in training and rendering, so the background is not modelled as geometry;
- no camera optimisation (the cameras are exact by construction);
- nerfacto's LPIPS metric is never built (it would download AlexNet weights): the model is
  constructed with the metric class replaced by one that refuses to run.

Run layout (nerfstudio's own, under `nerf/`): `dp360/nerfacto-head/fit/config.yml` and
`.../nerfstudio_models/step-*.ckpt`, plus our `fit.json` (settings, background, timings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Dp360Error

FIT_FILE = "fit.json"
MAX_FIT_ITERATIONS = 1_000_000
EXPERIMENT, METHOD, TIMESTAMP = "dp360", "nerfacto-head", "fit"


# `FitSettings.preset` names -> their overrides of the defaults (gpu)
FIT_PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": dict(
        iterations=600,
        rays_per_batch=1024,
        num_levels=12,
        log2_hashmap_size=17,
        max_res=512,
        proposal_samples=(96, 48),
        num_nerf_samples=32,
    ),
    "test": dict(
        iterations=40,
        rays_per_batch=256,
        num_levels=8,
        log2_hashmap_size=14,
        max_res=128,
        hidden_dim=32,
        proposal_samples=(48, 24),
        num_nerf_samples=16,
    ),
}


@dataclass
class FitSettings:
    """Field-fitting settings; `preset()` gives the GPU default and smaller CPU/test ones."""

    iterations: int = 3000
    rays_per_batch: int = 4096
    num_levels: int = 16
    log2_hashmap_size: int = 19
    max_res: int = 2048
    hidden_dim: int = 64
    num_nerf_samples: int = 48
    proposal_samples: tuple[int, int] = (256, 96)
    near: float = 1.6
    far: float = 3.8
    scene_half_size: float = 1.0
    background: str = "auto"  # auto (from the views' borders) | white | black
    seed: int = 42
    appearance_embedding: bool = False  # one appearance for all views: they show one head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FitSettings:
        if name not in FIT_PRESETS:
            raise Dp360Error(f"Unknown fit preset '{name}'; choose from {', '.join(FIT_PRESETS)}.")
        return cls(**{**FIT_PRESETS[name], **overrides})

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        from ..stage import check_int, check_seed

        check_int("--fit-iterations", self.iterations, 1, MAX_FIT_ITERATIONS)
        check_int("rays per batch", self.rays_per_batch, 1, 1 << 20)
        check_seed(self.seed)
        if self.background not in ("auto", "white", "black"):
            raise Dp360Error(f"The fit background must be auto, white or black, not {self.background!r}.")


class _NoLPIPS(torch.nn.Module):
    """Stands in for torchmetrics' LPIPS inside nerfacto: building the real one downloads
    AlexNet weights; dp360 never evaluates it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def forward(self, *args: Any, **kwargs: Any):
        raise RuntimeError("LPIPS is not available inside dp360's nerfstudio models (no downloads at run time)")


@contextlib.contextmanager
def nerfstudio_quietly() -> Iterator[None]:
    """nerfstudio prints its log to stdout; keep stdout for dp360's --json summaries."""
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def no_download_metrics() -> Iterator[None]:
    # nerfacto imports the metric class from torchmetrics when it builds the model.
    import torchmetrics.image.lpip as lpip_module

    original = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = _NoLPIPS
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original


@contextlib.contextmanager
def deterministic_on(device: str) -> Iterator[None]:
    """On a CPU, the same seed gives the same field bit for bit: the scatter-adds of the hash
    grids' backward pass otherwise sum in a thread-dependent order. CUDA fits stay
    non-deterministic (tiny-cuda-nn and nerfacc have no deterministic kernels)."""
    if device != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def nerfacto_head_config(views_dir: Path, output_dir: Path, settings: FitSettings, device: str):
    """nerfstudio's TrainerConfig for the method (see the module docstring)."""
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.nerfacto import NerfactoModelConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    proposal_args = [
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 128, "use_linear": False},
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 256, "use_linear": False},
    ]
    optimizers = dataclasses.replace(method_configs["nerfacto"]).optimizers
    optimizers = {name: dict(group) for name, group in optimizers.items() if name != "camera_opt"}
    for group in optimizers.values():
        group["scheduler"] = dataclasses.replace(group["scheduler"], max_steps=max(settings.iterations, 1))
    cuda = device.startswith("cuda")
    config = TrainerConfig(
        method_name=METHOD,
        experiment_name=EXPERIMENT,
        timestamp=TIMESTAMP,
        output_dir=Path(output_dir),
        max_num_iterations=settings.iterations,
        mixed_precision=cuda,
        steps_per_save=10**9,
        save_only_latest_checkpoint=True,
        vis="tensorboard",
        pipeline=VanillaPipelineConfig(
            datamanager=VanillaDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(
                    data=Path(views_dir),
                    orientation_method="none",
                    center_method="none",
                    auto_scale_poses=False,
                    scale_factor=1.0,
                    scene_scale=settings.scene_half_size,
                    eval_mode="all",
                ),
                train_num_rays_per_batch=settings.rays_per_batch,
                eval_num_rays_per_batch=settings.rays_per_batch,
            ),
            model=NerfactoModelConfig(
                eval_num_rays_per_chunk=1 << 14,
                near_plane=settings.near,
                far_plane=settings.far,
                background_color="white",  # replaced by the views' colour in `_apply_background`
                disable_scene_contraction=True,
                camera_optimizer=CameraOptimizerConfig(mode="off"),
                num_levels=settings.num_levels,
                log2_hashmap_size=settings.log2_hashmap_size,
                max_res=settings.max_res,
                hidden_dim=settings.hidden_dim,
                num_nerf_samples_per_ray=settings.num_nerf_samples,
                num_proposal_samples_per_ray=tuple(settings.proposal_samples),
                proposal_net_args_list=proposal_args,
                use_appearance_embedding=settings.appearance_embedding,
                average_init_density=0.01,
                proposal_initial_sampler="uniform",  # bounded scene: uniform, not the unbounded piecewise sampler
                implementation="tcnn" if cuda and _has_tcnn() else "torch",
            ),
        ),
        optimizers=optimizers,
    )
    config.machine.device_type = "cuda" if cuda else "cpu"
    config.machine.seed = settings.seed
    return config


def _has_tcnn() -> bool:
    import importlib.util

    return importlib.util.find_spec("tinycudann") is not None


METHODS = {METHOD: nerfacto_head_config}  # one place that registers dp360's field methods


def border_colour(views_dir: Path) -> np.ndarray:
    """Median colour (0..1) of the one-pixel borders of the view images."""
    from PIL import Image

    transforms = json.loads((Path(views_dir) / "transforms.json").read_text())
    samples = []
    for frame in transforms["frames"]:
        pixels = np.asarray(Image.open(Path(views_dir) / frame["file_path"]).convert("RGB"), dtype=np.float32) / 255
        samples.append(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))
    return np.median(np.concatenate(samples), axis=0)


def resolve_background(views_dir: Path, setting: str) -> list[float]:
    if setting == "white":
        return [1.0, 1.0, 1.0]
    if setting == "black":
        return [0.0, 0.0, 0.0]
    if setting != "auto":
        raise Dp360Error(f"background must be auto, white or black, not {setting!r}.")
    return [round(float(x), 4) for x in border_colour(views_dir)]


def _apply_background(pipeline, colour: list[float]) -> None:
    device = next(pipeline.model.parameters()).device
    pipeline.model.renderer_rgb.background_color = torch.tensor(colour, dtype=torch.float32, device=device)


def _check_views(views_dir: Path) -> None:
    if not (Path(views_dir) / "transforms.json").is_file():
        raise Dp360Error(
            f"{views_dir} has no transforms.json; generate views first (`dp360 views`), or point at a folder of images with nerfstudio cameras."
        )


def fit_field(
    views_dir: Path,
    out_dir: Path,
    settings: FitSettings,
    device: str = "cpu",
    progress: bool = True,
    final_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the field on `views_dir` into `out_dir` (a fresh folder). Returns a summary.

    `final_dir`: where `out_dir` will be moved afterwards (a stage's staging folder), so that
    nerfstudio's config.yml points at the final checkpoint folder."""
    from tqdm.auto import tqdm

    _check_views(views_dir)
    config = METHODS[METHOD](Path(views_dir).resolve(), Path(out_dir), settings, device)
    background = resolve_background(views_dir, settings.background)
    # nerfstudio draws from all three generators (weights, pixel sampling, image caching).
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    with deterministic_on(device):
        with no_download_metrics(), nerfstudio_quietly():
            trainer = config.setup(local_rank=0, world_size=1)
            trainer.setup()
            config.save_config()
        _apply_background(trainer.pipeline, background)
        start = time.perf_counter()
        losses = []
        trainer.pipeline.train()
        for step in tqdm(range(settings.iterations), desc="radiance field", disable=not progress, leave=False):
            loss, _, _ = trainer.train_iteration(step)
            losses.append(loss.item())
        fit_seconds = time.perf_counter() - start
    with nerfstudio_quietly():
        trainer.save_checkpoint(max(settings.iterations - 1, 0))
    if final_dir is not None:
        import yaml

        config.output_dir = Path(final_dir)
        (Path(trainer.base_dir) / "config.yml").write_text(yaml.dump(config), "utf8")
    summary = {
        "method": METHOD,
        "iterations": settings.iterations,
        "fit_seconds": round(fit_seconds, 2),
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)] if losses else None,
        "background": background,
        "config": f"{EXPERIMENT}/{METHOD}/{TIMESTAMP}/config.yml",
    }
    (Path(out_dir) / FIT_FILE).write_text(
        json.dumps({"settings": settings.key_dict(), "views_dir": str(Path(views_dir).resolve()), **summary}, indent=2)
    )
    return summary


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
    "near": (0.0, 1e4),  # 1.6
    "far": (0.0, 1e4),  # 3.8
    "scene_half_size": (1e-6, 1e4),  # 1.0
    "seed": (-(2**63), 2**64 - 1),  # 42
}
REFIT = "rerun the fit stage with `dp360 reconstruct --force`"


def _read_fit_record(meta_path: Path) -> tuple[dict[str, Any], FitSettings]:
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
    if "proposal_samples" in settings:
        settings["proposal_samples"] = tuple(settings["proposal_samples"])
    return meta, FitSettings(**settings)


def _read_fit_checkpoint(path: Path) -> dict[str, Any]:
    """A nerfstudio checkpoint read with weights_only (plus the numpy scalars nerfstudio's trainer
    stores next to the tensors), checked to hold pipeline weights and a step."""
    import numpy.core.multiarray as multiarray

    from ..safety import load_tensors

    numpy_types = [multiarray.scalar, np.dtype] + [
        type(np.dtype(kind)) for kind in (np.float64, np.float32, np.int64, np.int32, np.bool_)
    ]
    state = load_tensors(path, REFIT, safe_globals=numpy_types)
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


def load_field(nerf_dir: Path, device: str = "cpu", views_dir: Path | None = None) -> LoadedField:
    """The fitted field of a run's `nerf/` folder, ready to render (eval mode). Its files are
    checked before nerfstudio builds anything, and the weights must fill the model exactly."""
    from ..safety import one_line

    nerf_dir = Path(nerf_dir)
    meta_path = nerf_dir / FIT_FILE
    if not meta_path.is_file():
        raise Dp360Error(f"{nerf_dir} holds no fitted field ({FIT_FILE} is missing); run `dp360 reconstruct` first.")
    meta, settings = _read_fit_record(meta_path)
    checkpoints = sorted((nerf_dir / EXPERIMENT / METHOD / TIMESTAMP / "nerfstudio_models").glob("step-*.ckpt"))
    if not checkpoints:
        raise Dp360Error(f"{nerf_dir} has no nerfstudio checkpoint; rerun the fit stage (`dp360 reconstruct --force`).")
    state = _read_fit_checkpoint(checkpoints[-1])
    views = Path(views_dir) if views_dir is not None else nerf_dir.parent / "views"
    if not (views / "transforms.json").is_file() and meta.get("views_dir"):
        views = Path(meta["views_dir"])
    _check_views(views)
    config = METHODS[METHOD](views.resolve(), nerf_dir, settings, device)
    with no_download_metrics(), nerfstudio_quietly():
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
    _apply_background(pipeline, meta["background"])
    return LoadedField(pipeline, settings, meta["background"], device, meta)
