"""StyleGAN2 layers used by PanoHead: equalised-lr fully connected layers, the mapping network,
modulated synthesis layers, ToRGB, synthesis blocks ("skip" architecture) and the synthesis
network. Attribute names follow the released state dict (`affine`, `noise_const`, `b64.conv0`,
...) so that the official weights load strictly."""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import bias_act, modulated_conv2d, normalize_2nd_moment, setup_filter, upsample2d


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: weights are stored divided by the lr
    multiplier and scaled at run time by lr_multiplier / sqrt(fan_in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_gain
        bias = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and bias is not None:
            return torch.addmm(bias.unsqueeze(0), x, weight.t())
        return bias_act(x.matmul(weight.t()), bias, self.activation)


class MappingNetwork(nn.Module):
    """z (and the camera label c, embedded) -> w, broadcast to `num_ws` layers, with the running
    average `w_avg` used for truncation."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int = 8,
        activation: str = "lrelu",
        last_activation: str | None = None,
        lr_multiplier: float = 0.01,
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        embed_features = w_dim if c_dim > 0 else 0
        features = [z_dim + embed_features] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for index in range(num_layers):
            layer_activation = last_activation if (index == num_layers - 1 and last_activation) else activation
            setattr(
                self,
                f"fc{index}",
                FullyConnectedLayer(
                    features[index], features[index + 1], activation=layer_activation, lr_multiplier=lr_multiplier
                ),
            )
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1)
        for index in range(self.num_layers):
            x = getattr(self, f"fc{index}")(x)
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally upsampling 2x), per-pixel noise, bias, leaky ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        conv_clamp: float | None = None,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", setup_filter())
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "const",
        fused: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        styles = self.affine(w)
        noise = None
        if noise_mode == "random":
            noise = (
                torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, generator=generator)
                * self.noise_strength
            )
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be random, const or none, not {noise_mode!r}")
        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            kernel=self.resample_filter,
            fused=fused,
        )
        return bias_act(x, self.bias, "lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution without demodulation (features -> image channels)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, "linear", clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the "skip" synthesis network: (const | upsampling conv0) -> conv1 ->
    ToRGB, whose output is added to the upsampled image of the previous block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        use_fp16: bool = False,
        conv_clamp: float | None = None,
        fused_modconv_default: str | bool = "inference_only",
    ):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", setup_filter())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str = "const",
        fused_modconv: bool | None = None,
        generator: torch.Generator | None = None,
    ):
        if fused_modconv is None:
            fused_modconv = (
                (not self.training)
                if self.fused_modconv_default == "inference_only"
                else bool(self.fused_modconv_default)
            )
        # Half precision only where the released configuration asks for it and a GPU runs it.
        dtype = torch.float16 if (self.use_fp16 and ws.device.type == "cuda") else torch.float32
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused=fused_modconv, generator=generator)
        x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused=fused_modconv, generator=generator)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        rgb = self.torgb(x, next(w_iter), fused=fused_modconv).to(torch.float32)
        img = rgb if img is None else img + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """Blocks from 4x4 to `img_resolution`; channels min(channel_base / res, channel_max)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        fused_modconv_default: str | bool = "inference_only",
    ):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        log2 = int(math.log2(img_resolution))
        if 2**log2 != img_resolution or img_resolution < 4:
            raise ValueError(f"synthesis resolution must be a power of two >= 4, not {img_resolution}")
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                channels[res // 2] if res > 4 else 0,
                channels[res],
                w_dim,
                res,
                img_channels,
                use_fp16=res >= fp16_resolution,
                conv_clamp=conv_clamp,
                fused_modconv_default=fused_modconv_default,
            )
            self.num_ws += block.num_conv
            if res == self.block_resolutions[-1]:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "const",
        fused_modconv: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if ws.shape[1] != self.num_ws:
            raise ValueError(f"expected {self.num_ws} w vectors per sample, got {ws.shape[1]}")
        ws = ws.to(torch.float32)
        x = img = None
        w_index = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_index, block.num_conv + block.num_torgb)
            w_index += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused_modconv=fused_modconv, generator=generator)
        return img


class StyleGAN2Backbone(nn.Module):
    """Mapping + synthesis; PanoHead uses it to produce the tri-grid as an image."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_kwargs: dict | None = None,
        **synthesis_kwargs,
    ):
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, num_ws=self.num_ws, **(mapping_kwargs or {}))
