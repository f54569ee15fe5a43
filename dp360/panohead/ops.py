"""StyleGAN2 operations in plain PyTorch: FIR resampling (upfirdn2d), bias + activation with
gain and clamp, and modulated convolution (fused grouped form and the plain per-sample form,
which must agree; a test checks it).

Conventions follow the StyleGAN2(-ADA) paper and its published constants: the [1, 3, 3, 1]
low-pass filter normalised to unit sum, leaky ReLU slope 0.2 with gain sqrt(2), weight
demodulation with epsilon 1e-8, and padding lists given as (x0, x1, y0, y1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2
ACTIVATION_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0), "relu": math.sqrt(2.0)}


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """A separable FIR filter as its 2-D outer product, normalised to sum 1."""
    kernel_1d = torch.as_tensor(taps, dtype=torch.float32)
    kernel = torch.outer(kernel_1d, kernel_1d)
    return kernel / kernel.sum()


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: Sequence[int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative values crop), convolve with `kernel` (a true
    convolution, so the kernel is flipped), then keep every `down`-th sample.

    `padding` is (x0, x1, y0, y1); the 2-D kernel is scaled by `gain`."""
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    pad_x0, pad_x1, pad_y0, pad_y1 = padding
    x = F.pad(x, [max(pad_x0, 0), max(pad_x1, 0), max(pad_y0, 0), max(pad_y1, 0)])
    x = x[:, :, max(-pad_y0, 0) : x.shape[2] - max(-pad_y1, 0), max(-pad_x0, 0) : x.shape[3] - max(-pad_x1, 0)]
    weight = (kernel * gain).flip([0, 1]).to(x.dtype)
    weight = weight[None, None].repeat(channels, 1, 1, 1)
    x = F.conv2d(x, weight, groups=channels)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Resolution x `up` with the FIR filter, keeping the signal's mean (gain up^2)."""
    taps = kernel.shape[-1]
    pad0, pad1 = (taps + up - 1) // 2, (taps - up) // 2
    return upfirdn2d(x, kernel, up=up, padding=(pad0, pad1, pad0, pad1), gain=up * up)


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a per-channel bias (channel axis 1), apply the activation, scale by its gain (the
    activation's default when None) and clamp to +-clamp."""
    if bias is not None:
        x = x + bias.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    elif activation == "relu":
        x = F.relu(x)
    elif activation != "linear":
        raise ValueError(f"unsupported activation {activation!r}")
    gain = ACTIVATION_GAIN[activation] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def conv2d_resample(
    x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor | None, up: int = 1, padding: int = 0, groups: int = 1
) -> torch.Tensor:
    """Convolution (correlation, like `F.conv2d`), optionally preceded by a 2x upsampling done
    as a stride-2 transposed convolution followed by the FIR low-pass filter."""
    if up == 1:
        return F.conv2d(x, weight, padding=padding, groups=groups)
    if up != 2 or kernel is None:
        raise ValueError("only 2x upsampling with a resampling filter is supported")
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    # conv_transpose2d wants (in, out/groups, k, k): swap the axes within every group.
    transposed = weight.reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w)
    transposed = transposed.transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, kernel_h, kernel_w)
    x = F.conv_transpose2d(x, transposed, stride=2, groups=groups)
    # The transposed conv gives 2H + k - 2 samples; the filter's padding brings it to 2H.
    taps = kernel.shape[-1]
    pad0 = padding + (taps + up - 1) // 2 - (kernel_w - 1)
    pad1 = padding + (taps - up) // 2 - (kernel_w - up)
    return upfirdn2d(x, kernel, padding=(pad0, pad1, pad0, pad1), gain=up * up)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    kernel: torch.Tensor | None = None,
    demodulate: bool = True,
    fused: bool = True,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution: the weight is scaled per input channel by `styles`,
    then (with `demodulate`) each output channel is renormalised to unit expected variance.

    `fused=True` runs one grouped convolution with per-sample weights; `fused=False` scales
    the activations before and after a shared convolution. Both give the same result."""
    batch = x.shape[0]
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise so that the products below cannot overflow in half precision.
        weight = weight * (
            1 / math.sqrt(in_channels * kernel_h * kernel_w) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        )
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    per_sample = weight.unsqueeze(0) * styles.reshape(batch, 1, in_channels, 1, 1)
    demod = (per_sample.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None

    if not fused:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), kernel, up=up, padding=padding)
        if demod is not None:
            x = x * demod.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if demod is not None:
        per_sample = per_sample * demod.reshape(batch, -1, 1, 1, 1)
    grouped_weight = per_sample.reshape(batch * out_channels, in_channels, kernel_h, kernel_w).to(x.dtype)
    x = x.reshape(1, batch * in_channels, *x.shape[2:])
    x = conv2d_resample(x, grouped_weight, kernel, up=up, padding=padding, groups=batch)
    x = x.reshape(batch, out_channels, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
