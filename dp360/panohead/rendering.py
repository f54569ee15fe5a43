"""Volume rendering of PanoHead's tri-grid: feature sampling, the decoder MLP, and the two-pass
(stratified + importance) renderer with the mip-NeRF-style ray marcher.

Facts carried over from EG3D / PanoHead: the three planes index the point as (x, y | z),
(x, z | y) and (y, z | x) (the third coordinate is the tri-grid's depth axis); coordinates are
scaled by 2 / box_warp into grid_sample's [-1, 1]; the features of the three planes are
averaged; densities pass through softplus(sigma - 1); samples outside the vertical column
|x|, |z| <= box_warp / 2 - 0.1 get no density ("triplane crop")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FullyConnectedLayer

# For each plane: which world axes become (grid x, grid y, grid depth).
PLANE_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0))
TRIPLANE_CROP = 0.1


def sample_trigrid(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float, depth: int) -> torch.Tensor:
    """Features at world points.

    planes: (N, 3, C * depth, H, W), channel index = c * depth + d.
    coordinates: (N, M, 3) world points. Returns (N, 3, M, C)."""
    batch, plane_count, channels_depth, height, width = planes.shape
    channels = channels_depth // depth
    grids = planes.reshape(batch * plane_count, channels, depth, height, width)
    scaled = coordinates * (2.0 / box_warp)
    projected = torch.stack([scaled[..., list(axes)] for axes in PLANE_AXES], dim=1)  # N, 3, M, 3
    projected = projected.reshape(batch * plane_count, 1, 1, -1, 3).to(grids.dtype)
    sampled = F.grid_sample(grids, projected, mode="bilinear", padding_mode="zeros", align_corners=False)
    # (N*3, C, 1, 1, M) -> (N, 3, M, C)
    return sampled.reshape(batch, plane_count, channels, -1).transpose(2, 3)


class OSGDecoder(nn.Module):
    """Averaged plane features -> (density, 32 features) through a 64-unit softplus MLP."""

    def __init__(
        self,
        n_features: int,
        output_dim: int = 32,
        lr_multiplier: float = 1.0,
        activation: str = "none",
        hidden: int = 64,
    ):
        super().__init__()
        self.activation = activation
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden, 1 + output_dim, lr_multiplier=lr_multiplier),
        )

    def forward(self, sampled_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = sampled_features.mean(dim=1)  # over the planes
        batch, points, channels = features.shape
        out = self.net(features.reshape(batch * points, channels)).reshape(batch, points, -1)
        color, sigma = out[..., 1:], out[..., :1]
        if self.activation == "sigmoid":
            color = torch.sigmoid(color) * (1 + 2 * 0.001) - 0.001
        elif self.activation == "lrelu":
            color = F.leaky_relu(color, 0.2) * (2**0.5)
        return color, sigma


def ray_march(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, white_background: bool = False):
    """Quadrature between consecutive samples (midpoint values, mip-NeRF style).

    colors (N, R, S, C), densities (N, R, S, 1) raw (before softplus(x - 1)), depths (N, R, S, 1).
    Returns composite colour (N, R, C), depth (N, R, 1) and weights (N, R, S-1, 1)."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-densities_mid * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], dim=-2), dim=-2)[
        :, :, :-1
    ]
    weights = alpha * transmittance
    composite = (weights * colors_mid).sum(dim=-2)
    total = weights.sum(dim=-2)
    depth = torch.nan_to_num((weights * depths_mid).sum(dim=-2) / total, float("inf"))
    depth = depth.clamp(depths.min(), depths.max())
    if white_background:
        composite = composite + 1 - total
    return composite, depth, weights


def sample_pdf(
    bins: torch.Tensor,
    weights: torch.Tensor,
    count: int,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverse-CDF samples from the piecewise-constant density `weights` over the intervals
    between consecutive `bins` (rays x (K+1) edges, rays x K weights), as PanoHead's `sample_pdf`:
    1e-5 is added to every weight before normalising, the CDF starts with a 0, u is uniform
    random (or `linspace(0, 1)` when `deterministic`) and an interval whose CDF step is below
    1e-5 is given a span of 1."""
    weights = weights + 1e-5
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)
    if deterministic:
        u = torch.linspace(0, 1, count, device=bins.device, dtype=bins.dtype).expand(bins.shape[0], count).contiguous()
    else:
        u = torch.rand(bins.shape[0], count, device=bins.device, dtype=bins.dtype, generator=generator)
    index = torch.searchsorted(cdf, u, right=True)
    below = (index - 1).clamp(min=0, max=cdf.shape[-1] - 1)
    above = index.clamp(max=cdf.shape[-1] - 1)
    cdf_below, cdf_above = cdf.gather(1, below), cdf.gather(1, above)
    bin_below, bin_above = bins.gather(1, below), bins.gather(1, above)
    span = cdf_above - cdf_below
    span = torch.where(span < 1e-5, torch.ones_like(span), span)
    return bin_below + (u - cdf_below) / span * (bin_above - bin_below)


def smooth_weights(weights: torch.Tensor) -> torch.Tensor:
    """PanoHead's smoothing of the coarse weights (rays x L, one per interval between coarse
    samples): a max over each pair of neighbours (`max_pool1d`, kernel 2, stride 1, padding 1,
    which gives L + 1 values), the mean of each adjacent pair of those (`avg_pool1d`, kernel 2,
    stride 1: L values again), plus 0.01. Computed in at least float32, as PanoHead does."""
    dtype = torch.promote_types(weights.dtype, torch.float32)
    pooled = F.max_pool1d(weights.to(dtype).unsqueeze(1), kernel_size=2, stride=1, padding=1)
    return F.avg_pool1d(pooled, kernel_size=2, stride=1).squeeze(1) + 0.01


def importance_depths(
    depths: torch.Tensor,
    weights: torch.Tensor,
    count: int,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PanoHead's `sample_importance`: `count` depths per ray drawn where the coarse pass put its
    weight. depths (N, R, S, 1) coarse sample depths, weights (N, R, S-1, 1) from `ray_march`.
    Returns (N, R, count, 1).

    The bins are the S-1 midpoints of the coarse depths and the density is the smoothed weights
    without their first and last value: S-3 weights, so only the first S-2 midpoints (S-3
    intervals) are used; PanoHead passes all S-1 midpoints but its clamped indices never reach
    the last one. Interval k (midpoint k to k+1, around coarse sample k+1) thus gets smoothed
    value k+1, which is centred on midpoint k+1: the importance samples sit half a coarse
    spacing before the ray-march interval that carries the weight. This matches PanoHead's
    renderer exactly (same random numbers, same samples)."""
    batch, rays, steps, _ = depths.shape
    with torch.no_grad():
        smoothed = smooth_weights(weights.reshape(batch * rays, -1))
        flat_depths = depths.reshape(batch * rays, steps)
        midpoints = 0.5 * (flat_depths[:, :-1] + flat_depths[:, 1:])
        interval_weights = smoothed[:, 1:-1].to(flat_depths.dtype)  # S-3 weights
        edges = midpoints[:, : interval_weights.shape[-1] + 1]  # S-2 edges (1 when S < 4)
        fine = sample_pdf(edges, interval_weights, count, deterministic, generator)
    return fine.reshape(batch, rays, count, 1)


@dataclass
class RenderSettings:
    ray_start: float = 2.35
    ray_end: float = 3.3
    box_warp: float = 1.0
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    triplane_depth: int = 3
    triplane_crop: float = TRIPLANE_CROP
    white_background: bool = False
    deterministic: bool = False  # no jitter of the stratified samples (closed-form tests)


# A field maps world points (N, M, 3) to (features (N, M, C), raw density (N, M, 1)).
Field = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def trigrid_field(planes: torch.Tensor, decoder: OSGDecoder, settings: RenderSettings) -> Field:
    def field(points: torch.Tensor):
        color, sigma = decoder(sample_trigrid(planes, points, settings.box_warp, settings.triplane_depth))
        if settings.triplane_crop:
            outside = (points[..., [0, 2]].abs() > settings.box_warp / 2 - settings.triplane_crop).any(
                dim=-1, keepdim=True
            )
            sigma = torch.where(outside, torch.full_like(sigma, -1e3), sigma)
        return color, sigma

    return field


def render_rays(
    field: Field,
    origins: torch.Tensor,
    directions: torch.Tensor,
    settings: RenderSettings,
    generator: torch.Generator | None = None,
):
    """Stratified pass, then importance samples where the coarse weights are, then one march
    over all samples sorted by depth. origins/directions (N, R, 3).

    Returns features (N, R, C), depth (N, R, 1), accumulated opacity (N, R, 1)."""
    batch, rays, _ = origins.shape
    steps = settings.depth_resolution
    depths = torch.linspace(settings.ray_start, settings.ray_end, steps, device=origins.device, dtype=origins.dtype)
    depths = depths.reshape(1, 1, steps, 1).repeat(batch, rays, 1, 1)
    if not settings.deterministic:
        spacing = (settings.ray_end - settings.ray_start) / (steps - 1)
        depths = (
            depths + torch.rand(depths.shape, device=origins.device, dtype=origins.dtype, generator=generator) * spacing
        )

    def evaluate(sample_depths: torch.Tensor):
        count = sample_depths.shape[2]
        points = (origins.unsqueeze(-2) + sample_depths * directions.unsqueeze(-2)).reshape(batch, rays * count, 3)
        color, sigma = field(points)
        return color.reshape(batch, rays, count, -1), sigma.reshape(batch, rays, count, 1)

    colors, densities = evaluate(depths)
    if settings.depth_resolution_importance > 0:
        with torch.no_grad():
            _, _, weights = ray_march(colors, densities, depths)
            fine = importance_depths(
                depths, weights, settings.depth_resolution_importance, settings.deterministic, generator
            )
        fine_colors, fine_densities = evaluate(fine)
        depths = torch.cat([depths, fine], dim=2)
        colors = torch.cat([colors, fine_colors], dim=2)
        densities = torch.cat([densities, fine_densities], dim=2)
        depths, order = torch.sort(depths, dim=2)
        colors = colors.gather(2, order.expand(-1, -1, -1, colors.shape[-1]))
        densities = densities.gather(2, order)
    features, depth, weights = ray_march(colors, densities, depths, settings.white_background)
    return features, depth, weights.sum(dim=2)
