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


# -- work saved, each equal to the plain computation ------------------------------------------------


def test_vae_slices_equal_one_batch(pipe):
    """encode/decode in slices of `vae_batch_size` give the one-batch result, and the posterior
    noise of the slices is drawn in the same order from the generator."""
    images = torch.rand(11, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def encode(batch_size):
        generator = torch.Generator().manual_seed(0)
        latents = pipe.encode_images(images, generator, batch_size)
        return latents, torch.randn(1, generator=generator)  # what the generator draws next

    (whole, after_whole), (sliced, after_sliced) = encode(64), encode(4)
    assert torch.allclose(whole, sliced, atol=1e-5) and torch.equal(after_whole, after_sliced)
    assert torch.allclose(pipe.decode_latents(whole, 64), pipe.decode_latents(whole, 3), atol=1e-5)
    slices = []
    decoded = pipe.decode_latents(whole, 4, on_slice=lambda first, part: slices.append((first, part.shape[0])))
    assert slices == [(0, 4), (4, 4), (8, 3)] and decoded.shape == (11, 3, 64, 64)


def _shortcut_runs(pipe, images, **overrides):
    from dp360.diffusion.pipelines.portrait360 import Shortcuts

    runs = {"all": _run(pipe, images, views=16, **overrides).images}
    for name in ("batch_references", "reuse_bank_projections", "embed_cameras_once", "predraw_variance_noise"):
        runs[name] = _run(pipe, images, views=16, shortcuts=Shortcuts(**{name: False}), **overrides).images
    runs["plain"] = _run(pipe, images, views=16, shortcuts=Shortcuts.PLAIN, **overrides).images
    return runs


def test_each_shortcut_equals_the_plain_computation(pipe, images):
    """Each shortcut switched off alone, and all of them off: the same views. Only the batch-of-2
    reference pass changes float rounding (batched matmuls); the others are bit-identical."""
    runs = _shortcut_runs(pipe, images)
    for name in ("reuse_bank_projections", "embed_cameras_once", "predraw_variance_noise"):
        assert np.array_equal(runs[name], runs["all"]), name
    assert np.allclose(runs["batch_references"], runs["all"], atol=1e-5)
    assert np.allclose(runs["plain"], runs["all"], atol=1e-5)


def test_shortcuts_do_less_work(pipe, images):
    """Per step: one reference pass at batch 2; bank keys/values projected once, not per chunk;
    the ControlNet's camera embedding once per chunk for the whole call."""
    from dp360.diffusion.models.reference_attention import self_attention_names
    from dp360.diffusion.pipelines.portrait360 import Shortcuts

    calls = {"reference": [], "embedding": 0, "bank_projections": 0}

    def count_reference(_module, args, kwargs):
        calls["reference"].append(args[0].shape[0])

    def count_embedding(*_):
        calls["embedding"] += 1

    def count_projection(_module, args):
        if args[0].shape[0] == 1:  # a bank (batch 1), not a chunk of 8
            calls["bank_projections"] += 1

    handles = [
        pipe.reference_unet.register_forward_pre_hook(count_reference, with_kwargs=True),
        pipe.controlnet.controlnet_cond_embedding.conv_in.register_forward_pre_hook(count_embedding),
    ]
    layers = [pipe.unet.get_submodule(name).to_k for name in self_attention_names(pipe.unet)]
    handles += [layer.register_forward_pre_hook(count_projection) for layer in layers]
    try:
        steps, chunks = 2, 2
        _run(pipe, images, views=16)
        assert calls == {"reference": [2] * steps, "embedding": chunks, "bank_projections": 2 * len(layers) * steps}
        calls.update(reference=[], embedding=0, bank_projections=0)
        _run(pipe, images, views=16, shortcuts=Shortcuts.PLAIN)
        assert calls == {
            "reference": [1, 1] * steps,
            "embedding": chunks * steps,
            "bank_projections": 2 * len(layers) * steps * chunks,
        }
    finally:
        for handle in handles:
            handle.remove()


def test_chunks_in_one_call_equal_one_chunk_per_call(pipe, images):
    one = _run(pipe, images, views=16).images
    both = _run(pipe, images, views=16, chunks_per_call=2).images
    assert np.allclose(one, both, atol=1e-5)
    with pytest.raises(PipelineInputError, match="chunks_per_call"):
        _run(pipe, images, chunks_per_call=0)
    with pytest.raises(PipelineInputError, match="vae_batch_size"):
        _run(pipe, images, vae_batch_size=0)


def test_dtype_and_device_are_read_once_per_call(pipe, images, monkeypatch):
    """`ModelMixin.dtype`/`.device` walk every parameter; a call reads them a fixed number of
    times, however many steps and chunks it has."""
    import diffusers.models.modeling_utils as modeling_utils

    reads = {"count": 0}
    for name in ("get_parameter_dtype", "get_parameter_device"):
        original = getattr(modeling_utils, name)

        def counted(*args, _original=original, **kwargs):
            reads["count"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(modeling_utils, name, counted)

    def reads_of(**overrides):
        reads["count"] = 0
        _run(pipe, images, **overrides)
        return reads["count"]

    few, more = reads_of(num_inference_steps=1), reads_of(num_inference_steps=3, views=16)
    assert few == more and few <= 16


def test_variance_noise_drawn_ahead_equals_the_schedulers_draws():
    """A CPU generator's DDIM noise drawn ahead in blocks gives the numbers the scheduler would
    draw step by step, in the same order; without a CPU generator the scheduler draws."""
    from diffusers.utils.torch_utils import randn_tensor

    from dp360.diffusion.pipelines.portrait360 import VarianceNoise

    shapes, steps = [(8, 4, 8, 8), (8, 4, 8, 8), (3, 4, 8, 8)], 5
    generator = torch.Generator().manual_seed(7)
    expected = [
        randn_tensor(shape, generator=generator, device=torch.device("cpu")) for _ in range(steps) for shape in shapes
    ]
    generator = torch.Generator().manual_seed(7)
    source = VarianceNoise(generator, 0.5, shapes, steps, torch.device("cpu"), block_bytes=3 * 4 * 8 * 8 * 4 * 8)
    drawn = []
    for _ in range(steps):
        drawn.append(source.step_arguments(2)["variance_noise"])  # two chunks stepped as one
        drawn.append(source.step_arguments(1)["variance_noise"])
    assert torch.equal(torch.cat(drawn), torch.cat(expected))
    assert VarianceNoise(None, 0.5, shapes, steps, torch.device("cpu")).step_arguments() == {"generator": None}
    assert VarianceNoise(generator, 0.0, shapes, steps, torch.device("cpu")).step_arguments() == {
        "generator": generator
    }


def test_back_view_shortcuts_equal_the_plain_computation():
    from dp360.diffusion.pipelines.portrait360 import Shortcuts

    back = BackViewPipeline(scheduler=DDIMScheduler(**TINY.scheduler), **tiny_components(BACK_COMPONENTS))
    back.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(2)
    front, camera = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def run(shortcuts):
        generator = torch.Generator().manual_seed(0)
        return back(front, camera, num_inference_steps=2, generator=generator, output_type="np", shortcuts=shortcuts)

    assert np.array_equal(run(None).images, run(Shortcuts.PLAIN).images)


def test_decoded_slices_are_handed_over_in_order(pipe, images):
    seen = []
    output = _run(
        pipe,
        images,
        views=16,
        output_type="pil",
        vae_batch_size=6,
        on_decoded=lambda first, part: seen.append((first, part)),
    )
    assert [(first, len(part)) for first, part in seen] == [(0, 6), (6, 6), (12, 4)]
    assert [image for _, part in seen for image in part] == output.images


def test_the_most_steps_allowed_stay_inside_the_schedule():
    from dp360.diffusion.models.configs import FULL
    from dp360.diffusion.stage import MAX_STEPS

    for family in (FULL, TINY):
        scheduler = DDIMScheduler(**family.scheduler)
        scheduler.set_timesteps(MAX_STEPS)
        assert len(scheduler.timesteps) == MAX_STEPS
        assert int(scheduler.timesteps.max()) < scheduler.config.num_train_timesteps
        # one more step would index past the table (the IndexError that --steps 1000 gave)
        scheduler.set_timesteps(MAX_STEPS + 1)
        assert int(scheduler.timesteps.max()) >= scheduler.config.num_train_timesteps
