"""PanoHead's tri-grid generator, written from the paper and the released configuration.

z (512) + camera label c (25) -> mapping (generator pose conditioning: c * c_scale) -> W+ ->
StyleGAN2 synthesis of a 256 x 256 image with 3 x 32 x D channels = three planes of a tri-grid
(32 features x D depth slices) -> volume rendering at 64 x 64 (48 stratified + 48 importance
samples per ray) of 32-channel features -> background synthesis composited behind the head ->
raw RGB via a ToRGB layer -> super-resolution to 512. `t_mapping` predicts a per-sample camera
translation offset ("self-adaptive camera alignment") added to c[3], c[7], c[11].

`PanoHeadGenerator(PanoHeadConfig.from_init_kwargs(kwargs))` accepts the constructor keyword
arguments recorded in the released pickle; its state dict has exactly the released names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cameras import pixel_rays
from ..safety import ConfigError, check_bounds, one_line
from .layers import MappingNetwork, StyleGAN2Backbone, SynthesisBlock, SynthesisNetwork, ToRGBLayer
from .rendering import OSGDecoder, RenderSettings, render_rays, trigrid_field

FEATURE_CHANNELS = 32
SR_MODULE_8XDC = "training.superresolution.SuperresolutionHybrid8XDC"
# dp360's own small super-resolution for tiny test models (same structure, any size).
SR_MODULE_TINY = "dp360.tiny_superresolution"


class SuperResolution(nn.Module):
    """Two upsampling synthesis blocks (x4) from the raw render, conditioned on the last w.
    For the released 512 model (SuperresolutionHybrid8XDC): input 128, channels 256 and 128,
    conv clamp 256 when the blocks run in half precision."""

    def __init__(
        self,
        channels: int,
        img_resolution: int,
        input_resolution: int,
        block_channels: tuple[int, int],
        w_dim: int,
        use_fp16: bool,
        antialias: bool,
        fused_modconv_default: Any = "inference_only",
    ):
        super().__init__()
        if img_resolution != input_resolution * 4:
            raise ValueError("super-resolution goes from input_resolution to 4 x input_resolution")
        self.input_resolution = input_resolution
        self.antialias = antialias
        clamp = 256 if use_fp16 else None
        self.block0 = SynthesisBlock(
            channels,
            block_channels[0],
            w_dim,
            input_resolution * 2,
            3,
            use_fp16=use_fp16,
            conv_clamp=clamp,
            fused_modconv_default=fused_modconv_default,
        )
        self.block1 = SynthesisBlock(
            block_channels[0],
            block_channels[1],
            w_dim,
            img_resolution,
            3,
            use_fp16=use_fp16,
            conv_clamp=clamp,
            fused_modconv_default=fused_modconv_default,
        )

    def forward(
        self,
        rgb: torch.Tensor,
        features: torch.Tensor,
        ws: torch.Tensor,
        noise_mode: str = "none",
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        if features.shape[-1] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            features = F.interpolate(
                features, size=size, mode="bilinear", align_corners=False, antialias=self.antialias
            )
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)
        x, rgb = self.block0(features, rgb, ws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        x, rgb = self.block1(x, rgb, ws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        return rgb


# Bounds on the recorded constructor arguments, checked before anything is built; comfortably
# above the released generator's values (in comments).
CONFIG_BOUNDS = {
    "z_dim": (1, 4096),  # 512
    "w_dim": (1, 4096),  # 512
    "c_dim": (1, 1024),  # 25
    "img_resolution": (16, 2048),  # 512
    "img_channels": (1, 16),  # 3
    "channel_base": (1, 1 << 20),  # 32768
    "channel_max": (1, 4096),  # 512
    "num_fp16_res": (0, 16),  # 0
    "sr_num_fp16_res": (0, 16),  # 4
    "conv_clamp": (0.0, 1e9),  # null
    "neural_rendering_resolution": (1, 2048),  # 64
}
MAPPING_BOUNDS = {"num_layers": (1, 64)}  # 2
RENDERING_BOUNDS = {
    "triplane_size": (4, 2048),  # 256
    "triplane_depth": (1, 64),  # 3
    "depth_resolution": (4, 1024),  # 48; importance sampling needs at least 4 coarse samples
    "depth_resolution_importance": (0, 1024),  # 48
    "ray_start": (0.0, 1e3),  # 2.25
    "ray_end": (0.0, 1e3),  # 3.3
    "box_warp": (1e-6, 1e3),  # 1
    "c_scale": (-1e3, 1e3),  # 1.0
    "decoder_lr_mul": (0.0, 1e3),  # 1.0
}
SR_BOUNDS = {"block_channels": (1, 4096), "channel_base": (1, 1 << 20), "channel_max": (1, 4096)}


def _prefixed(bounds: dict[str, tuple[float, float]], prefix: str) -> dict[str, tuple[float, float]]:
    return {prefix + key: value for key, value in bounds.items()}


@dataclass
class PanoHeadConfig:
    """The generator's construction arguments, as PanoHead's train.py records them."""

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 25
    img_resolution: int = 512
    img_channels: int = 3
    mapping_layers: int = 2
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    sr_num_fp16_res: int = 4
    conv_clamp: float | None = None
    fused_modconv_default: Any = "inference_only"
    rendering: dict[str, Any] = field(default_factory=dict)
    sr_kwargs: dict[str, Any] = field(default_factory=dict)
    neural_rendering_resolution: int = 64

    SUPPORTED_ARCHITECTURE = "skip"

    @classmethod
    def from_init_kwargs(
        cls,
        kwargs: dict[str, Any],
        source: str = "The PanoHead configuration",
        advice: str = "it is not a PanoHead generator dp360 supports",
    ) -> PanoHeadConfig:
        """Validate and adopt the kwargs of `TriPlaneGenerator(...)` (as stored in the pickle).
        Raises `ConfigError` (a `ValueError` and a `Dp360Error`) naming `source` and saying `advice`."""

        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{source} {problem}; {advice}.")

        def mapping_of(value: Any, name: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise fail(f"has {name} of type {type(value).__name__}, not a dict")
            return value

        try:
            kwargs = copy.deepcopy(mapping_of(kwargs, "init_kwargs"))
        except RecursionError:
            raise fail("has init_kwargs nested too deeply to be constructor arguments") from None
        architecture = kwargs.pop("architecture", "skip")
        if architecture != cls.SUPPORTED_ARCHITECTURE:
            raise fail(
                f"asks for the {one_line(repr(architecture), 40)} synthesis architecture; only 'skip' is supported"
            )
        if "rendering_kwargs" not in kwargs:
            raise fail("lacks rendering_kwargs")
        rendering = mapping_of(kwargs.pop("rendering_kwargs"), "rendering_kwargs")
        for key in ("triplane_size", "triplane_depth", "superresolution_module"):
            if key not in rendering:
                raise fail(f"lacks rendering_kwargs[{key!r}]")
        if rendering["superresolution_module"] not in (SR_MODULE_8XDC, SR_MODULE_TINY):
            raise fail(
                f"asks for the unsupported super-resolution module {one_line(repr(rendering['superresolution_module']), 80)}"
            )
        mapping = mapping_of(kwargs.pop("mapping_kwargs", None) or {}, "mapping_kwargs")
        sr_kwargs = mapping_of(kwargs.get("sr_kwargs") or {}, "sr_kwargs")
        unknown = sorted(map(str, set(kwargs) - set(CONFIG_BOUNDS) - {"fused_modconv_default", "sr_kwargs"}))
        if unknown:
            raise fail(f"includes unknown arguments: {one_line(', '.join(unknown), 80)}")
        # Bounds before anything is built: 10^9 mapping layers would hang construction.
        for bounds, values, prefix in (
            (CONFIG_BOUNDS, kwargs, ""),
            (MAPPING_BOUNDS, mapping, "mapping_kwargs."),
            (RENDERING_BOUNDS, rendering, "rendering_kwargs."),
            (SR_BOUNDS, sr_kwargs, "sr_kwargs."),
        ):
            check_bounds(
                {f"{prefix}{key}": value for key, value in values.items()},
                _prefixed(bounds, prefix),
                source,
                advice,
                nullable=("conv_clamp",),
            )
        for name, value in (
            ("img_resolution", kwargs.get("img_resolution", 512)),
            ("rendering_kwargs.triplane_size", rendering["triplane_size"]),
        ):
            if value & (value - 1):
                raise fail(f"sets {name} to {value}, which is not a power of two as StyleGAN2 needs")
        block_channels = sr_kwargs.get("block_channels", (16, 8))
        if (
            not isinstance(block_channels, (list, tuple))
            or len(block_channels) != 2
            or not all(isinstance(count, int) for count in block_channels)
        ):
            raise fail("sets sr_kwargs.block_channels to other than two channel counts")
        return cls(mapping_layers=mapping.get("num_layers", 8), rendering=rendering, **kwargs)

    def init_kwargs(self) -> dict[str, Any]:
        """The inverse of `from_init_kwargs` (what we store next to converted weights)."""
        return {
            "z_dim": self.z_dim,
            "w_dim": self.w_dim,
            "c_dim": self.c_dim,
            "img_resolution": self.img_resolution,
            "img_channels": self.img_channels,
            "mapping_kwargs": {"num_layers": self.mapping_layers},
            "architecture": "skip",
            "channel_base": self.channel_base,
            "channel_max": self.channel_max,
            "num_fp16_res": self.num_fp16_res,
            "sr_num_fp16_res": self.sr_num_fp16_res,
            "conv_clamp": self.conv_clamp,
            "fused_modconv_default": self.fused_modconv_default,
            "rendering_kwargs": copy.deepcopy(self.rendering),
            "sr_kwargs": copy.deepcopy(self.sr_kwargs),
            "neural_rendering_resolution": self.neural_rendering_resolution,
        }

    def render_settings(self, **overrides: Any) -> RenderSettings:
        """Renderer settings; ray_start defaults to 2.35 as the DiffPortrait360 projector sets it."""
        r = self.rendering
        values = dict(
            ray_start=2.35,
            ray_end=float(r.get("ray_end", 3.3)),
            box_warp=float(r.get("box_warp", 1.0)),
            depth_resolution=int(r.get("depth_resolution", 48)),
            depth_resolution_importance=int(r.get("depth_resolution_importance", 48)),
            triplane_depth=int(r["triplane_depth"]),
        )
        values.update(overrides)
        return RenderSettings(**values)


class PanoHeadGenerator(nn.Module):
    def __init__(self, config: PanoHeadConfig):
        super().__init__()
        self.config = config
        r = config.rendering
        synthesis_kwargs = dict(
            channel_base=config.channel_base,
            channel_max=config.channel_max,
            num_fp16_res=config.num_fp16_res,
            conv_clamp=config.conv_clamp,
            fused_modconv_default=config.fused_modconv_default,
        )
        # Registered first, as the training loop does: the label std of the training set.
        self.register_buffer("dataset_label_std", torch.zeros([config.c_dim]))
        self.backbone = StyleGAN2Backbone(
            config.z_dim,
            config.c_dim,
            config.w_dim,
            img_resolution=int(r["triplane_size"]),
            img_channels=FEATURE_CHANNELS * 3 * int(r["triplane_depth"]),
            mapping_kwargs={"num_layers": config.mapping_layers},
            **synthesis_kwargs,
        )
        if r["superresolution_module"] == SR_MODULE_8XDC:
            if config.img_resolution != 512:
                raise ValueError("SuperresolutionHybrid8XDC produces 512 x 512 images")
            input_resolution, block_channels = 128, (256, 128)
        else:
            input_resolution = config.img_resolution // 4
            block_channels = tuple(config.sr_kwargs.get("block_channels", (16, 8)))
        self.superresolution = SuperResolution(
            FEATURE_CHANNELS,
            config.img_resolution,
            input_resolution,
            block_channels,
            config.w_dim,
            use_fp16=config.sr_num_fp16_res > 0,
            antialias=bool(r.get("sr_antialias", True)),
            fused_modconv_default=config.sr_kwargs.get("fused_modconv_default", "inference_only"),
        )
        self.decoder = OSGDecoder(
            FEATURE_CHANNELS,
            FEATURE_CHANNELS,
            lr_multiplier=float(r.get("decoder_lr_mul", 1.0)),
            activation=r.get("decoder_activation", "sigmoid"),
        )
        self.torgb = ToRGBLayer(FEATURE_CHANNELS, 3, config.w_dim) if r.get("use_torgb_raw", False) else None
        if r.get("use_background", False):
            background_kwargs = dict(synthesis_kwargs, channel_base=config.channel_base // 2)
            self.bcg_synthesis = SynthesisNetwork(config.w_dim, input_resolution, FEATURE_CHANNELS, **background_kwargs)
        else:
            self.bcg_synthesis = None
        self.t_mapping = MappingNetwork(
            config.z_dim,
            config.c_dim,
            3,
            num_ws=1,
            num_layers=config.mapping_layers,
            last_activation="linear",
            lr_multiplier=1.0,
        )
        self.render_settings = config.render_settings()

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def _pose_condition(self, c: torch.Tensor) -> torch.Tensor:
        if self.config.rendering.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        return c * float(self.config.rendering.get("c_scale", 0.0))

    def mapping(
        self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> torch.Tensor:
        return self.backbone.mapping(z, self._pose_condition(c), truncation_psi, truncation_cutoff)

    def camera_offset(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, 3) translation the generator learned to add to camera c for latent z."""
        return self.t_mapping(z, self._pose_condition(c)).squeeze(1)

    def apply_camera_offset(self, c: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        shifted = c.clone()
        shifted[:, 3] += offset[:, 0]
        shifted[:, 7] += offset[:, 1]
        shifted[:, 11] += offset[:, 2]
        return shifted

    def planes(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """The tri-grid: (N, 3, 32 * D, S, S)."""
        grid = self.backbone.synthesis(ws, noise_mode=noise_mode)
        return grid.reshape(grid.shape[0], 3, -1, grid.shape[-2], grid.shape[-1])

    def field(self, planes: torch.Tensor, settings: RenderSettings | None = None):
        return trigrid_field(planes, self.decoder, settings or self.render_settings)

    def synthesis(
        self,
        ws: torch.Tensor,
        c: torch.Tensor,
        noise_mode: str = "const",
        neural_rendering_resolution: int | None = None,
        generator: torch.Generator | None = None,
        settings: RenderSettings | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render W+ codes at cameras c (N, 25). Returns image (N, 3, R, R) in [-1, 1],
        image_raw (N, 3, r, r), image_depth and image_mask (N, 1, r, r)."""
        settings = settings or self.render_settings
        resolution = neural_rendering_resolution or self.config.neural_rendering_resolution
        cam2world, intrinsics = c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3)
        origins, directions = pixel_rays(cam2world.float(), intrinsics.float(), resolution)
        planes = self.planes(ws, noise_mode)
        features, depth, opacity = render_rays(self.field(planes, settings), origins, directions, settings, generator)
        batch = ws.shape[0]
        feature_image = features.transpose(1, 2).reshape(batch, -1, resolution, resolution)
        depth_image = depth.transpose(1, 2).reshape(batch, 1, resolution, resolution)
        opacity_image = opacity.transpose(1, 2).reshape(batch, 1, resolution, resolution)
        if self.decoder.activation == "sigmoid":
            feature_image = feature_image * 2 - 1
        if self.bcg_synthesis is not None:
            count = self.bcg_synthesis.num_ws
            background_ws = ws[:, :count]
            if background_ws.shape[1] < count:
                background_ws = torch.cat(
                    [background_ws, background_ws[:, -1:].repeat(1, count - background_ws.shape[1], 1)], dim=1
                )
            background = self.bcg_synthesis(background_ws, noise_mode=noise_mode)
            background = F.interpolate(
                background,
                size=feature_image.shape[2:],
                mode="bilinear",
                align_corners=False,
                antialias=self.superresolution.antialias,
            )
            feature_image = feature_image + (1 - opacity_image) * background
        if self.torgb is not None:
            raw = self.torgb(feature_image, ws[:, -1], fused=False).to(torch.float32)
        else:
            raw = feature_image[:, :3]
        image = self.superresolution(
            raw, feature_image, ws, noise_mode=self.config.rendering.get("superresolution_noise_mode", "none")
        )
        mask = opacity_image * (1 + 2 * 0.001) - 0.001
        return {"image": image, "image_raw": raw, "image_depth": depth_image, "image_mask": mask}

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        c = self.apply_camera_offset(c, self.camera_offset(z, c))
        return self.synthesis(ws, c, noise_mode=noise_mode, generator=generator)


def released_config() -> PanoHeadConfig:
    """The configuration of `easy-khair-180-gpc0.8-trans10-025000.pkl` as far as train.py and
    the README command determine it (the pickle's own kwargs take precedence when loading)."""
    rendering = {
        "image_resolution": 512,
        "disparity_space_sampling": False,
        "clamp_mode": "softplus",
        "superresolution_module": SR_MODULE_8XDC,
        "c_gen_conditioning_zero": False,
        "gpc_reg_prob": 0.8,
        "c_scale": 1.0,
        "superresolution_noise_mode": "none",
        "density_reg": 0.0,
        "density_reg_p_dist": 0.004,
        "reg_type": "l1",
        "decoder_lr_mul": 1.0,
        "decoder_activation": "none",
        "use_torgb_raw": True,
        "triplane_size": 256,
        "triplane_depth": 3,
        "trans_reg": 10.0,
        "use_background": True,
        "sr_antialias": True,
        "depth_resolution": 48,
        "depth_resolution_importance": 48,
        "ray_start": 2.25,
        "ray_end": 3.3,
        "box_warp": 1,
        "avg_camera_radius": 2.7,
        "avg_camera_pivot": [0, 0, 0.2],
    }
    return PanoHeadConfig(
        rendering=rendering,
        sr_kwargs={"channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only"},
    )


def tiny_config(
    img_resolution: int = 64, triplane_size: int = 32, neural_rendering_resolution: int = 16
) -> PanoHeadConfig:
    """A generator of the same structure small enough for CPU tests (a few MB)."""
    config = released_config()
    config.z_dim = config.w_dim = 32
    config.img_resolution = img_resolution
    config.channel_base, config.channel_max = 512, 32
    config.sr_num_fp16_res = 0
    config.neural_rendering_resolution = neural_rendering_resolution
    config.rendering.update(
        superresolution_module=SR_MODULE_TINY,
        triplane_size=triplane_size,
        depth_resolution=12,
        depth_resolution_importance=12,
    )
    config.sr_kwargs = {"block_channels": [16, 8]}
    return config


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def describe(generator: PanoHeadGenerator) -> str:
    c = generator.config
    return f"PanoHead tri-grid generator: {count_parameters(generator) / 1e6:.1f} M parameters, {c.img_resolution} px, tri-grid {c.rendering['triplane_size']}^2 x 3 x 32 x {c.rendering['triplane_depth']}"
