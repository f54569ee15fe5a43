"""Smoke test of the two pipelines at full SD1.5 size (CPU, random weights, 64 x 64 pixels).

The tiny family shares the structure of SD1.5 but not its widths, head counts, depth (4 UNet
levels, the last without attention), 768-wide text embeddings or 12-layer text encoder: wiring
that only breaks at full size (a temporal module of the wrong width, a ControlNet residual of
the wrong level, a reference bank under the wrong name) is caught here. One denoising step on 8
views at 8 x 8 latents (64 x 64 pixels), in bfloat16.

Cheap weights: every module is built with its parameters on the meta device (buffers, such as
the sinusoidal tables and CLIP's position ids, are computed as usual), then each parameter
becomes a view into one of a few seeded random pools, one per power-of-two scale (about
1/sqrt(fan-in)). Initialisation takes a second or two and the ~5 B parameters of the two
pipelines share ~0.6 GB; no parameter is zero, so the ControlNet's zero convolutions and the
temporal modules' output layers are live. Each pipeline has its own module objects (the main
UNet carries the temporal hooks, the back-view UNet does not), with their own random weights.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dp360.diffusion.models.components import BACK_COMPONENTS, MAIN_COMPONENTS, build_component
from dp360.diffusion.models.configs import FULL
from dp360.diffusion.pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline

DTYPE = torch.bfloat16  # fp32 would need ~20 GB for the two pipelines; bf16 CPU kernels exist for every op used
SIZE = 64  # pixels; 8 x 8 latents, the smallest the 3 down-samplings of the SD1.5 UNet allow
VIEWS = 8
TIMEOUT = 300  # s per test (~10-40 s idle on 1 thread; the first test also builds the models)

# Parameter counts of the real components (SD1.5 UNet, its ControlNet, the SD VAE, CLIP ViT-L/14's
# text encoder, AnimateDiff v1's motion modules): the models built here are the full-size ones.
FULL_SIZE_PARAMETERS = {
    "unet": 859_520_964,
    "reference_unet": 859_520_964,
    "controlnet": 361_279_120,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "temporal": 417_137_600,
}


class RandomPools:
    """Seeded random values at a few scales; parameters are views into them."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)
        self.unit = torch.randn(length, generator=self.generator).to(DTYPE)
        self.scaled: dict[int, torch.Tensor] = {}

    def view(self, shape: torch.Size, std: float) -> torch.Tensor:
        exponent = round(math.log2(std))  # a power of two: the scaled pool is exact in bf16
        if exponent not in self.scaled:
            self.scaled[exponent] = self.unit * 2.0**exponent
        count = math.prod(shape)
        start = int(torch.randint(0, (self.length - count) // 32 + 1, (1,), generator=self.generator)) * 32
        return self.scaled[exponent][start : start + count].view(shape)


def random_module(family, name: str, pools: RandomPools) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build_component(family, name)
    for child in module.modules():
        for key, parameter in list(child._parameters.items()):
            if parameter is None:
                continue
            if isinstance(child, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                value = torch.full(parameter.shape, 1.0 if key == "weight" else 0.0, dtype=DTYPE)
            elif parameter.ndim == 1:
                value = torch.zeros(parameter.shape, dtype=DTYPE)  # biases
            else:
                std = 0.02 if isinstance(child, torch.nn.Embedding) else 1 / math.sqrt(parameter[0].numel())
                value = pools.view(parameter.shape, std)
            child._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
        for key, buffer in list(child._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                child._buffers[key] = buffer.to(DTYPE)
    return module.eval()


@pytest.fixture(scope="module")
def pipelines():
    # The pipelines' image size is the UNet's sample size (latents) times the VAE's factor 8.
    family = dataclasses.replace(FULL, unet={**FULL.unet, "sample_size": SIZE // 8})
    pools = RandomPools(40_000_000, seed=0)  # > the largest parameter (CLIP's 49408 x 768 token table)
    main = {name: random_module(family, name, pools) for name in MAIN_COMPONENTS}
    back = {name: random_module(family, name, pools) for name in BACK_COMPONENTS}
    views = Portrait360Pipeline(scheduler=DDIMScheduler(**family.scheduler), **main)
    back_view = BackViewPipeline(scheduler=DDIMScheduler(**family.scheduler), **back)
    for pipeline in (views, back_view):
        pipeline.set_progress_bar_config(disable=True)
    return views, back_view


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    make = lambda: rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)  # noqa: E731
    return {
        "front": make(),
        "back": make(),
        "cameras": [make() for _ in range(VIEWS)],
        "noise": [make() for _ in range(VIEWS)],
        "other": make(),
    }


def _check_images(images: np.ndarray, count: int) -> None:
    assert images.shape == (count, 3, SIZE, SIZE)
    assert np.isfinite(images).all() and np.abs(images).max() <= 1.0
    assert images.std() > 0.01  # not a constant image: the decoder saw varied latents


@pytest.mark.timeout(TIMEOUT)
def test_full_size_components(pipelines):
    views, back_view = pipelines
    for pipeline in (views, back_view):
        assert pipeline.image_size == SIZE
        for name, count in FULL_SIZE_PARAMETERS.items():
            if hasattr(pipeline, name):
                module = getattr(pipeline, name)
                assert sum(p.numel() for p in module.parameters()) == count, name
                assert module.dtype == DTYPE, name
    assert views.unet is not back_view.unet  # the temporal hooks are on the main UNet only


@pytest.mark.timeout(TIMEOUT)
def test_back_view_at_full_size(pipelines, images):
    _, back_view = pipelines

    def run(camera):
        return back_view(
            images["front"],
            camera,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    first = run(images["cameras"][0])
    _check_images(first, 1)
    assert np.array_equal(first, run(images["cameras"][0]))  # same inputs: bit-identical
    assert np.abs(run(images["other"]) - first).max() > 1e-3  # the camera image steers it


@pytest.mark.timeout(TIMEOUT)
def test_360_views_at_full_size(pipelines, images):
    views, _ = pipelines

    def run(cameras):
        return views(
            front_image=images["front"],
            back_image=images["back"],
            camera_images=cameras,
            noise_frames=images["noise"],
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    output = run(images["cameras"])
    assert output.chunks == [list(range(VIEWS))]
    _check_images(output.images, VIEWS)
    assert np.array_equal(output.images, run(images["cameras"]).images)  # same inputs: bit-identical
    swapped = list(images["cameras"])
    swapped[5] = images["other"]
    change = np.abs(run(swapped).images - output.images).reshape(VIEWS, -1).max(axis=1)
    assert change[5] > 1e-3  # the ControlNet reads each view's camera image
    # Only the temporal modules mix the views of a chunk: the change reaches every other view.
    assert (change > 1e-4).all(), change
