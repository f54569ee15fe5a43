"""Official DiffPortrait360 checkpoints (LDM key layout) <-> per-component diffusers state dicts.

Every diffusers parameter name has exactly one LDM name (`ldm_name`), computed from the
component's config; conversion inverts that table, so a source key that no component claims is
a leftover and a component parameter that no source key fills is missing, and both fail the
conversion with the list of offenders. The same table writes tiny checkpoints in the official
layout for tests (`to_official_layout`).

Official prefixes (ARCHITECTURE.md 2.8):
  model.diffusion_model.                         SD1.5 UNet (+ motion modules in the main model)
  control_model.                                 the reference (appearance) network, a UNet copy without `out.*`
  pose_control_model.                            the camera ControlNet
  first_stage_model.                             the VAE
  cond_stage_model.transformer.                  the CLIP text encoder
  (top level)                                    DDPM schedule buffers, recomputed by the scheduler
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import Dp360Error

COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "temporal": "model.diffusion_model.",
    "reference_unet": "control_model.",
    "controlnet": "pose_control_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
# Top-level LDM buffers: the DDPM schedule (recomputed by DDIMScheduler) and logvar (unused).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
# Source keys that are accounted for without being copied (recomputed or obsolete buffers).
_IGNORED_SOURCE = (
    re.compile(r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$"),
    re.compile(
        r"^model\.diffusion_model\.(input|output)_blocks_motion_module\.\d+\.0\.temporal_transformer\.transformer_blocks\.0\.attention_blocks\.[01]\.pos_encoder\.pe$"
    ),
)
# Target entries that no official key fills, by design: the reference network's output head
# (never evaluated for its value) and buffers computed at construction.
_UNFILLED_BY_DESIGN = {
    "reference_unet": (re.compile(r"^conv_norm_out\."), re.compile(r"^conv_out\.")),
    "temporal": (re.compile(r"\.pos_embed\.pe$"),),
    "text_encoder": (re.compile(r"position_ids$"),),
}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_name(key: str, config: Mapping[str, Any]) -> str:
    """diffusers UNet2DConditionModel / ControlNetModel key -> LDM UNet key (no prefix)."""
    layers = config["layers_per_block"]
    parts = key.split(".")
    if parts[0] == "conv_in":
        return "input_blocks.0.0." + ".".join(parts[1:])
    if parts[0] == "time_embedding":
        return {"linear_1": "time_embed.0.", "linear_2": "time_embed.2."}[parts[1]] + ".".join(parts[2:])
    if parts[0] == "conv_norm_out":
        return "out.0." + ".".join(parts[1:])
    if parts[0] == "conv_out":
        return "out.2." + ".".join(parts[1:])
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        index = 1 + block * (layers + 1) + int(parts[3])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_RESNET[parts[4]]}." + ".".join(parts[5:])
        return f"input_blocks.{index}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_RESNET[parts[3]]}." + ".".join(parts[4:])
        return "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        has_attention = config["up_block_types"][block].startswith("CrossAttn")
        if kind == "upsamplers":
            index = block * (layers + 1) + layers
            return f"output_blocks.{index}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
        index = block * (layers + 1) + int(parts[3])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_RESNET[parts[4]]}." + ".".join(parts[5:])
        return f"output_blocks.{index}.1." + ".".join(parts[4:])
    if parts[0] == "controlnet_cond_embedding":
        blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
        if parts[1] == "conv_in":
            return "input_hint_block.0." + parts[2]
        if parts[1] == "conv_out":
            return f"input_hint_block.{2 * (blocks + 1)}." + parts[2]
        return f"input_hint_block.{2 * (int(parts[2]) + 1)}." + parts[3]
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0." + parts[2]
    if parts[0] == "controlnet_mid_block":
        return "middle_block_out.0." + parts[1]
    raise KeyError(key)


_MM_INNER = (
    ("attn1.", "attention_blocks.0."),
    ("attn2.", "attention_blocks.1."),
    ("norm1.", "norms.0."),
    ("norm2.", "norms.1."),
    ("norm3.", "ff_norm."),
)


def _temporal_name(key: str, config: Mapping[str, Any]) -> str:
    side, index, rest = key.split(".", 2)
    if rest.startswith("transformer_blocks.0."):
        inner = rest[len("transformer_blocks.0.") :]
        for new, old in _MM_INNER:
            if inner.startswith(new):
                inner = old + inner[len(new) :]
                break
        rest = "transformer_blocks.0." + inner
    path = "input_blocks_motion_module" if side == "down" else "output_blocks_motion_module"
    return f"{path}.{index}.0.temporal_transformer.{rest}"


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_name(key: str, config: Mapping[str, Any]) -> str:
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side = parts[0]
    rest = parts[1:]
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out." + rest[1]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{_VAE_RESNET[rest[3]]}." + rest[4]
        field = rest[3]
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[field]}." + rest[-1]
    levels = len(config["block_out_channels"])
    block = int(rest[1])
    ldm_block = block if side == "encoder" else levels - 1 - block
    group = "down" if side == "encoder" else "up"
    if rest[2] == "resnets":
        return f"{side}.{group}.{ldm_block}.block.{rest[3]}.{_VAE_RESNET[rest[4]]}." + rest[5]
    sampler = "downsample" if side == "encoder" else "upsample"
    return f"{side}.{group}.{ldm_block}.{sampler}.conv." + rest[-1]


def _text_name(key: str, config: Mapping[str, Any]) -> str:
    # transformers < 5 nests CLIPTextModel's weights under `text_model.`; 5.x does not.
    return key if key.startswith("text_model.") else "text_model." + key


NAMERS: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    "unet": _unet_name,
    "reference_unet": _unet_name,
    "controlnet": _unet_name,
    "temporal": _temporal_name,
    "vae": _vae_name,
    "text_encoder": _text_name,
}


def ldm_name(component: str, key: str, config: Mapping[str, Any]) -> str:
    """Full official checkpoint key of a diffusers component's state-dict key."""
    return COMPONENT_PREFIXES[component] + NAMERS[component](key, config)


def _is_vae_attention_matrix(component: str, key: str) -> bool:
    return component == "vae" and ".attentions." in key and key.endswith(".weight") and "group_norm" not in key


def _unfilled_by_design(component: str, key: str) -> bool:
    return any(pattern.search(key) for pattern in _UNFILLED_BY_DESIGN.get(component, ()))


def _ignored_source(key: str) -> bool:
    return key in SCHEDULE_BUFFERS or any(pattern.search(key) for pattern in _IGNORED_SOURCE)


class ConversionError(Dp360Error):
    """A checkpoint does not match the components: leftovers or missing keys, listed."""


@dataclass
class ConversionReport:
    state_dicts: dict[str, dict[str, torch.Tensor]]
    ignored: list[str]
    unfilled_by_design: dict[str, list[str]]


def _offenders(title: str, keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def convert_official(
    checkpoint: Mapping[str, torch.Tensor],
    targets: Mapping[str, tuple[Mapping[str, Any], Mapping[str, torch.Size]]],
) -> ConversionReport:
    """Split an official checkpoint into diffusers state dicts.

    `targets` maps a component name to (its config, its state-dict shapes), e.g. from
    `{k: v.shape for k, v in model.state_dict().items()}`. Fails with `ConversionError` naming every
    source key left unused, every target entry left unfilled and every shape mismatch."""
    table: dict[str, tuple[str, str]] = {}
    unfilled_by_design: dict[str, list[str]] = {}
    for component, (config, shapes) in targets.items():
        for key in shapes:
            if _unfilled_by_design(component, key):
                unfilled_by_design.setdefault(component, []).append(key)
                continue
            table[ldm_name(component, key, config)] = (component, key)
    state_dicts: dict[str, dict[str, torch.Tensor]] = {component: {} for component in targets}
    leftovers, ignored, mismatched = [], [], []
    for source_key, tensor in checkpoint.items():
        if source_key in table:
            component, key = table[source_key]
            expected = tuple(targets[component][1][key])
            if _is_vae_attention_matrix(component, key) and tensor.ndim == 4:
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # LDM 1x1 conv -> Linear
            if tuple(tensor.shape) != expected:
                mismatched.append(f"{source_key} {tuple(tensor.shape)} -> {component}.{key} {expected}")
                continue
            state_dicts[component][key] = tensor
        elif _ignored_source(source_key):
            ignored.append(source_key)
        else:
            leftovers.append(source_key)
    missing = [f"{ldm}" for ldm, (component, key) in table.items() if key not in state_dicts[component]]
    problems = []
    if leftovers:
        problems.append(_offenders("checkpoint keys no component uses", leftovers))
    if missing:
        problems.append(_offenders("component parameters the checkpoint does not fill", missing))
    if mismatched:
        problems.append(_offenders("shape mismatches", mismatched))
    if problems:
        raise ConversionError("The checkpoint does not match dp360's components: " + "; ".join(problems) + ".")
    return ConversionReport(state_dicts, ignored, unfilled_by_design)


def to_official_layout(
    components: Mapping[str, tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]],
    schedule: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The inverse: component state dicts -> one checkpoint in the official key layout (used to
    write tiny official-layout checkpoints for tests and the smoke bundle)."""
    checkpoint: dict[str, torch.Tensor] = {}
    if schedule is not None:
        checkpoint["betas"] = schedule
    for component, (config, state) in components.items():
        for key, tensor in state.items():
            if _unfilled_by_design(component, key):
                continue
            if _is_vae_attention_matrix(component, key) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            checkpoint[ldm_name(component, key, config)] = tensor
    return checkpoint
