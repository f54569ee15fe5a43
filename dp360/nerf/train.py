"""Training a field with nerfstudio's trainer, under dp360's progress bar and health checks, and
writing the fit's record (`fit.json`). Any method's config (nerfacto's, splatfacto's) trains here."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Dp360Error
from .common import EXPERIMENT, FIT_FILE, TIMESTAMP, FitSettings, deterministic_on, foreground_alpha, nerfstudio_quietly

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
    summary = {
        "fit_seconds": round(fit_seconds, 2),
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)] if losses else None,
        "health": health,
    }
    if getattr(trainer.pipeline, "hull_priming", None) is not None:  # part of fit_seconds
        summary["hull_priming"] = trainer.pipeline.hull_priming
    return trainer, summary


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
