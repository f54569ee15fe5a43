"""The back-view and 360-view pipelines on tiny seeded components (CPU)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dp360.diffusion.models.components import BACK_COMPONENTS, MAIN_COMPONENTS
from dp360.diffusion.models.configs import TINY
from dp360.diffusion.models.tiny import tiny_components
from dp360.diffusion.pipelines.common import PipelineInputError
from dp360.diffusion.pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline, plan_chunks


@pytest.fixture(scope="module")
def pipe():
    pipeline = Portrait360Pipeline(scheduler=DDIMScheduler(**TINY.scheduler), **tiny_components(MAIN_COMPONENTS))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    make = lambda: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noqa: E731
    return {
        "front": make(),
        "back": make(),
        "cameras": [make() for _ in range(16)],
        "noise": [make() for _ in range(16)],
        "other": make(),
    }


def _run(pipe, images, seed=0, views=8, **overrides):
    arguments = dict(
        front_image=images["front"],
        back_image=images["back"],
        camera_images=images["cameras"][:views],
        noise_frames=images["noise"][:views],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    arguments.update(overrides)
    return pipe(**arguments)


def test_seeds_reproduce_and_differ(pipe, images):
    first, again, other = _run(pipe, images, 0), _run(pipe, images, 0), _run(pipe, images, 1)
    assert first.images.shape == (8, 3, 64, 64) and np.all(np.abs(first.images) <= 1)
    assert np.array_equal(first.images, again.images)
    assert np.abs(first.images - other.images).max() > 1e-3


def test_conditioning_changes_the_output_only_when_changed(pipe, images):
    base = _run(pipe, images).images
    assert np.array_equal(base, _run(pipe, images).images)
    for key, value in [("front_image", images["other"]), ("back_image", images["other"]), ("noise_frames", None)]:
        assert np.abs(_run(pipe, images, **{key: value}).images - base).max() > 1e-5, (
            key
        )  # unchanged inputs give bit-identical output
    swapped = list(images["cameras"][:8])
    swapped[5] = images["other"]
    assert np.abs(_run(pipe, images, camera_images=swapped).images - base).max() > 1e-5


def test_shared_reference_pass_equals_per_chunk_pass(pipe, images):
    shared = _run(pipe, images, views=16).images
    faithful = _run(pipe, images, views=16, share_reference_pass=False).images
    assert shared.shape == (16, 3, 64, 64)
    assert np.allclose(shared, faithful, atol=1e-4)


def test_chunk_plans():
    chunks, source = plan_chunks(32)
    assert chunks == [list(range(k, k + 8)) for k in (0, 8, 16, 24)] and source[16] == (2, 0)
    chunks, source = plan_chunks(36)
    assert len(chunks) == 5 and all(len(chunk) == 8 for chunk in chunks)
    assert sorted({view for chunk in chunks for view in chunk}) == list(range(36))
    assert all(chunks[c][p] == view for view, (c, p) in enumerate(source))
    with pytest.raises(ValueError):
        plan_chunks(5)


def test_input_checks(pipe, images):
    with pytest.raises(PipelineInputError, match="at least 8"):
        _run(pipe, images, camera_images=images["cameras"][:4], noise_frames=None)
    with pytest.raises(PipelineInputError, match="one frame per view"):
        _run(pipe, images, noise_frames=images["noise"][:3])
    with pytest.raises(PipelineInputError, match="eta"):
        _run(pipe, images, eta=2.0)
    with pytest.raises(PipelineInputError, match="uint8"):
        _run(pipe, images, front_image=np.zeros((64, 64), np.float32))


def test_back_view_pipeline():
    back = BackViewPipeline(scheduler=DDIMScheduler(**TINY.scheduler), **tiny_components(BACK_COMPONENTS))
    back.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    front, camera = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def run(seed, cam=camera):
        return back(
            front, cam, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np"
        ).images

    first = run(0)
    assert first.shape == (1, 3, 64, 64)
    assert np.array_equal(first, run(0)) and np.abs(first - run(1)).max() > 1e-3
    assert (
        np.abs(first - run(0, 255 - camera)).max() > 1e-5
    )  # the camera image steers it (same seed: otherwise bit-identical)


def test_tiny_official_checkpoint_converts_to_a_bundle_that_samples_the_same(tmp_path, pipe, images):
    """The real file path: a tiny checkpoint in the official layout, saved with torch.save, read
    back with weights_only + mmap, converted to safetensors folders, loaded into a pipeline."""
    from dp360.diffusion.models.bundle import convert_to_bundle, load_bundle
    from dp360.diffusion.models.components import component_config
    from dp360.diffusion.models.convert import to_official_layout

    components = {name: getattr(pipe, name) for name in MAIN_COMPONENTS}
    checkpoint = to_official_layout(
        {name: (component_config(TINY, name), module.state_dict()) for name, module in components.items()},
        schedule=torch.zeros(1000),
    )
    torch.save({"state_dict": checkpoint}, tmp_path / "model_state-tiny.th")
    bundle = convert_to_bundle(tmp_path / "model_state-tiny.th", tmp_path / "bundle", "main", family="tiny")
    assert (bundle / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (
        bundle / "temporal" / "config.json"
    ).is_file()
    loaded = load_bundle(bundle)
    loaded.set_progress_bar_config(disable=True)
    assert np.allclose(_run(loaded, images).images, _run(pipe, images).images, atol=1e-5)
    with pytest.raises(Exception, match="not a converted dp360 bundle"):
        load_bundle(tmp_path)
