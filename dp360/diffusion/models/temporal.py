"""View-consistency (temporal) modules and where they sit in the UNet.

Each module is AnimateDiff's temporal transformer as the reference uses it: GroupNorm *per
frame* (diffusers' `AnimateDiffTransformer3D` normalises over all frames jointly, which is not
the same), a Linear in, one transformer block with two self-attentions over the frame axis
(sinusoidal positions added before each) and a GEGLU feed-forward, a zero-initialised Linear
out, and an outer residual. Frames are groups of `frames` consecutive batch items.

Placement (reference): after every down-path layer (resnet, or resnet + attention) before the
downsampler, none in the middle, and after every whole up-block layer; for the last layer of an
up block with an upsampler that is *after* the upsampler (diffusers' `UNetMotionModel` puts it
before). They are attached to a stock `UNet2DConditionModel` with forward hooks.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TemporalModule(nn.Module):
    def __init__(
        self, channels: int, num_attention_heads: int = 8, norm_num_groups: int = 32, max_seq_length: int = 24
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    channels,
                    num_attention_heads,
                    channels // num_attention_heads,
                    cross_attention_dim=None,
                    activation_fn="geglu",
                    attention_bias=False,
                    double_self_attention=True,
                    positional_embeddings="sinusoidal",
                    num_positional_embeddings=max_seq_length,
                )
            ]
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, frames: int) -> torch.Tensor:
        batch_frames, channels, height, width = hidden_states.shape
        if batch_frames % frames:
            raise ValueError(f"a batch of {batch_frames} is not a whole number of {frames}-frame groups")
        groups = batch_frames // frames
        residual = hidden_states
        hidden = self.norm(hidden_states)  # per frame, as AnimateDiff does
        hidden = hidden.permute(0, 2, 3, 1).reshape(batch_frames, height * width, channels)
        hidden = self.proj_in(hidden)
        # (groups * frames, HW, C) -> (groups * HW, frames, C): attend over the frame axis.
        hidden = (
            hidden.view(groups, frames, height * width, channels)
            .transpose(1, 2)
            .reshape(groups * height * width, frames, channels)
        )
        for block in self.transformer_blocks:
            hidden = block(hidden)
        hidden = self.proj_out(hidden)
        hidden = hidden.view(groups, height * width, frames, channels).transpose(1, 2)
        hidden = hidden.reshape(batch_frames, height, width, channels).permute(0, 3, 1, 2)
        return hidden + residual


class TemporalModules(ModelMixin, ConfigMixin):
    """All view-consistency modules of one UNet: `down.{k}` (levels x layers) and `up.{k}`
    (levels x (layers + 1)), channels following the UNet's blocks."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        num_attention_heads: int = 8,
        norm_num_groups: int = 32,
        max_seq_length: int = 24,
    ):
        super().__init__()

        def make(channels):
            return TemporalModule(channels, num_attention_heads, norm_num_groups, max_seq_length)

        self.down = nn.ModuleList([make(c) for c in block_out_channels for _ in range(layers_per_block)])
        self.up = nn.ModuleList([make(c) for c in reversed(block_out_channels) for _ in range(layers_per_block + 1)])


class TemporalState:
    """Whether the hooks apply, and the group size."""

    def __init__(self, frames: int = 8):
        self.frames = frames
        self.enabled = True


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


def _with_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if hasattr(output, "sample"):
        output.sample = hidden
        return output
    return hidden


def temporal_sites(unet: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The UNet submodules after which the down and up temporal modules apply, in index order."""
    down_sites, up_sites = [], []
    for block in unet.down_blocks:
        layers = block.attentions if getattr(block, "attentions", None) else block.resnets
        down_sites.extend(layers)
    for block in unet.up_blocks:
        layers = list(block.attentions if getattr(block, "attentions", None) else block.resnets)
        if getattr(block, "upsamplers", None):
            layers[-1] = block.upsamplers[0]  # the reference applies it after the upsampler
        up_sites.extend(layers)
    return down_sites, up_sites


def attach_temporal_modules(unet: nn.Module, temporal: TemporalModules, frames: int = 8) -> TemporalState:
    """Hook `temporal` into `unet`; returns the state that switches them on and off."""
    state = TemporalState(frames)
    down_sites, up_sites = temporal_sites(unet)
    if len(down_sites) != len(temporal.down) or len(up_sites) != len(temporal.up):
        raise ValueError(
            f"temporal modules ({len(temporal.down)} down, {len(temporal.up)} up) do not fit the UNet "
            f"({len(down_sites)} down, {len(up_sites)} up sites)"
        )

    def hook_for(module: TemporalModule):
        def hook(_site, _args, output):
            if not state.enabled:
                return output
            return _with_hidden(output, module(_hidden_of(output), state.frames))

        return hook

    handles = [
        site.register_forward_hook(hook_for(m))
        for site, m in zip(down_sites + up_sites, list(temporal.down) + list(temporal.up))
    ]
    state.handles = handles
    return state
