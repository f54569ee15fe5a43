"""What the back-view and 360-view pipelines share: input checks and conversion, the empty
prompt, VAE encoding, reference banks, one guided denoising step, decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import PIL.Image
import torch

from ...errors import Dp360Error
from ..models.configs import CLIP_BOS, CLIP_EOS, CLIP_LENGTH
from ..models.reference_attention import ReferenceBanks, install_reference_reader, install_reference_writer

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


class PipelineInputError(Dp360Error, ValueError):
    """An argument of a pipeline call is wrong; the message says which and how."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PipelineInputError(message)


def to_tensor(image: ImageInput, size: int, name: str) -> torch.Tensor:
    """PIL / uint8 HWC array / CHW tensor in [-1, 1] -> (1, 3, size, size) float in [-1, 1].

    PIL and arrays are resized with bicubic filtering, as the reference datasets do with
    Pillow's default `resize`."""
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        check(
            tensor.shape[0] == 1 and tensor.shape[1] == 3,
            f"{name} must be a (3, H, W) tensor in [-1, 1], got {tuple(image.shape)}",
        )
        if tensor.shape[-2:] != (size, size):
            tensor = torch.nn.functional.interpolate(
                tensor.float(), size=(size, size), mode="bicubic", align_corners=False
            )
        return tensor.float().clamp(-1, 1)
    if isinstance(image, np.ndarray):
        check(
            image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3,
            f"{name} must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}",
        )
        image = PIL.Image.fromarray(image)
    check(
        isinstance(image, PIL.Image.Image),
        f"{name} must be a PIL image, an (H, W, 3) uint8 array or a tensor, got {type(image).__name__}",
    )
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PIL.Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(frame) for frame in array]


class ReferencePipelineMixin:
    """Methods for pipelines with `vae`, `text_encoder`, `unet`, `reference_unet`, `controlnet`
    and `scheduler` components."""

    def _install_reference_attention(self) -> None:
        # Reuse the states when the same models were wired by an earlier pipeline.
        self._reference_writer = getattr(
            self.reference_unet, "_dp360_reference_state", None
        ) or install_reference_writer(self.reference_unet)
        self.reference_unet._dp360_reference_state = self._reference_writer
        self._reference_reader = getattr(self.unet, "_dp360_reference_state", None) or install_reference_reader(
            self.unet
        )
        self.unet._dp360_reference_state = self._reference_reader

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_empty_prompt(self, device: torch.device) -> torch.Tensor:
        """CLIP embedding of "": BOS, then EOS padding to 77 (no tokenizer needed)."""
        ids = torch.full((1, CLIP_LENGTH), CLIP_EOS, dtype=torch.long, device=device)
        ids[0, 0] = CLIP_BOS
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """VAE latents of images in [-1, 1]: a posterior sample times the scaling factor (as the
        reference does), one image at a time when VAE slicing is on."""
        images = images.to(device=self._execution_device, dtype=self.vae.dtype)
        slices = images.split(1) if getattr(self, "_vae_slicing", False) else [images]
        latents = [self.vae.encode(part).latent_dist.sample(generator=generator) for part in slices]
        return torch.cat(latents) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.vae.config.scaling_factor
        slices = latents.split(1) if getattr(self, "_vae_slicing", False) else [latents]
        return torch.cat([self.vae.decode(part.to(self.vae.dtype)).sample for part in slices]).clamp(-1, 1)

    def enable_vae_slicing(self) -> None:
        self._vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self._vae_slicing = False

    @torch.no_grad()
    def reference_bank(
        self, reference_latent: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the reference network once on one clean reference latent and return its bank."""
        bank: dict[str, torch.Tensor] = {}
        self._reference_writer.recording = bank
        try:
            self.reference_unet(
                reference_latent.to(self.reference_unet.dtype),
                timestep,
                encoder_hidden_states=prompt.to(self.reference_unet.dtype),
            )
        finally:
            self._reference_writer.recording = None
        return bank

    @torch.no_grad()
    def guided_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt: torch.Tensor,
        banks: ReferenceBanks,
        camera: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """eps = eps_uncond + g (eps_cond - eps_uncond); the conditional pass has the reference
        banks and the ControlNet residuals, the unconditional one is the plain UNet (the
        reference's `controlnet_important` mode, so the ControlNet is not run for it)."""
        batch = latents.shape[0]
        prompt_batch = prompt.expand(batch, -1, -1).to(self.unet.dtype)
        model_input = latents.to(self.unet.dtype)
        down, middle = self.controlnet(
            model_input.to(self.controlnet.dtype),
            timestep,
            encoder_hidden_states=prompt_batch.to(self.controlnet.dtype),
            controlnet_cond=camera.to(device=latents.device, dtype=self.controlnet.dtype),
            conditioning_scale=1.0,
            return_dict=False,
        )
        self._reference_reader.reading = banks
        try:
            conditional = self.unet(
                model_input,
                timestep,
                encoder_hidden_states=prompt_batch,
                down_block_additional_residuals=[residual.to(self.unet.dtype) for residual in down],
                mid_block_additional_residual=middle.to(self.unet.dtype),
            ).sample
        finally:
            self._reference_reader.reading = None
        if guidance_scale == 1.0:
            return conditional.float()
        unconditional = self.unet(model_input, timestep, encoder_hidden_states=prompt_batch).sample
        return (unconditional + guidance_scale * (conditional - unconditional)).float()


def images_to_batch(images: Sequence[ImageInput], size: int, name: str) -> torch.Tensor:
    return torch.cat([to_tensor(image, size, f"{name}[{index}]") for index, image in enumerate(images)])
