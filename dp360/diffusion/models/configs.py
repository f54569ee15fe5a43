"""Component configurations: the full-size SD1.5 family used by DiffPortrait360 and a tiny
family with the same structure (two UNet levels, the last without attention, as in SD1.5)
for fast tests and `dp360 doctor --smoke`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# CLIP token ids of the empty prompt "": BOS then EOS, padded with EOS to 77 tokens.
CLIP_BOS, CLIP_EOS, CLIP_LENGTH = 49406, 49407, 77
VAE_SCALING_FACTOR = 0.18215
# The DDIM scheduler attribute that holds the release's stored (sqrt(a_t), sqrt(1 - a_t)), float32,
# set by `load_bundle` when the bundle keeps them; `prepare_latents` forward-diffuses with them.
FORWARD_COEFFICIENTS = "release_forward_coefficients"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    unet: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    temporal: dict[str, Any]
    image_size: int
    frames: int = 8
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        )
    )


def _unet(channels, down, up, cross, heads, groups, sample):
    return dict(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=2,
        cross_attention_dim=cross,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads in SD1.5 configs
        norm_num_groups=groups,
    )


def _controlnet(unet: dict[str, Any], embedding) -> dict[str, Any]:
    keep = (
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "norm_num_groups",
    )
    return {**{k: unet[k] for k in keep}, "conditioning_channels": 3, "conditioning_embedding_out_channels": embedding}


SD15_UNET = _unet(
    (320, 640, 1280, 1280),
    ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    768,
    8,
    32,
    64,
)

FULL = ModelFamily(
    name="sd15",
    unet=SD15_UNET,
    controlnet=_controlnet(SD15_UNET, (16, 32, 96, 256)),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=VAE_SCALING_FACTOR,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    temporal=dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        num_attention_heads=8,
        norm_num_groups=32,
        max_seq_length=24,
    ),
    image_size=512,
)

TINY_UNET = _unet((32, 64), ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"), 32, 4, 8, 8)

TINY = ModelFamily(
    name="tiny",
    unet=TINY_UNET,
    controlnet=_controlnet(TINY_UNET, (8, 8, 16, 16)),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
    ),
    temporal=dict(
        block_out_channels=(32, 64), layers_per_block=2, num_attention_heads=4, norm_num_groups=8, max_seq_length=24
    ),
    image_size=64,
)

FAMILIES = {"sd15": FULL, "tiny": TINY}
