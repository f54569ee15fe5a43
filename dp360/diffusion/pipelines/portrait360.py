"""The two DiffPortrait360 pipelines.

`BackViewPipeline` (model F): one frame, front reference only, a fixed back camera image,
Gaussian start. `Portrait360Pipeline`: N views (32 by default) in chunks of 8 consecutive
views, front + back references, camera ControlNet per view, view-consistency modules, initial
latents from the 3D-aware noise frames forward-diffused to t = 999. Both use DDIM (50 steps,
eta 0.5) with guidance 3 against the plain UNet, as the reference does.

Work saved against the reference, each equal to the plain computation (tests check it): the
reference network runs once per reference image per step at batch 1, and all chunks advance
step by step together so that one reference pass serves every chunk; the ControlNet is not run
for the unconditional pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel

from ..models.reference_attention import ReferenceBanks
from ..models.temporal import TemporalModules, attach_temporal_modules
from .common import ImageInput, ReferencePipelineMixin, check, images_to_batch, to_pil, to_tensor

log = logging.getLogger(__name__)

FRAMES_PER_CHUNK = 8


@dataclass
class ViewsOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray
    chunks: list[list[int]]


def plan_chunks(view_count: int, frames: int = FRAMES_PER_CHUNK) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Windows of `frames` consecutive views (cyclically) covering the orbit, and for each view
    the (chunk, position) it is taken from.

    A count that is a multiple of `frames` gives disjoint chunks, as the reference does. Any other
    count gets ceil(n / frames) windows with evenly spread starts, so neighbouring windows overlap
    by a view or two; a view in two windows is taken from the one where it sits nearer the middle,
    since the temporal modules see both of its neighbours there."""
    if view_count < frames:
        raise ValueError(f"need at least {frames} views, got {view_count}")
    count = math.ceil(view_count / frames)
    starts = [round(index * view_count / count) for index in range(count)]
    chunks = [[(start + offset) % view_count for offset in range(frames)] for start in starts]
    centre = (frames - 1) / 2
    source: list[tuple[int, int] | None] = [None] * view_count
    for chunk_index, chunk in enumerate(chunks):
        for position, view in enumerate(chunk):
            current = source[view]
            if current is None or abs(position - centre) < abs(current[1] - centre):
                source[view] = (chunk_index, position)
    return chunks, source  # type: ignore[return-value]


class _DDIMSampling:
    def _check_sampling(self, num_inference_steps: int, guidance_scale: float, eta: float) -> None:
        check(
            isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= 1000,
            f"num_inference_steps must be an integer in 1..1000, got {num_inference_steps!r}",
        )
        check(guidance_scale >= 1.0, f"guidance_scale must be at least 1 (1 turns guidance off), got {guidance_scale}")
        check(0.0 <= eta <= 1.0, f"eta must be in [0, 1], got {eta}")

    def prepare_latents(
        self,
        batch: int,
        generator: torch.Generator | None,
        init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gaussian latents, or `init_latents` forward-diffused to the last training timestep."""
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        if init_latents is None:
            return noise * self.scheduler.init_noise_sigma
        last = torch.tensor([self.scheduler.config.num_train_timesteps - 1], device=noise.device)
        return self.scheduler.add_noise(init_latents.float().to(noise.device), noise, last)


class BackViewPipeline(DiffusionPipeline, ReferencePipelineMixin, _DDIMSampling):
    """Model F: the back of the head from the front portrait and one back camera image."""

    model_cpu_offload_seq = "text_encoder->reference_unet->controlnet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        reference_unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        scheduler: DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            unet=unet,
            reference_unet=reference_unet,
            controlnet=controlnet,
            scheduler=scheduler,
        )
        self._install_reference_attention()

    def check_inputs(self, front_image, camera_image, num_inference_steps, guidance_scale, eta) -> None:
        check(front_image is not None, "front_image is required")
        check(camera_image is not None, "camera_image (the back camera-condition render) is required")
        self._check_sampling(num_inference_steps, guidance_scale, eta)

    @torch.no_grad()
    def __call__(
        self,
        front_image: ImageInput,
        camera_image: ImageInput,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> ViewsOutput:
        self.check_inputs(front_image, camera_image, num_inference_steps, guidance_scale, eta)
        device = self._execution_device
        size = self.image_size
        prompt = self.encode_empty_prompt(device)
        front_latent = self.encode_images(to_tensor(front_image, size, "front_image"), generator)
        camera = to_tensor(camera_image, size, "camera_image").to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(1, generator)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            banks = ReferenceBanks([self.reference_bank(front_latent, timestep, prompt)])
            noise = self.guided_noise(latents, timestep, prompt, banks, camera, guidance_scale)
            latents = self.scheduler.step(noise, timestep, latents, eta=eta, generator=generator).prev_sample
        images = self.decode_latents(latents)
        self.maybe_free_model_hooks()
        return ViewsOutput(
            images=to_pil(images) if output_type == "pil" else images.cpu().float().numpy(), chunks=[[0]]
        )


class Portrait360Pipeline(DiffusionPipeline, ReferencePipelineMixin, _DDIMSampling):
    """N consistent views of the whole head from the front portrait and its back view."""

    model_cpu_offload_seq = "text_encoder->reference_unet->controlnet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        reference_unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        temporal: TemporalModules,
        scheduler: DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            unet=unet,
            reference_unet=reference_unet,
            controlnet=controlnet,
            temporal=temporal,
            scheduler=scheduler,
        )
        self._install_reference_attention()
        self._temporal_state = getattr(unet, "_dp360_temporal_state", None) or attach_temporal_modules(
            unet, temporal, FRAMES_PER_CHUNK
        )
        unet._dp360_temporal_state = self._temporal_state

    def check_inputs(
        self, front_image, back_image, camera_images, noise_frames, num_inference_steps, guidance_scale, eta
    ) -> None:
        check(front_image is not None, "front_image is required")
        check(back_image is not None, "back_image is required (generate it with BackViewPipeline)")
        check(
            camera_images is not None and len(camera_images) >= FRAMES_PER_CHUNK,
            f"camera_images must hold at least {FRAMES_PER_CHUNK} camera-condition images, one per view",
        )
        if noise_frames is not None:
            check(
                len(noise_frames) == len(camera_images),
                f"noise_frames must hold one frame per view: {len(noise_frames)} frames for {len(camera_images)} views",
            )
        self._check_sampling(num_inference_steps, guidance_scale, eta)

    @torch.no_grad()
    def __call__(
        self,
        front_image: ImageInput,
        back_image: ImageInput,
        camera_images: Sequence[ImageInput],
        noise_frames: Sequence[ImageInput] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        share_reference_pass: bool = True,
    ) -> ViewsOutput:
        """`share_reference_pass=False` reproduces the reference's work pattern (the reference
        network at batch 8 for every chunk and step); the result is the same."""
        self.check_inputs(
            front_image, back_image, camera_images, noise_frames, num_inference_steps, guidance_scale, eta
        )
        if noise_frames is None:
            log.warning(
                "No 3D-aware noise frames: starting from Gaussian noise, so the views follow the cameras less faithfully."
            )
        device = self._execution_device
        size = self.image_size
        view_count = len(camera_images)
        chunks, source = plan_chunks(view_count)
        prompt = self.encode_empty_prompt(device)
        references = self.encode_images(
            torch.cat([to_tensor(front_image, size, "front_image"), to_tensor(back_image, size, "back_image")]),
            generator,
        )
        cameras = images_to_batch(camera_images, size, "camera_images").to(device)
        init = (
            None
            if noise_frames is None
            else self.encode_images(images_to_batch(noise_frames, size, "noise_frames"), generator)
        )
        latents = [
            self.prepare_latents(len(chunk), generator, None if init is None else init[chunk]) for chunk in chunks
        ]

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._reference_reader.share_projection = share_reference_pass
        with self.progress_bar(total=num_inference_steps * len(chunks)) as progress:
            for timestep in self.scheduler.timesteps:
                if share_reference_pass:
                    banks = ReferenceBanks(
                        [self.reference_bank(references[i : i + 1], timestep, prompt) for i in range(2)]
                    )
                for index, chunk in enumerate(chunks):
                    if not share_reference_pass:
                        repeated = [references[i : i + 1].expand(len(chunk), -1, -1, -1) for i in range(2)]
                        banks = ReferenceBanks(
                            [
                                self.reference_bank(latent, timestep, prompt.expand(len(chunk), -1, -1))
                                for latent in repeated
                            ]
                        )
                    noise = self.guided_noise(latents[index], timestep, prompt, banks, cameras[chunk], guidance_scale)
                    latents[index] = self.scheduler.step(
                        noise, timestep, latents[index], eta=eta, generator=generator
                    ).prev_sample
                    progress.update()
        self._reference_reader.share_projection = True
        final = torch.stack([latents[chunk_index][position] for chunk_index, position in source])
        images = self.decode_latents(final)
        self.maybe_free_model_hooks()
        return ViewsOutput(
            images=to_pil(images) if output_type == "pil" else images.cpu().float().numpy(), chunks=chunks
        )
