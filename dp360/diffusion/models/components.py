"""Build the diffusers components of a model family (random weights; loading fills them)."""

from __future__ import annotations

from typing import Any

import torch

from .configs import ModelFamily
from .temporal import TemporalModules

MAIN_COMPONENTS = ("unet", "temporal", "reference_unet", "controlnet", "vae", "text_encoder")
BACK_COMPONENTS = ("unet", "reference_unet", "controlnet", "vae", "text_encoder")


def component_config(family: ModelFamily, name: str) -> dict[str, Any]:
    return {
        "unet": family.unet,
        "reference_unet": family.unet,
        "controlnet": family.controlnet,
        "temporal": family.temporal,
        "vae": family.vae,
        "text_encoder": family.text_encoder,
    }[name]


def build_component(family: ModelFamily, name: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = component_config(family, name)
    if name in ("unet", "reference_unet"):
        return UNet2DConditionModel(**config)
    if name == "controlnet":
        return ControlNetModel(**config)
    if name == "temporal":
        return TemporalModules(**config)
    if name == "vae":
        return AutoencoderKL(**config)
    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    raise KeyError(name)


def build_components(family: ModelFamily, names=MAIN_COMPONENTS) -> dict[str, torch.nn.Module]:
    return {name: build_component(family, name) for name in names}
