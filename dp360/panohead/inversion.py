"""GAN inversion of a portrait into PanoHead: W+ projection, then pivotal tuning (PTI).

Schedule and losses follow the DiffPortrait360 projector (facts in ARCHITECTURE.md 5.4):
- W statistics from 10 000 z samples mapped with the frontal camera: w_avg and the scalar
  w_std = sqrt(sum |w - w_avg|^2 / N). W+ starts at w_avg on every layer.
- Camera: the portrait's label plus the generator's learned translation offset t_mapping(z, c)
  at the mean of the z samples.
- W+ steps (default 200): Adam(0.9, 0.999), lr 0.1 with a 5 % linear ramp-up and a cosine
  ramp-down over the last 25 %; Gaussian noise on w of scale w_std * 0.05 * max(0, 1 - t/0.75)^2;
  loss = 0.1 * pixel MSE + LPIPS + 1.0 * mean((w - w_avg)^2).
- PTI (default 5 steps): all generator weights, Adam lr 3e-4, pivot = the final W+,
  loss = 0.1 * MSE + LPIPS.
Images are compared in [-1, 1]; LPIPS sees them area-downsampled to at most 256 px.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import Dp360Error
from .generator import PanoHeadGenerator
from .perceptual import LPIPS, area_downsample


@dataclass
class InversionSettings:
    invert_steps: int = 200
    pti_steps: int = 5
    initial_lr: float = 0.1
    pti_lr: float = 3e-4
    initial_noise_factor: float = 0.05
    noise_ramp_length: float = 0.75
    lr_rampdown_length: float = 0.25
    lr_rampup_length: float = 0.05
    w_regularization: float = 1.0
    mse_weight: float = 0.1
    lpips_weight: float = 1.0
    w_avg_samples: int = 10000
    seed: int = 0
    latent_space: str = "w+"  # "w+" (the reference: one w per layer) or "w" (one w shared)

    def key_dict(self) -> dict:
        return asdict(self)


@dataclass
class InversionResult:
    ws: torch.Tensor  # (1, num_ws, w_dim), the pivot
    camera: torch.Tensor  # (1, 25) label used for fitting (with the learned offset)
    generator: PanoHeadGenerator  # tuned copy (the input generator is untouched)
    projection_losses: list[float] = field(default_factory=list)
    pti_losses: list[float] = field(default_factory=list)


def learning_rate(step: int, total: int, settings: InversionSettings) -> float:
    t = step / max(total, 1)
    ramp = min(1.0, (1.0 - t) / settings.lr_rampdown_length)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / settings.lr_rampup_length)
    return settings.initial_lr * ramp


def noise_scale(step: int, total: int, w_std: float, settings: InversionSettings) -> float:
    t = step / max(total, 1)
    return w_std * settings.initial_noise_factor * max(0.0, 1.0 - t / settings.noise_ramp_length) ** 2


@torch.no_grad()
def w_statistics(
    generator: PanoHeadGenerator, camera: torch.Tensor, samples: int, seed: int
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(w_avg (1, 1, w_dim), w_std, mean z (1, z_dim)) from `samples` latents at `camera`."""
    device = camera.device
    rng = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(samples, generator.config.z_dim, generator=rng).to(device)
    ws = torch.cat([generator.mapping(chunk, camera.expand(chunk.shape[0], -1))[:, :1] for chunk in z.split(2048)])
    w_avg = ws.mean(dim=0, keepdim=True)
    w_std = float(((ws - w_avg).square().sum() / samples).sqrt())
    return w_avg, w_std, z.mean(dim=0, keepdim=True)


def _loss(images: torch.Tensor, target: torch.Tensor, lpips: LPIPS | None, settings: InversionSettings) -> torch.Tensor:
    loss = settings.mse_weight * (images - target).square().mean()
    if settings.lpips_weight:
        loss = loss + settings.lpips_weight * lpips(area_downsample(images), area_downsample(target)).sum()
    return loss


def invert(
    generator: PanoHeadGenerator,
    target: torch.Tensor,
    camera: torch.Tensor,
    lpips: LPIPS | None,
    settings: InversionSettings | None = None,
    progress: bool = True,
    frontal_camera: torch.Tensor | None = None,
) -> InversionResult:
    """Fit W+ and then the generator to `target` (1, 3, R, R) in [-1, 1] seen from `camera` (1, 25)."""
    from tqdm.auto import tqdm

    settings = settings or InversionSettings()
    if settings.lpips_weight and lpips is None:
        raise Dp360Error(
            "The inversion's perceptual loss needs LPIPS weights; load them with dp360.panohead.perceptual.load_lpips()."
        )
    resolution = generator.config.img_resolution
    if target.shape[-2:] != (resolution, resolution):
        raise Dp360Error(f"The inversion target must be {resolution} x {resolution}, not {tuple(target.shape[-2:])}.")
    device = next(generator.parameters()).device
    target, camera = target.to(device, torch.float32), camera.to(device, torch.float32)
    frontal = (frontal_camera if frontal_camera is not None else camera).to(device, torch.float32)

    w_avg, w_std, z_mean = w_statistics(generator, frontal, settings.w_avg_samples, settings.seed)
    with torch.no_grad():
        fit_camera = generator.apply_camera_offset(camera, generator.camera_offset(z_mean, camera))
    render_rng = torch.Generator(device=device).manual_seed(settings.seed)
    noise_rng = torch.Generator(device=device).manual_seed(settings.seed + 1)

    if settings.latent_space not in ("w+", "w"):
        raise Dp360Error(f"latent_space must be 'w+' or 'w', not {settings.latent_space!r}.")
    layers = generator.num_ws if settings.latent_space == "w+" else 1
    w_opt = w_avg.repeat(1, layers, 1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt], betas=(0.9, 0.999), lr=settings.initial_lr)
    projection_losses = []
    for step in tqdm(range(settings.invert_steps), desc="PanoHead W+ inversion", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.invert_steps, settings)
        scale = noise_scale(step, settings.invert_steps, w_std, settings)
        ws = (w_opt + torch.randn(w_opt.shape, device=device, generator=noise_rng) * scale).expand(
            -1, generator.num_ws, -1
        )
        images = generator.synthesis(ws, fit_camera, noise_mode="const", generator=render_rng)["image"]
        loss = _loss(images, target, lpips, settings) + settings.w_regularization * (w_opt - w_avg).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        projection_losses.append(loss.item())
    pivot = w_opt.detach().expand(-1, generator.num_ws, -1).contiguous()

    tuned = copy.deepcopy(generator).train().requires_grad_(True)
    pti_optimizer = torch.optim.Adam(tuned.parameters(), lr=settings.pti_lr)
    pti_losses = []
    for _ in tqdm(range(settings.pti_steps), desc="PanoHead PTI", disable=not progress, leave=False):
        images = tuned.synthesis(pivot, fit_camera, noise_mode="const", generator=render_rng)["image"]
        loss = _loss(images, target, lpips, settings)
        pti_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        pti_optimizer.step()
        pti_losses.append(loss.item())
    tuned.eval().requires_grad_(False)
    return InversionResult(pivot, fit_camera.detach(), tuned, projection_losses, pti_losses)


@torch.no_grad()
def render_views(
    generator: PanoHeadGenerator, ws: torch.Tensor, labels: torch.Tensor, batch_size: int = 4, seed: int = 0
) -> torch.Tensor:
    """Images (N, 3, R, R) in [-1, 1] of one W+ code at N cameras (const noise, seeded ray jitter)."""
    return render_views_with_depth(generator, ws, labels, batch_size, seed)[0]


@torch.no_grad()
def render_views_with_depth(
    generator: PanoHeadGenerator, ws: torch.Tensor, labels: torch.Tensor, batch_size: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`render_views`' images plus the volume renderer's depth (distance along each unit ray) and
    opacity, (N, 1, r, r) at the neural rendering resolution: the head's surface seen from N cameras."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    images, depths, masks = [], [], []
    for chunk in labels.to(device, torch.float32).split(batch_size):
        output = generator.synthesis(ws.expand(chunk.shape[0], -1, -1), chunk, noise_mode="const", generator=rng)
        images.append(output["image"].float().cpu())
        depths.append(output["image_depth"].float().cpu())
        masks.append(output["image_mask"].float().cpu())
    return torch.cat(images), torch.cat(depths), torch.cat(masks)


@torch.no_grad()
def canonical_ws(
    generator: PanoHeadGenerator, frontal_camera: torch.Tensor, seed: int = 0, truncation_psi: float = 0.7
) -> torch.Tensor:
    """W+ of a fixed-seed head, truncated towards the average (a plain, typical head): the
    subject of the camera-condition images."""
    device = next(generator.parameters()).device
    z = torch.randn(1, generator.config.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return generator.mapping(z, frontal_camera.to(device, torch.float32), truncation_psi=truncation_psi)


def to_uint8(images: torch.Tensor) -> list:
    """[-1, 1] (N, 3, H, W) -> list of (H, W, 3) uint8 arrays."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(pixels)
