"""dp360's radiance-field method, "dp360-head", as nerfstudio classes and one config builder.

`head_config` is the one definition of the method: `dp360 reconstruct` fits with it (fit.py),
`load_field` rebuilds it from a run's fit.json, and the plugin (plugin.py, entry point
`nerfstudio.method_configs`) registers it with nerfstudio, so `ns-train dp360-head`,
`ns-viewer`, `ns-render` and `ns-export` use the same settings.

The method is nerfstudio's nerfacto with settings for an object-centric 360-degree orbit with a
plain background and exact cameras:
- the dataparser keeps our world frame as is (no re-orientation, re-centring or auto-scaling),
  so the field, the turntable and the mesh share the frame of `views/transforms.json`;
- a bounded scene box (PanoHead's +-0.5 box, where its heads live) without scene contraction;
- near/far planes around the orbit radius (the cameras sit at 2.7);
- the background colour is that of the views, composited behind the field in rendering: a dp360
  fit writes the colour into the model config (`background_rgb`); when it is unset
  (`ns-train dp360-head --data ...`), the pipeline takes the median colour of the training
  images' borders;
- training composites a random colour behind both the field and the views' foreground (an alpha
  from the plain border colour, `HeadDataset`), so a transparent head is always wrong and the
  colour head always learns the views' colours, whatever their background: with a fixed
  background brighter than the head, an almost empty field and Adam's full-size first steps
  saturated the colour head within 20 steps (a black, hazy head);
- each ray batch draws 75 % of its rays from the views' foreground (`ForegroundPixelSampler`)
  and the rest from every pixel, so a short fit spends its rays on the head;
- a starting density the colour head can learn through (1.0, not nerfacto's 0.01), and a
  learning rate that warms up and decays over a horizon of its own, not the fit's length;
- before the first step, the field's density is fitted to the views' visual hull (hull.py, a
  pipeline callback, so `ns-train` does it too): the fit starts from a surface where the head is,
  not from a fog that stays a shell several cm thick for hundreds of steps;
- a colour head that ignores the viewing direction: the views show one head under one light,
  and a camera above or below their orbit would otherwise get untrained colours;
- no camera optimisation (the cameras are exact by construction);
- nerfacto's LPIPS metric is never built (it would download AlexNet weights): the model is
  constructed with the metric class replaced by a stand-in, and reports PSNR and SSIM only.

This module imports nerfstudio at the top; dp360's CLI imports it lazily.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.pixel_samplers import PixelSampler, PixelSamplerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from .common import METHOD, FitSettings, border_colour_of, foreground_alpha

DESCRIPTION = (
    "dp360's head field: nerfacto for a 360-degree orbit of exact cameras around a bounded head on a plain "
    "background (world frame kept, no scene contraction, no camera optimisation, background from the views)."
)


class _NoLPIPS(torch.nn.Module):
    """Stands in for torchmetrics' LPIPS inside nerfacto: building the real one downloads
    AlexNet weights. It returns NaN, and `HeadModel` leaves it out of its metrics."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(float("nan"))


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


class HeadDataset(InputDataset):
    """The views with an alpha channel: 0 on the plain background around the head (the border
    colour's region, flood-filled from the edges; `fit.foreground_alpha`), so that training can
    composite random colours behind the head. An image with its own alpha keeps it."""

    def get_numpy_image(self, image_idx: int) -> np.ndarray:
        image = super().get_numpy_image(image_idx)
        if image.shape[-1] == 4:
            return image
        return np.concatenate([image, foreground_alpha(image)[..., None]], axis=-1)


class ForegroundPixelSampler(PixelSampler):
    """nerfstudio's pixel sampler, drawing `foreground_share` of each batch from the views'
    foreground (alpha from `HeadDataset`, dilated by 2 px so the silhouette's edge is in it) and
    the rest uniformly from every pixel. Images without an alpha, or a batch with nerfstudio's
    own masks, are sampled as nerfstudio does."""

    config: ForegroundPixelSamplerConfig

    def collate_image_dataset_batch(self, batch, num_rays_per_batch, keep_full_image=False):
        image = batch["image"]
        self._alpha = image[..., 3] if image.shape[-1] == 4 else None
        try:
            return super().collate_image_dataset_batch(batch, num_rays_per_batch, keep_full_image)
        finally:
            self._alpha = None

    def sample_method(self, batch_size, num_images, image_height, image_width, mask=None, device="cpu"):
        alpha = getattr(self, "_alpha", None)
        share = self.config.foreground_share
        if alpha is None or mask is not None or share <= 0:
            return super().sample_method(batch_size, num_images, image_height, image_width, mask=mask, device=device)
        key = (alpha.data_ptr(), tuple(alpha.shape), float(alpha.sum()))  # a new batch in the same memory differs
        if getattr(self, "_foreground_key", None) != key:  # the cached images: computed once
            foreground = torch.nn.functional.max_pool2d((alpha > 0.5).float()[:, None], 5, stride=1, padding=2)
            self._foreground_key, self._foreground_pixels = key, foreground.flatten().nonzero()[:, 0]
        foreground_pixels = self._foreground_pixels
        if len(foreground_pixels) == 0:
            return super().sample_method(batch_size, num_images, image_height, image_width, mask=mask, device=device)
        # a mixture: each ray from the foreground with probability `share`, else from any pixel
        # (index draws, not torch.multinomial, which stops at 2^24 pixels)
        from_foreground = torch.rand(batch_size, device=foreground_pixels.device) < share
        pixels = image_height * image_width
        flat = torch.randint(num_images * pixels, (batch_size,), device=foreground_pixels.device)
        picks = torch.randint(len(foreground_pixels), (int(from_foreground.sum()),), device=foreground_pixels.device)
        flat[from_foreground] = foreground_pixels[picks]
        rows, cols = (flat % pixels) // image_width, flat % image_width
        return torch.stack([flat // pixels, rows, cols], dim=-1).to(device)


@dataclass
class ForegroundPixelSamplerConfig(PixelSamplerConfig):
    _target: type = field(default_factory=lambda: ForegroundPixelSampler)
    foreground_share: float = 0.75
    """Share of each batch's rays drawn from the views' foreground."""


class HeadDataManager(VanillaDataManager[HeadDataset]):
    """nerfstudio's ray-batch data manager over `HeadDataset`."""


@dataclass
class HeadDataManagerConfig(VanillaDataManagerConfig):
    _target: type = field(default_factory=lambda: HeadDataManager)


@dataclass
class HeadModelConfig(NerfactoModelConfig):
    """nerfacto with the views' background colour and without LPIPS."""

    _target: type = field(default_factory=lambda: HeadModel)
    background_rgb: Optional[tuple[float, float, float]] = None
    """Background colour (0..1) composited behind the field; None: the median colour of the
    training images' borders."""
    random_background: bool = True
    """In training, composite a random colour behind both the field and the views' foreground (their
    alpha, from `HeadDataset`), so that every background colour drives the colour head; renders
    and evaluation use `background_rgb`."""
    view_dependent_colour: bool = True
    """Whether the colour head sees the viewing direction (nerfacto's does; dp360's fits turn it off,
    `FitSettings.view_dependent_colour`: the views show one head under one light)."""
    hull_prime_steps: int = 0
    """Before the first training step, fit the field's density for this many steps to `hull_density`
    inside the training views' visual hull and to zero outside it (hull.py); 0: no priming."""
    hull_density: float = 300.0


def _no_direction(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """A forward hook on the field's direction encoding: the colour head sees no direction (the
    encoding keeps its place, so checkpoints keep their keys and shapes)."""
    return torch.zeros_like(output)


class WithoutLpips:
    """A model mixin: its evaluation metrics without LPIPS (built as a stand-in that never
    downloads AlexNet, see `no_download_metrics`, and whose NaN would pollute the logs)."""

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        metrics.pop("lpips", None)
        return metrics, images


class HeadModel(WithoutLpips, NerfactoModel):
    config: HeadModelConfig

    def populate_modules(self) -> None:
        with no_download_metrics():
            super().populate_modules()
        if self.config.background_rgb is not None:
            self.set_background(self.config.background_rgb)
        if not self.config.view_dependent_colour:
            self.field.direction_encoding.register_forward_hook(_no_direction)

    def prime_to_hull(self, dataset: InputDataset, seed: int, steps: int | None = None) -> dict[str, Any]:
        """Primes the field's density to the visual hull of `dataset`'s views (hull.py) for `steps`
        (the config's `hull_prime_steps` when None); returns what was done, for the fit's record.
        A hull filling most of the scene box (views without a plain background) says nothing, and
        the field is left as it is."""
        from .hull import MAX_HULL_SHARE, prime_density, views_hull

        start = time.perf_counter()
        hull = views_hull(dataset, float(self.scene_box.aabb.abs().max()))
        record: dict[str, Any] = {"hull_share": round(hull.volume_share, 4), "steps": 0}
        if hull.volume_share <= MAX_HULL_SHARE:
            device = next(self.field.parameters()).device
            hull.occupancy = hull.occupancy.to(device)
            steps = self.config.hull_prime_steps if steps is None else steps
            losses = prime_density(self.field, hull, steps, self.config.hull_density, seed)
            record["steps"] = len(losses)
            if losses:
                record["loss_first_last"] = [round(losses[0], 5), round(losses[-1], 5)]
        record["seconds"] = round(time.perf_counter() - start, 2)
        return record

    def set_background(self, colour: Sequence[float]) -> None:
        device = self.kwargs.get("device") or "cpu"
        self.background_rgb = torch.tensor([float(x) for x in colour], device=device)
        self.renderer_rgb.background_color = self.background_rgb

    def train(self, mode: bool = True):
        # nerfstudio's renderer leaves a "random" background out of the render and draws it in the
        # loss, for the field and the views' alpha alike; evaluation composites the views' colour.
        super().train(mode)
        if self.config.random_background and hasattr(self, "background_rgb"):
            self.renderer_rgb.background_color = "random" if mode else self.background_rgb
        return self

    def get_metrics_dict(self, outputs, batch):
        if self.training and self.config.random_background and hasattr(self, "background_rgb"):
            # the training PSNR over the views' own colours (the random colours differ each step)
            rgb = outputs["rgb"] + self.background_rgb * (1 - outputs["accumulation"])
            outputs = {**outputs, "rgb": rgb}
            self.renderer_rgb.background_color = self.background_rgb
            try:
                return super().get_metrics_dict(outputs, batch)
            finally:
                self.renderer_rgb.background_color = "random"
        return super().get_metrics_dict(outputs, batch)


@dataclass
class HeadPipelineConfig(VanillaPipelineConfig):
    _target: type = field(default_factory=lambda: HeadPipeline)


class HeadPipeline(VanillaPipeline):
    """nerfstudio's pipeline of both dp360 fields (dp360-head, dp360-splat); sets the background
    from the training images' borders when the model's config has a `background_rgb` of None."""

    def __init__(self, config: HeadPipelineConfig, device: str, *args: Any, **kwargs: Any):
        super().__init__(config, device, *args, **kwargs)
        outputs = getattr(self.datamanager, "train_dataparser_outputs", None)
        # only dp360's model configs have the field (nerfstudio's own models keep their background)
        if getattr(self.model.config, "background_rgb", False) is None and outputs is not None:
            self.model.set_background(border_colour_of(outputs.image_filenames))
        self.hull_priming: dict[str, Any] | None = None

    def get_training_callbacks(self, training_callback_attributes):
        """nerfstudio's callbacks, and, before the first step of a dp360-head fit that asks for it,
        the density primed to the views' visual hull (under dp360's trainer and `ns-train` alike)."""
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        callbacks = super().get_training_callbacks(training_callback_attributes)
        if isinstance(self.model, HeadModel) and self.model.config.hull_prime_steps > 0:

            def prime(step: int) -> None:
                trainer = training_callback_attributes.trainer
                # never longer than the fit itself (a short `ns-train --max-num-iterations` run too)
                steps = min(self.model.config.hull_prime_steps, trainer.config.max_num_iterations) if trainer else None
                seed = trainer.config.machine.seed if trainer else 0
                self.hull_priming = self.model.prime_to_hull(self.datamanager.train_dataset, seed, steps)

            callbacks.append(
                TrainingCallback(where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], func=prime, iters=(0,))
            )
        return callbacks


def _has_tcnn() -> bool:
    from ..gpu import tinycudann_works

    return tinycudann_works()


def head_config(
    settings: FitSettings,
    device: str = "cuda",
    views_dir: Path | None = None,
    background: Sequence[float] | None = None,
) -> TrainerConfig:
    """nerfstudio's TrainerConfig of the method (see the module docstring). Defaults are
    nerfstudio's (output under `outputs/`, the viewer); `fit_field` sets dp360's run layout."""
    proposal_args = [
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 128, "use_linear": False},
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 256, "use_linear": False},
    ]
    optimizers = {  # nerfacto's, less the camera optimiser, with a warm-up and a horizon of their own
        name: {
            "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=1e-4,
                max_steps=settings.lr_decay_steps,
                warmup_steps=settings.lr_warmup_steps,
                lr_pre_warmup=1e-4,
                ramp="linear",
            ),
        }
        for name in ("proposal_networks", "fields")
    }
    cuda = device.startswith("cuda")
    dataparser = NerfstudioDataParserConfig(
        orientation_method="none",
        center_method="none",
        auto_scale_poses=False,
        scale_factor=1.0,
        scene_scale=settings.scene_half_size,
        eval_mode="all",
    )
    if views_dir is not None:
        dataparser.data = Path(views_dir)
    config = TrainerConfig(
        method_name=METHOD,
        max_num_iterations=settings.iterations,
        steps_per_eval_batch=500,
        steps_per_save=2000,
        mixed_precision=cuda,
        pipeline=HeadPipelineConfig(
            datamanager=HeadDataManagerConfig(
                dataparser=dataparser,
                pixel_sampler=ForegroundPixelSamplerConfig(foreground_share=settings.foreground_ray_share),
                train_num_rays_per_batch=settings.rays_per_batch,
                eval_num_rays_per_batch=settings.rays_per_batch,
            ),
            model=HeadModelConfig(
                eval_num_rays_per_chunk=1 << 14,
                near_plane=settings.near,
                far_plane=settings.far,
                background_color="white",  # under `background_rgb`, or the views' colour (HeadPipeline)
                background_rgb=None if background is None else tuple(float(x) for x in background),
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
                average_init_density=settings.init_density,
                random_background=settings.random_background,
                view_dependent_colour=settings.view_dependent_colour,
                hull_prime_steps=settings.hull_prime_steps,  # at most the fit's iterations (the callback)
                hull_density=settings.hull_density,
                proposal_initial_sampler="uniform",  # bounded scene: uniform, not the unbounded piecewise sampler
                implementation="tcnn" if cuda and _has_tcnn() else "torch",
            ),
        ),
        optimizers=optimizers,
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
    config.machine.device_type = "cuda" if cuda else "cpu"
    config.machine.seed = settings.seed
    return config
