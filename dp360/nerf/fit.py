"""Fitting a radiance field to the generated views with nerfstudio, used as a library.

The method, "dp360-head" (nerfacto for a head on an orbit of exact cameras), is defined once in
`method.py` (`head_config`) and registered with nerfstudio by `plugin.py`, so nerfstudio's own
commands (`ns-viewer`, `ns-render`, `ns-export`, `ns-train dp360-head`) work on a run's field.

Run layout (nerfstudio's own, under `nerf/`): `dp360/dp360-head/fit/config.yml` and
`.../nerfstudio_models/step-*.ckpt`, plus our `fit.json` (settings, background, timings). Runs
made before the method was registered used `dp360/nerfacto-head/fit/`; `load_field` still reads
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Dp360Error

FIT_FILE = "fit.json"
MAX_FIT_ITERATIONS = 1_000_000
EXPERIMENT, METHOD, TIMESTAMP = "dp360", "dp360-head", "fit"
SPLAT_METHOD = "dp360-splat"  # `--field splatfacto` (splat.py); its folder replaces METHOD's
LEGACY_METHODS = ("nerfacto-head",)  # the method's folder name in runs of dp360 before its registration


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
    # The head lives in PanoHead's +-0.5 box; the cameras sit at 2.7 from its centre.
    near: float = 1.9
    far: float = 3.5
    scene_half_size: float = 0.5
    background: str = "auto"  # auto (from the views' borders) | white | black
    seed: int = 42
    appearance_embedding: bool = False  # one appearance for all views: they show one head
    # The field starts as a faint fog the colour head can learn through (nerfacto's 0.01 leaves
    # every ray transparent, so the only colour gradient is the background's, which saturates it).
    init_density: float = 1.0
    # Training composites a random colour behind the views' foreground (a mask of the plain border
    # colour, flood-filled from the image edges), so a transparent head is always wrong and the
    # colour head always learns the true colour, whatever the background's colour.
    random_background: bool = True
    # The learning rate decays over this many steps whatever the fit's length (a horizon tied to a
    # short fit's iterations drops it before the colours are learnt), after a short warm-up.
    lr_decay_steps: int = 20_000
    lr_warmup_steps: int = 20
    # Share of each ray batch drawn from the views' foreground (their alpha, dilated); the rest is
    # drawn uniformly, so the empty space around the head is still learnt. A short fit otherwise
    # spends two thirds of its rays on the plain background (measured +0.6 dB held-out, same cost).
    foreground_ray_share: float = 0.75

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
        check_int("the learning-rate decay steps", self.lr_decay_steps, 1, 100_000_000)
        check_int("the learning-rate warm-up steps", self.lr_warmup_steps, 0, 100_000_000)
        if not (1e-6 <= self.init_density <= 1e4):
            raise Dp360Error(f"The initial density must be between 1e-06 and 10000, not {self.init_density!r}.")
        if self.background not in ("auto", "white", "black"):
            raise Dp360Error(f"The fit background must be auto, white or black, not {self.background!r}.")
        if not (0.0 <= self.foreground_ray_share <= 1.0):
            raise Dp360Error(
                f"The foreground share of the rays must be between 0 and 1, not {self.foreground_ray_share!r}."
            )


@contextlib.contextmanager
def nerfstudio_quietly() -> Iterator[None]:
    """nerfstudio prints its log to stdout; keep stdout for dp360's --json summaries."""
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        yield


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


def border_colour(views_dir: Path) -> np.ndarray:
    """Median colour (0..1) of the one-pixel borders of the view images."""
    transforms = json.loads((Path(views_dir) / "transforms.json").read_text())
    return border_colour_of(Path(views_dir) / frame["file_path"] for frame in transforms["frames"])


def border_colour_of(images: Iterable[Path]) -> np.ndarray:
    """Median colour (0..1) of the one-pixel borders of these images."""
    from PIL import Image

    samples = []
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        samples.append(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))
    return np.median(np.concatenate(samples), axis=0)


# A pixel belongs to the plain background when every channel is within this of the border colour
# (generated views carry a little noise) and it connects to the image's edge through such pixels.
BACKGROUND_TOLERANCE = 0.06
# Below this share of border pixels near their median colour, a view has no plain background
# (a capture, a scene): it is then all foreground.
PLAIN_BORDER_SHARE = 0.9


def foreground_alpha(pixels: np.ndarray, background: Sequence[float] | None = None) -> np.ndarray:
    """(H, W) uint8 alpha of a view: 0 on the plain background around the head, 255 elsewhere.

    The background is the region of pixels close to the border colour that touches the image's
    edges (a flood fill), so head pixels that happen to share the background's colour stay opaque.
    A view whose border is not one plain colour is all foreground."""
    from scipy import ndimage

    rgb = np.asarray(pixels, dtype=np.float32)[..., :3] / 255
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0) if background is None else np.asarray(background, dtype=np.float32)
    if (np.abs(border - colour).max(axis=-1) <= BACKGROUND_TOLERANCE).mean() < PLAIN_BORDER_SHARE:
        return np.full(rgb.shape[:2], 255, np.uint8)
    near = np.abs(rgb - colour).max(axis=-1) <= BACKGROUND_TOLERANCE
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background_mask = np.isin(labels, edge_labels[edge_labels > 0])
    return np.where(background_mask, 0, 255).astype(np.uint8)


def resolve_background(views_dir: Path, setting: str) -> list[float]:
    if setting == "white":
        return [1.0, 1.0, 1.0]
    if setting == "black":
        return [0.0, 0.0, 0.0]
    if setting != "auto":
        raise Dp360Error(f"background must be auto, white or black, not {setting!r}.")
    return [round(float(x), 4) for x in border_colour(views_dir)]


def _check_views(views_dir: Path) -> None:
    if not (Path(views_dir) / "transforms.json").is_file():
        raise Dp360Error(
            f"{views_dir} has no transforms.json; generate views first (`dp360 views`), or point at a folder of images with nerfstudio cameras."
        )


# -- the fit's health --------------------------------------------------------------------------------
# A fit is unhealthy when its colour head has saturated (the field's own colour pinned at 0 or 1 on
# rays where the views show something else: a black head) or when it leaves the views' foreground
# transparent (a hazy head). Checked on a few training cameras at a small size, during the fit
# (saturation only: a young field is still transparent) and after it.
HEALTH_CAMERAS, HEALTH_SIZE = 4, 48
MAX_SATURATED_SHARE = 0.5  # of the foreground rays
MIN_FOREGROUND_OPACITY = 0.7  # mean accumulation over the foreground rays, after the fit
HEALTH_CHECKS_DURING = (0.25, 0.5)  # fractions of the fit's iterations
# A field is still forming in a shorter fit (tiny test runs): its opacity is recorded, not judged.
MIN_JUDGED_ITERATIONS = 100


@torch.no_grad()
def field_health(model, dataparser_outputs, background: Sequence[float]) -> dict[str, float]:
    """The field's opacity and colour saturation on the views' foreground (`foreground_alpha`), seen
    from a few training cameras: `foreground_opacity` (mean accumulation), `saturated_share` (rays
    whose own colour, the render less the background, is within 0.01 of 0 or 1 in every channel
    where the view's colour is more than 0.1 away from it)."""
    from PIL import Image

    cameras_all, filenames = dataparser_outputs.cameras, dataparser_outputs.image_filenames
    picked = np.unique(np.linspace(0, len(filenames) - 1, min(HEALTH_CAMERAS, len(filenames))).round().astype(int))
    was_training = model.training
    model.eval()
    opacity, saturated, count = 0.0, 0.0, 0
    colour = torch.tensor([float(x) for x in background])
    try:
        for index in picked:
            camera = cameras_all[int(index) : int(index) + 1]
            camera.rescale_output_resolution(min(1.0, HEALTH_SIZE / float(camera.width.max())))
            height, width = int(camera.height.item()), int(camera.width.item())
            pixels = np.asarray(Image.open(filenames[index]).convert("RGB").resize((width, height), Image.NEAREST))
            alpha = foreground_alpha(pixels, background)
            foreground = torch.from_numpy(alpha > 0)
            # a view without a plain background (a capture) is all foreground: nothing to judge
            # opacity by, the field need not be opaque where the scene lies beyond its box
            if foreground.all() or not foreground.any():
                continue
            outputs = model.get_outputs_for_camera(camera.to(model.device))
            accumulation = outputs["accumulation"].reshape(height, width).float().cpu()
            rgb = outputs["rgb"].reshape(height, width, 3).float().cpu()
            own = ((rgb - (1 - accumulation[..., None]) * colour) / accumulation[..., None].clamp_min(1e-3)).clamp(0, 1)
            truth = torch.from_numpy(pixels.astype(np.float32) / 255)
            pinned = ((own <= 0.01) | (own >= 0.99)).all(-1) & ((own - truth).abs().max(-1).values > 0.1)
            visible = foreground & (accumulation > 0.05)  # a transparent ray shows no colour to judge
            opacity += float(accumulation[foreground].sum())
            saturated += float(pinned[visible].sum()) if visible.any() else 0.0
            count += int(foreground.sum())
    finally:
        model.train(was_training)
    if count == 0:
        return {"foreground_opacity": None, "saturated_share": None, "foreground_rays": 0}
    return {
        "foreground_opacity": round(opacity / count, 4),
        "saturated_share": round(saturated / count, 4),
        "foreground_rays": count,
    }


def check_health(health: dict[str, float], step: int, iterations: int, final: bool) -> None:
    """Raise one sentence with the numbers when the field has collapsed (see `field_health`)."""
    advice = (
        "the views may not show one consistent head on a plain background; check them, or refit with another "
        "--seed or more --fit-iterations"
    )
    saturated, opacity = health.get("saturated_share"), health.get("foreground_opacity")
    if saturated is not None and saturated > MAX_SATURATED_SHARE:
        raise Dp360Error(
            f"The radiance field collapsed at step {step} of {iterations}: its colour head is saturated on "
            f"{saturated:.0%} of the head's rays (at most {MAX_SATURATED_SHARE:.0%} is healthy), so it would render a "
            f"black or white head (foreground opacity {opacity:.2f}); {advice}."
        )
    if final and iterations >= MIN_JUDGED_ITERATIONS and opacity is not None and opacity < MIN_FOREGROUND_OPACITY:
        raise Dp360Error(
            f"The radiance field is hazy after {iterations} steps: the head is only {opacity:.0%} opaque inside the "
            f"views' foreground (at least {MIN_FOREGROUND_OPACITY:.0%} is healthy), so its renders and mesh would be "
            f"see-through; {advice}."
        )


def train(
    config, out_dir: Path, settings: FitSettings, device: str, progress: bool, description: str
) -> tuple[Any, dict[str, Any]]:
    """Runs nerfstudio's trainer of `config` into `out_dir` for `settings.iterations` steps as
    `Trainer.train` does (the model's training callbacks around every step: nerfacto's proposal
    annealing, splatfacto's densification), under dp360's progress bar, with one checkpoint after
    the loop. Returns the trainer and the fit's seconds and first and last losses."""
    from tqdm.auto import tqdm

    config.output_dir, config.experiment_name, config.timestamp = Path(out_dir), EXPERIMENT, TIMESTAMP
    config.steps_per_save, config.vis = 10**9, "tensorboard"  # one checkpoint, written after the loop
    # nerfstudio draws from all three generators (weights, pixel sampling, image caching).
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    with deterministic_on(device):
        with nerfstudio_quietly():
            trainer = config.setup(local_rank=0, world_size=1)
            trainer.setup()
            config.save_config()
        from nerfstudio.engine.callbacks import TrainingCallbackLocation

        before, after = TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, TrainingCallbackLocation.AFTER_TRAIN_ITERATION
        start = time.perf_counter()
        losses = []
        trainer.pipeline.train()
        model, parsed = trainer.pipeline.model, trainer.pipeline.datamanager.train_dataparser_outputs
        background = [float(x) for x in model.background_rgb.cpu()]
        checks = {max(1, round(settings.iterations * share)) for share in HEALTH_CHECKS_DURING}
        check_seconds = 0.0
        for step in tqdm(range(settings.iterations), desc=description, disable=not progress, leave=False):
            for callback in trainer.callbacks:
                callback.run_callback_at_location(step, location=before)
            loss, _, _ = trainer.train_iteration(step)
            for callback in trainer.callbacks:
                callback.run_callback_at_location(step, location=after)
            losses.append(loss.item())
            if step + 1 in checks and step + 1 < settings.iterations:
                tick = time.perf_counter()
                check_health(field_health(model, parsed, background), step + 1, settings.iterations, final=False)
                check_seconds += time.perf_counter() - tick
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fit_seconds = time.perf_counter() - start - check_seconds
        health = field_health(model, parsed, background)
        check_health(health, settings.iterations, settings.iterations, final=True)
    with nerfstudio_quietly():
        trainer.save_checkpoint(max(settings.iterations - 1, 0))
    return trainer, {
        "fit_seconds": round(fit_seconds, 2),
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)] if losses else None,
        "health": health,
    }


def write_fit(
    trainer, config, views_dir: Path, out_dir: Path, final_dir: Path | None, settings: FitSettings, summary: dict
) -> dict[str, Any]:
    """nerfstudio's config.yml pointing at `final_dir` (where the staging `out_dir` is moved
    afterwards), and dp360's fit.json; returns `summary`."""
    if final_dir is not None:
        import yaml

        config.output_dir = Path(final_dir)
        (Path(trainer.base_dir) / "config.yml").write_text(yaml.dump(config), "utf8")
    (Path(out_dir) / FIT_FILE).write_text(
        json.dumps({"settings": settings.key_dict(), "views_dir": str(Path(views_dir).resolve()), **summary}, indent=2)
    )
    return summary


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
    from .method import head_config

    _check_views(views_dir)
    background = resolve_background(views_dir, settings.background)
    config = head_config(settings, device, Path(views_dir).resolve(), background)
    trainer, timing = train(config, out_dir, settings, device, progress, "radiance field")
    summary = {
        "method": METHOD,
        "iterations": settings.iterations,
        **timing,
        "background": background,
        "config": f"{EXPERIMENT}/{METHOD}/{TIMESTAMP}/config.yml",
    }
    return write_fit(trainer, config, views_dir, out_dir, final_dir, settings, summary)


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
    elif not isinstance(settings.get("random_background", False), bool):
        problem = "its random_background setting is not true or false"
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


def _read_fit_checkpoint(path: Path) -> dict[str, Any]:
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


def load_field(nerf_dir: Path, device: str = "cpu", views_dir: Path | None = None) -> LoadedField:
    """The fitted field of a run's `nerf/` folder, ready to render (eval mode). Its files are
    checked before nerfstudio builds anything, and the weights must fill the model exactly."""
    from ..safety import one_line

    nerf_dir = Path(nerf_dir)
    meta_path = nerf_dir / FIT_FILE
    if not meta_path.is_file():
        raise Dp360Error(f"{nerf_dir} holds no fitted field ({FIT_FILE} is missing); run `dp360 reconstruct` first.")
    meta, settings = _read_fit_record(meta_path)
    checkpoints = fit_checkpoints(nerf_dir)
    if not checkpoints:
        raise Dp360Error(f"{nerf_dir} has no nerfstudio checkpoint; rerun the fit stage (`dp360 reconstruct --force`).")
    state = _read_fit_checkpoint(checkpoints[-1])
    views = Path(views_dir) if views_dir is not None else nerf_dir.parent / "views"
    if not (views / "transforms.json").is_file() and meta.get("views_dir"):
        views = Path(meta["views_dir"])
    _check_views(views)
    if meta.get("method") == SPLAT_METHOD:
        from .splat import require_cuda, splat_config

        require_cuda(
            device,
            "This run's field (3D Gaussian splats)",
            "use --device cuda on a CUDA GPU, or rerun `dp360 reconstruct` with --field nerfacto",
        )
        config = splat_config(settings, device, views.resolve(), meta["background"])
    else:
        from .method import head_config

        config = head_config(settings, device, views.resolve(), meta["background"])
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
