"""What the back-view and 360-view pipelines share: input checks and conversion, the empty
prompt, VAE encoding, reference banks, one guided denoising step, decoding, and where the
networks run (the offload plan, low-VRAM mode and compilation are in offload.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


# Images per VAE encode or decode call: 8 at 512 px keeps the VAE's activations near 2 GiB in
# fp16 (34 images in one batch took about 15 GiB).
VAE_BATCH_SIZE = 8


@dataclass(frozen=True)
class Placement:
    """The execution device and each network's dtype, read once per pipeline call: reading
    `ModelMixin.dtype` walks every parameter of the model, and the per-step code needs them
    dozens of times per step."""

    device: torch.device
    unet: torch.dtype
    reference_unet: torch.dtype
    controlnet: torch.dtype
    vae: torch.dtype


class ConditionPassThrough:
    """Lets the ControlNet take an already-embedded camera condition: while `embedded` is set,
    its `controlnet_cond_embedding` returns its input unchanged. The camera images do not change
    during sampling, so their embedding is computed once per window instead of at every step."""

    def __init__(self, controlnet: torch.nn.Module):
        self.embedded = False
        embedding = controlnet.controlnet_cond_embedding
        original = embedding.forward

        def forward(conditioning: torch.Tensor) -> torch.Tensor:
            return conditioning if self.embedded else original(conditioning)

        embedding.forward = forward


def check_vae_batch_size(vae_batch_size: int) -> None:
    check(
        isinstance(vae_batch_size, int) and vae_batch_size >= 1,
        f"vae_batch_size must be a positive integer, got {vae_batch_size!r}",
    )


class ReferencePipelineMixin:
    """Methods for pipelines with `vae`, `text_encoder`, `unet`, `reference_unet`, `controlnet`
    and `scheduler` components. Listed before `DiffusionPipeline` among the bases, so that its
    offload methods replace diffusers' ones."""

    # Phase -> the components that run in it (see offload.py); every component with weights is
    # in a phase or in `offload_excluded` with the reason (a test holds every pipeline to it).
    offload_plan: dict[str, tuple[str, ...]] = {
        "prompt": ("text_encoder",),
        "encode": ("vae",),
        "denoise": ("unet", "reference_unet", "controlnet"),
        "decode": ("vae",),
        "idle": (),
    }
    offload_excluded: dict[str, str] = {}

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
        self._condition = getattr(self.controlnet, "_dp360_condition", None) or ConditionPassThrough(self.controlnet)
        self.controlnet._dp360_condition = self._condition

    # -- where the networks run ------------------------------------------------------------------

    @property
    def _execution_device(self) -> torch.device:
        offload = getattr(self, "_phase_offload", None)
        if offload is not None:
            return offload.device
        return super()._execution_device

    def enable_phase_offload(self, device: str | torch.device = "cuda", offload_device: str | torch.device = "cpu"):
        """Model offload by phase (offload.py): the denoising networks stay on `device` together
        for all steps; the text encoder and the VAE wait on `offload_device` while they are idle,
        and so does everything between calls."""
        from .offload import PhaseOffload

        self._phase_offload = PhaseOffload(self, device, offload_device)
        self._phase_offload.enter("idle")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """diffusers' name for model offload; here it is the phase plan (diffusers' hooks would
        leave the temporal modules on the CPU and move networks at every step)."""
        if device is None:
            device = f"cuda:{gpu_id}" if gpu_id is not None else "cuda"
        self.enable_phase_offload(device)

    def enable_low_vram(self, device: str | torch.device = "cuda") -> None:
        """Group offloading (offload.py): weights in CPU memory, moved to `device` block by block."""
        from .offload import apply_low_vram

        self._phase_offload = None
        apply_low_vram(self, device)

    def enable_compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile of the UNet (with its temporal modules), reference network and ControlNet."""
        from .offload import apply_compile

        apply_compile(self, backend=backend, mode=mode)

    def _enter_phase(self, phase: str) -> None:
        offload = getattr(self, "_phase_offload", None)
        if offload is not None:
            offload.enter(phase)

    def _placement(self) -> Placement:
        return Placement(
            device=torch.device(self._execution_device),
            unet=self.unet.dtype,
            reference_unet=self.reference_unet.dtype,
            controlnet=self.controlnet.dtype,
            vae=self.vae.dtype,
        )

    # -- the pieces of a call --------------------------------------------------------------------

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
    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None,
        batch_size: int = VAE_BATCH_SIZE,
        placement: Placement | None = None,
    ) -> torch.Tensor:
        """VAE latents of images in [-1, 1]: a posterior sample times the scaling factor (as the
        reference does), `batch_size` images per VAE call. The posterior noise of the slices is
        drawn one slice after the other from `generator`, which gives the same numbers as one
        draw for the whole batch."""
        placement = placement or self._placement()
        images = images.to(device=placement.device, dtype=placement.vae)
        latents = [self.vae.encode(part).latent_dist.sample(generator=generator) for part in images.split(batch_size)]
        return torch.cat(latents) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        batch_size: int = VAE_BATCH_SIZE,
        placement: Placement | None = None,
        on_slice=None,
    ) -> torch.Tensor:
        """Images in [-1, 1], `batch_size` per VAE call; `on_slice(first_index, images)` is called
        after each slice (the caller can write those while the next slice decodes)."""
        dtype = placement.vae if placement is not None else self.vae.dtype
        latents = latents / self.vae.config.scaling_factor
        images, first = [], 0
        for part in latents.split(batch_size):
            decoded = self.vae.decode(part.to(dtype)).sample.clamp(-1, 1)
            if on_slice is not None:
                on_slice(first, decoded)
            images.append(decoded)
            first += part.shape[0]
        return torch.cat(images)

    @torch.no_grad()
    def reference_bank(
        self,
        reference_latent: torch.Tensor,
        timestep: torch.Tensor,
        prompt: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the reference network once on clean reference latents (any batch) and return the
        bank it records (one entry per block, at that batch)."""
        dtype = dtype or self.reference_unet.dtype
        bank: dict[str, torch.Tensor] = {}
        self._reference_writer.recording = bank
        try:
            self.reference_unet(
                reference_latent.to(dtype),
                timestep,
                encoder_hidden_states=prompt.to(dtype).expand(reference_latent.shape[0], -1, -1),
            )
        finally:
            self._reference_writer.recording = None
        return bank

    @torch.no_grad()
    def reference_banks(
        self,
        references: torch.Tensor,
        timestep: torch.Tensor,
        prompt: torch.Tensor,
        dtype: torch.dtype | None = None,
        batched: bool = True,
        reuse_projections: bool = True,
    ) -> ReferenceBanks:
        """The banks of R reference latents (front, back), in that order: one reference pass at
        batch R (`batched`), or one pass per image at batch 1 (the plain computation)."""
        if batched:
            return ReferenceBanks.from_batch(
                self.reference_bank(references, timestep, prompt, dtype), reuse_projections
            )
        return ReferenceBanks(
            [self.reference_bank(references[i : i + 1], timestep, prompt, dtype) for i in range(references.shape[0])],
            reuse_projections,
        )

    @torch.no_grad()
    def embed_camera(self, camera: torch.Tensor, placement: Placement | None = None) -> torch.Tensor:
        """The ControlNet's conditioning embedding of camera images in [-1, 1] (B, 3, H, W)."""
        placement = placement or self._placement()
        return self.controlnet.controlnet_cond_embedding(camera.to(device=placement.device, dtype=placement.controlnet))

    def _embedding_allowed(self) -> bool:
        # diffusers flips BGR conditions before the embedding; an embedded one cannot be flipped.
        return getattr(self.controlnet.config, "controlnet_conditioning_channel_order", "rgb") == "rgb"

    @torch.no_grad()
    def guided_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt: torch.Tensor,
        banks: ReferenceBanks,
        camera: torch.Tensor,
        guidance_scale: float,
        placement: Placement | None = None,
        camera_embedded: bool = False,
    ) -> torch.Tensor:
        """eps = eps_uncond + g (eps_cond - eps_uncond); the conditional pass has the reference
        banks and the ControlNet residuals, the unconditional one is the plain UNet (the
        reference's `controlnet_important` mode, so the ControlNet is not run for it).
        `camera_embedded`: `camera` is `embed_camera`'s output rather than the images."""
        placement = placement or self._placement()
        unet_dtype, controlnet_dtype = placement.unet, placement.controlnet
        batch = latents.shape[0]
        prompt_batch = prompt.expand(batch, -1, -1).to(unet_dtype)
        model_input = latents.to(unet_dtype)
        self._condition.embedded = camera_embedded
        try:
            down, middle = self.controlnet(
                model_input.to(controlnet_dtype),
                timestep,
                encoder_hidden_states=prompt_batch.to(controlnet_dtype),
                controlnet_cond=camera.to(device=latents.device, dtype=controlnet_dtype),
                conditioning_scale=1.0,
                return_dict=False,
            )
        finally:
            self._condition.embedded = False
        self._reference_reader.reading = banks
        try:
            conditional = self.unet(
                model_input,
                timestep,
                encoder_hidden_states=prompt_batch,
                down_block_additional_residuals=[residual.to(unet_dtype) for residual in down],
                mid_block_additional_residual=middle.to(unet_dtype),
            ).sample
        finally:
            self._reference_reader.reading = None
        if guidance_scale == 1.0:
            return conditional.float()
        unconditional = self.unet(model_input, timestep, encoder_hidden_states=prompt_batch).sample
        return (unconditional + guidance_scale * (conditional - unconditional)).float()


def images_to_batch(images: Sequence[ImageInput], size: int, name: str) -> torch.Tensor:
    return torch.cat([to_tensor(image, size, f"{name}[{index}]") for index, image in enumerate(images)])
