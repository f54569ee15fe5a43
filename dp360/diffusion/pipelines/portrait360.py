"""The two DiffPortrait360 pipelines.

`BackViewPipeline` (model F): one frame, front reference only, a fixed back camera image,
Gaussian start. `Portrait360Pipeline`: N views (32 by default) in chunks of 8 consecutive
views, front + back references, camera ControlNet per view, view-consistency modules, initial
latents from the 3D-aware noise frames forward-diffused to t = 999. Both use DDIM (50 steps,
eta 0.5) with guidance 3 against the plain UNet, as the reference does.

Work saved against the reference, each equal to the plain computation (tests check each):
- all chunks advance step by step together, so that one reference pass per step serves every
  chunk, and that pass takes the front and back images as one batch of 2;
- the bank keys and values are projected once per step and reused by every chunk;
- the ControlNet is not run for the unconditional pass, and its camera-condition embedding is
  computed once per chunk instead of at every step;
- the networks' device and dtypes are read once per call;
- DDIM's per-step noise of a CPU generator is drawn ahead (same numbers, same order) and moved to
  the device in large blocks, instead of a small host-to-device copy at every chunk and step;
- the VAE encodes and decodes 8 images per call (memory, not time).
`Shortcuts.PLAIN` turns the switchable ones off (the tests compare both ways).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel

from ..models.configs import FORWARD_COEFFICIENTS
from ..models.reference_attention import ReferenceBanks
from ..models.temporal import TemporalModules, attach_temporal_modules
from .common import (
    VAE_BATCH_SIZE,
    ImageInput,
    Placement,
    ReferencePipelineMixin,
    check,
    check_vae_batch_size,
    images_to_batch,
    to_pil,
    to_tensor,
)

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


@dataclass(frozen=True)
class Shortcuts:
    """Work the pipelines can skip; each shortcut gives the plain computation's result, which
    the tests check by running both ways."""

    batch_references: bool = True  # the front and back reference passes as one batch of 2
    reuse_bank_projections: bool = True  # bank keys/values projected once per step, not per chunk
    embed_cameras_once: bool = True  # the ControlNet's camera embedding once per chunk, not per step
    predraw_variance_noise: bool = True  # a CPU generator's DDIM noise drawn ahead, moved in blocks

    PLAIN: ClassVar[Shortcuts]


Shortcuts.PLAIN = Shortcuts(False, False, False, False)


class VarianceNoise:
    """DDIM's per-step noise (eta > 0) for the chunks of a call, taken chunk by chunk in the
    order the scheduler would draw it (step by step, chunk by chunk within a step).

    With a CPU generator (what the views stage uses, so that a seed gives the same views on any
    device) the noise is drawn ahead on the CPU with the very calls the scheduler makes, then
    moved to the device in blocks of at most `block_bytes` (pinned, asynchronous on CUDA): the
    same numbers as before, without a host-to-device copy, and the host waiting for the device,
    at every chunk and step. With no generator, or one on the execution device, the scheduler
    draws on the device at each step as before (a device generator's numbers differ from a CPU
    generator's for the same seed, and across devices)."""

    def __init__(
        self,
        generator: torch.Generator | None,
        eta: float,
        shapes: Sequence[tuple[int, ...]],
        steps: int,
        device: torch.device,
        predraw: bool = True,
        block_bytes: int = 256 * 2**20,
    ):
        self.generator, self.shapes, self.device, self.block_bytes = generator, list(shapes), device, block_bytes
        self.predraw = predraw and eta > 0 and generator is not None and generator.device.type == "cpu"
        self.steps_left = steps
        self.queue: deque[torch.Tensor] = deque()

    def _draw_block(self) -> None:
        per_step = sum(math.prod(shape) for shape in self.shapes) * 4
        count = max(1, min(self.steps_left, self.block_bytes // per_step))
        draws = [
            torch.randn(shape, generator=self.generator, dtype=torch.float32)
            for _ in range(count)
            for shape in self.shapes
        ]
        flat = torch.cat([draw.flatten() for draw in draws])
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        self.queue.extend(
            part.view(draw.shape) for part, draw in zip(flat.split([draw.numel() for draw in draws]), draws)
        )
        self.steps_left -= count

    def step_arguments(self, chunk_count: int = 1) -> dict:
        """`scheduler.step` keyword arguments for the next `chunk_count` chunks (stepped as one)."""
        if not self.predraw:
            return {"generator": self.generator}
        parts = []
        for _ in range(chunk_count):
            if not self.queue:
                self._draw_block()
            parts.append(self.queue.popleft())
        return {"generator": None, "variance_noise": parts[0] if len(parts) == 1 else torch.cat(parts)}


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
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Gaussian latents, or `init_latents` forward-diffused to the last training timestep."""
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        device = device or self._execution_device
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if init_latents is None:
            return noise * self.scheduler.init_noise_sigma
        last = self.scheduler.config.num_train_timesteps - 1
        init_latents = init_latents.float().to(noise.device)
        stored = getattr(self.scheduler, FORWARD_COEFFICIENTS, None)
        if stored is not None:  # the release's q_sample: its stored (float16) sqrt coefficients
            signal, noise_scale = (float(values[last]) for values in stored)
            return signal * init_latents + noise_scale * noise
        return self.scheduler.add_noise(init_latents, noise, torch.tensor([last], device=noise.device))


class BackViewPipeline(ReferencePipelineMixin, _DDIMSampling, DiffusionPipeline):
    """Model F: the back of the head from the front portrait and one back camera image."""

    # Kept for tools that read it; offloading follows `offload_plan` (offload.py).
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
        shortcuts: Shortcuts | None = None,
    ) -> ViewsOutput:
        self.check_inputs(front_image, camera_image, num_inference_steps, guidance_scale, eta)
        shortcuts = shortcuts or Shortcuts()
        try:
            images = self._sample(
                front_image, camera_image, num_inference_steps, guidance_scale, eta, generator, shortcuts
            )
        finally:
            self._enter_phase("idle")
        self.maybe_free_model_hooks()
        return ViewsOutput(
            images=to_pil(images) if output_type == "pil" else images.cpu().float().numpy(), chunks=[[0]]
        )

    def _sample(self, front_image, camera_image, num_inference_steps, guidance_scale, eta, generator, shortcuts):
        placement = self._placement()
        device = placement.device
        size = self.image_size
        front = to_tensor(front_image, size, "front_image")
        camera = to_tensor(camera_image, size, "camera_image").to(device)
        self._enter_phase("prompt")
        prompt = self.encode_empty_prompt(device)
        self._enter_phase("encode")
        front_latent = self.encode_images(front, generator, placement=placement)
        self._enter_phase("denoise")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(1, generator, device=device)
        embedded = shortcuts.embed_cameras_once and self._embedding_allowed()
        if embedded:
            camera = self.embed_camera(camera, placement)
        noise_source = VarianceNoise(
            generator, eta, [tuple(latents.shape)], num_inference_steps, device, shortcuts.predraw_variance_noise
        )
        for timestep in self.progress_bar(self.scheduler.timesteps):
            banks = ReferenceBanks([self.reference_bank(front_latent, timestep, prompt, placement.reference_unet)])
            noise = self.guided_noise(latents, timestep, prompt, banks, camera, guidance_scale, placement, embedded)
            latents = self.scheduler.step(
                noise, timestep, latents, eta=eta, **noise_source.step_arguments()
            ).prev_sample
        self._enter_phase("decode")
        return self.decode_latents(latents, placement=placement)


class Portrait360Pipeline(ReferencePipelineMixin, _DDIMSampling, DiffusionPipeline):
    """N consistent views of the whole head from the front portrait and its back view."""

    # Kept for tools that read it; offloading follows `offload_plan` (offload.py).
    model_cpu_offload_seq = "text_encoder->reference_unet->controlnet->unet->vae"
    offload_plan = {
        **ReferencePipelineMixin.offload_plan,
        "denoise": ("unet", "temporal", "reference_unet", "controlnet"),
    }

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
        self,
        front_image,
        back_image,
        camera_images,
        noise_frames,
        num_inference_steps,
        guidance_scale,
        eta,
        vae_batch_size=VAE_BATCH_SIZE,
        chunks_per_call=1,
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
        check_vae_batch_size(vae_batch_size)
        check(
            isinstance(chunks_per_call, int) and chunks_per_call >= 1,
            f"chunks_per_call must be a positive integer, got {chunks_per_call!r}",
        )

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
        vae_batch_size: int = VAE_BATCH_SIZE,
        chunks_per_call: int = 1,
        shortcuts: Shortcuts | None = None,
        on_decoded: Callable[[int, list], None] | None = None,
    ) -> ViewsOutput:
        """`share_reference_pass=False` reproduces the reference's work pattern (the reference
        network at batch 8 for every chunk and step, no shortcut); the result is the same.

        `vae_batch_size`: images per VAE encode/decode call. `chunks_per_call`: chunks of 8 views
        denoised in one UNet call (more memory, fewer calls; the same result, up to float rounding,
        with a CPU generator, whose noise is drawn chunk by chunk either way; a device generator
        draws one tensor for the call instead, other numbers). `shortcuts`: see
        `Shortcuts`. `on_decoded(first_view, images)`: called with each decoded slice of views
        (PIL images, or arrays for other output types) while the next slice decodes."""
        self.check_inputs(
            front_image,
            back_image,
            camera_images,
            noise_frames,
            num_inference_steps,
            guidance_scale,
            eta,
            vae_batch_size,
            chunks_per_call,
        )
        if noise_frames is None:
            log.warning(
                "No 3D-aware noise frames: starting from Gaussian noise, so the views follow the cameras less faithfully."
            )
        shortcuts = shortcuts or (Shortcuts() if share_reference_pass else Shortcuts.PLAIN)
        if not share_reference_pass:
            chunks_per_call = 1

        def convert(images: torch.Tensor):
            return to_pil(images) if output_type == "pil" else images.cpu().float().numpy()

        decoded: list = []

        def on_slice(first: int, images: torch.Tensor) -> None:
            converted = convert(images)
            decoded.append(converted)
            if on_decoded is not None:
                on_decoded(first, converted)

        try:
            chunks = self._sample(
                front_image,
                back_image,
                camera_images,
                noise_frames,
                num_inference_steps,
                guidance_scale,
                eta,
                generator,
                share_reference_pass,
                vae_batch_size,
                chunks_per_call,
                shortcuts,
                on_slice,
            )
        finally:
            self._enter_phase("idle")
        self.maybe_free_model_hooks()
        images = [image for part in decoded for image in part] if output_type == "pil" else np.concatenate(decoded)
        return ViewsOutput(images=images, chunks=chunks)

    def _sample(
        self,
        front_image,
        back_image,
        camera_images,
        noise_frames,
        num_inference_steps,
        guidance_scale,
        eta,
        generator,
        share_reference_pass,
        vae_batch_size,
        chunks_per_call,
        shortcuts,
        on_slice,
    ) -> list[list[int]]:
        placement: Placement = self._placement()
        device = placement.device
        size = self.image_size
        view_count = len(camera_images)
        chunks, source = plan_chunks(view_count)
        references = torch.cat([to_tensor(front_image, size, "front_image"), to_tensor(back_image, size, "back_image")])
        cameras = images_to_batch(camera_images, size, "camera_images").to(device)
        frames = None if noise_frames is None else images_to_batch(noise_frames, size, "noise_frames")

        self._enter_phase("prompt")
        prompt = self.encode_empty_prompt(device)
        self._enter_phase("encode")
        references = self.encode_images(references, generator, vae_batch_size, placement)
        init = None if frames is None else self.encode_images(frames, generator, vae_batch_size, placement)

        self._enter_phase("denoise")
        latents = [
            self.prepare_latents(len(chunk), generator, None if init is None else init[chunk], device)
            for chunk in chunks
        ]
        embedded = shortcuts.embed_cameras_once and self._embedding_allowed()
        conditions = [self.embed_camera(cameras[chunk], placement) if embedded else cameras[chunk] for chunk in chunks]
        calls = [
            list(range(first, min(first + chunks_per_call, len(chunks))))
            for first in range(0, len(chunks), chunks_per_call)
        ]
        noise_source = VarianceNoise(
            generator,
            eta,
            [tuple(latent.shape) for latent in latents],
            num_inference_steps,
            device,
            shortcuts.predraw_variance_noise,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._reference_reader.share_projection = share_reference_pass
        try:
            with self.progress_bar(total=num_inference_steps * len(chunks)) as progress:
                for timestep in self.scheduler.timesteps:
                    if share_reference_pass:
                        banks = self.reference_banks(
                            references,
                            timestep,
                            prompt,
                            placement.reference_unet,
                            batched=shortcuts.batch_references,
                            reuse_projections=shortcuts.reuse_bank_projections,
                        )
                    for call in calls:
                        if not share_reference_pass:
                            # The reference's pattern: each reference repeated for every view of
                            # the chunk, one reference pass per reference image.
                            count = len(chunks[call[0]])
                            banks = ReferenceBanks(
                                [
                                    self.reference_bank(
                                        references[i : i + 1].expand(count, -1, -1, -1),
                                        timestep,
                                        prompt,
                                        placement.reference_unet,
                                    )
                                    for i in range(references.shape[0])
                                ],
                                reuse_projections=False,
                            )
                        batch = torch.cat([latents[index] for index in call]) if len(call) > 1 else latents[call[0]]
                        condition = (
                            torch.cat([conditions[index] for index in call]) if len(call) > 1 else conditions[call[0]]
                        )
                        noise = self.guided_noise(
                            batch, timestep, prompt, banks, condition, guidance_scale, placement, embedded
                        )
                        stepped = self.scheduler.step(
                            noise, timestep, batch, eta=eta, **noise_source.step_arguments(len(call))
                        ).prev_sample
                        for index, part in zip(call, stepped.split([len(chunks[index]) for index in call])):
                            latents[index] = part
                        progress.update(len(call))
        finally:
            self._reference_reader.share_projection = True
        final = torch.stack([latents[chunk_index][position] for chunk_index, position in source])
        self._enter_phase("decode")
        self.decode_latents(final, vae_batch_size, placement, on_slice)
        return chunks
