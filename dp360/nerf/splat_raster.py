"""A plain-PyTorch rasteriser of 3D Gaussian splats: gsplat's `rasterization` (the subset splatfacto
calls) in ordinary tensor operations, differentiated by autograd.

Why: gsplat rasterises on CUDA only. This is its reference, as gsplat keeps one for its own kernels:
on a CPU it lets the splat field train and render at test sizes (the tests, CI, the quality
benchmark at 64 px), and on a GPU `tests/nerf/test_splat_raster.py` checks gsplat's fused kernels
against it. It is slow (every Gaussian-pixel pair is a tensor row); splat fits of real size run on
gsplat.

The projection (EWA splatting: 2D means, conics, `radii`, the antialiasing compensation), the
covariances and the spherical harmonics are gsplat's own PyTorch reference functions
(`gsplat.cuda._torch_impl`, private but pinned: nerfstudio 1.1.5 requires gsplat 1.4.0). What gsplat
keeps in CUDA only is the rasterisation, written here with its rules:
- a Gaussian is evaluated at the pixels (sampled at their centres) of the tiles its square of
  `radii` overlaps;
- per pixel, Gaussians are composited front to back by camera depth:
  alpha = min(0.999, opacity * exp(-0.5 d^T conic d)), pairs with alpha < 1/255 skipped, and
  compositing stops before the transmittance would fall to 1e-4;
- colours from spherical harmonics are of the direction from the camera centre to the mean, plus
  0.5, clamped at 0.

`info` carries what gsplat's densification strategy reads: `means2d` (whose gradient it
accumulates), its `absgrad` (the sum over pixels of each pixel's |gradient|, filled in backward),
`radii`, `width`, `height`, `n_cameras`.
"""

from __future__ import annotations

from typing import Any

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4


def rasterize_reference(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    tile_size: int | None = 16,
    **unused: Any,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """gsplat's `rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
    ...)` for pinhole cameras: (renders (C, H, W, D), alphas (C, H, W, 1), info). `colors` is (N, D),
    or (N, K, 3) SH coefficients with `sh_degree`. gsplat's options for its own kernels (packed,
    sparse_grad, absgrad, ...) are accepted and need nothing here: `absgrad` is always filled in.
    `tile_size` as gsplat's: a Gaussian is evaluated at every pixel of the tiles its square of
    `radii` overlaps (the pixels past the square add its faint tail); None evaluates the square only."""
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"render_mode must be RGB, D, ED, RGB+D or RGB+ED, not {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be classic or antialiased, not {rasterize_mode!r}")
    camera_count, count = len(viewmats), len(means)
    covariances, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        means,
        covariances,
        viewmats,
        Ks,
        width,
        height,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        calc_compensations=rasterize_mode == "antialiased",
    )
    opacity = opacities[None].expand(camera_count, count)
    if compensations is not None:
        opacity = opacity * compensations

    if sh_degree is None:
        colours = (
            colors
            if colors.dim() == 3 and colors.shape[0] == camera_count
            else colors[None].expand(camera_count, -1, -1)
        )
    else:
        camera_centres = -torch.einsum("cji,cj->ci", viewmats[:, :3, :3], viewmats[:, :3, 3])
        directions = means[None] - camera_centres[:, None]  # (C, N, 3), normalised by gsplat
        coefficients = colors[None].expand(camera_count, -1, -1, -1)
        colours = _spherical_harmonics(sh_degree, directions, coefficients).add(0.5).clamp_min(0.0)
    channels = []
    if render_mode in ("RGB", "RGB+D", "RGB+ED"):
        channels.append(colours)
    if render_mode != "RGB":
        channels.append(depths[..., None])
    features = torch.cat(channels, dim=-1)

    # every (camera, Gaussian, pixel) pair: the pixels of the tiles around each Gaussian's square of `radii`
    with torch.no_grad():
        camera_of, gaussian_of = radii.nonzero(as_tuple=True)
        r = radii[camera_of, gaussian_of].long()
        centre = means2d[camera_of, gaussian_of]
        # gsplat evaluates a Gaussian at every pixel of every tile its square overlaps
        tile = tile_size or 1
        x_low = ((centre[:, 0] - r) / tile).floor().long().mul(tile).clamp(0, width)
        x_high = ((centre[:, 0] + r) / tile).ceil().long().mul(tile).clamp(0, width)
        y_low = ((centre[:, 1] - r) / tile).floor().long().mul(tile).clamp(0, height)
        y_high = ((centre[:, 1] + r) / tile).ceil().long().mul(tile).clamp(0, height)
        span_x, span_y = x_high - x_low, y_high - y_low
        pair_counts = span_x * span_y
        pair_of = torch.repeat_interleave(torch.arange(len(r), device=r.device), pair_counts)
        first = torch.cumsum(pair_counts, 0) - pair_counts
        offset = torch.arange(len(pair_of), device=r.device) - first[pair_of]
        pixel_x = x_low[pair_of] + offset % span_x[pair_of]
        pixel_y = y_low[pair_of] + torch.div(offset, span_x[pair_of], rounding_mode="floor")
        pair_camera, pair_gaussian = camera_of[pair_of], gaussian_of[pair_of]
    delta = means2d[pair_camera, pair_gaussian] - torch.stack([pixel_x, pixel_y], -1).to(means2d.dtype) - 0.5
    if delta.requires_grad:
        delta.register_hook(_absgrad_hook(means2d, pair_camera, pair_gaussian))
    conic = conics[pair_camera, pair_gaussian]
    sigma = (
        0.5 * (conic[:, 0] * delta[:, 0] ** 2 + conic[:, 2] * delta[:, 1] ** 2)
        + conic[:, 1] * delta[:, 0] * delta[:, 1]
    )
    alpha = (opacity[pair_camera, pair_gaussian] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
    with torch.no_grad():
        kept = (sigma >= 0) & (alpha >= ALPHA_MIN)
        pixel = (pair_camera * height + pixel_y) * width + pixel_x
        pixel, depth_key = pixel[kept], depths[pair_camera, pair_gaussian][kept]
        order = torch.argsort(depth_key)
        order = order[torch.argsort(pixel[order], stable=True)]  # by pixel, then front to back
        kept_index = kept.nonzero()[:, 0][order]
        pixel = pixel[order]
    alpha = alpha[kept_index]
    # transmittance before each pair: the exclusive cumulative product of (1 - alpha) within its
    # pixel, as a cumulative sum of logs (in float64: the running sum spans every pair)
    log_remaining = torch.log1p(-alpha.double())
    running = torch.cumsum(log_remaining, 0)
    with torch.no_grad():
        starts = torch.ones_like(pixel, dtype=torch.bool)
        starts[1:] = pixel[1:] != pixel[:-1]
        segment_start = torch.cummax(torch.where(starts, torch.arange(len(pixel), device=pixel.device), 0), 0).values
    before_segment = running[segment_start] - log_remaining[segment_start]
    transmittance = torch.exp(running - log_remaining - before_segment)
    with torch.no_grad():
        counted = transmittance * (1 - alpha.double()) > TRANSMITTANCE_MIN
    weights = (alpha.double() * transmittance * counted).to(means.dtype)
    total = camera_count * height * width
    pair_features = features[pair_camera[kept_index], pair_gaussian[kept_index]]
    image = torch.zeros(total, features.shape[-1], dtype=means.dtype, device=means.device)
    image = image.index_add(0, pixel, weights[:, None] * pair_features)
    alphas = torch.zeros(total, dtype=means.dtype, device=means.device).index_add(0, pixel, weights)
    image = image.reshape(camera_count, height, width, -1)
    alphas = alphas.reshape(camera_count, height, width, 1)
    if render_mode in ("ED", "RGB+ED"):  # expected depth: the accumulated depth over the accumulation
        image = torch.cat([image[..., :-1], image[..., -1:] / alphas.clamp_min(1e-10)], dim=-1)
    if backgrounds is not None:  # behind the colours only: depth's background is 0, as gsplat's
        behind = torch.zeros(camera_count, features.shape[-1], dtype=means.dtype, device=means.device)
        if render_mode in ("RGB", "RGB+D", "RGB+ED"):
            behind[:, : backgrounds.shape[-1]] = backgrounds
        image = image + (1 - alphas) * behind[:, None, None, :]
    info = {
        "means2d": means2d,
        "radii": radii,
        "gaussian_ids": None,  # gsplat's packed layout only
        "depths": depths,
        "conics": conics,
        "opacities": opacity,
        "width": width,
        "height": height,
        "n_cameras": camera_count,
        "tile_size": tile_size or 1,
    }
    return image, alphas, info


def _absgrad_hook(means2d: Tensor, pair_camera: Tensor, pair_gaussian: Tensor):
    """A backward hook on the per-pair pixel offsets that sums each pair's |gradient| into
    `means2d.absgrad` (gsplat's `absgrad`, which its densification strategy can read)."""

    def hook(gradient: Tensor) -> None:
        absgrad = torch.zeros(means2d.shape, dtype=gradient.dtype, device=gradient.device)
        flat = pair_camera * means2d.shape[1] + pair_gaussian
        means2d.absgrad = absgrad.reshape(-1, 2).index_add(0, flat, gradient.abs()).reshape(means2d.shape)

    return hook
