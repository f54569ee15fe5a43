"""Issue 22 item 4: the release's DDIM coefficients and its forward diffusion of the initial latent
come from its stored (float16) schedule buffers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from dp360.diffusion.models.bundle import apply_release_schedule
from dp360.diffusion.models.configs import FULL
from dp360.errors import Dp360Error

# the SD1.5 scheduler settings dp360 builds its bundles with
SD15 = FULL.scheduler


def _release_coefficients(alphas_cumprod, steps=50, eta=0.5):
    # ldm make_schedule + p_sample_ddim, written out: x_prev = c_x * x + c_eps * eps (+ sigma * noise)
    a = alphas_cumprod.to(torch.float32).double()
    ts = [t for t in range(0, 1000, 1000 // steps)]
    ts = [t + 1 for t in ts]
    out = {}
    for i, t in enumerate(ts):
        at = float(a[t])
        prev = float(a[0]) if i == 0 else float(a[ts[i - 1]])
        sigma = eta * math.sqrt((1 - prev) / (1 - at) * (1 - at / prev))
        c_x = math.sqrt(prev) / math.sqrt(at)
        c_eps = -math.sqrt(prev) * math.sqrt(1 - at) / math.sqrt(at) + math.sqrt(1 - prev - sigma**2)
        out[t] = (c_x, c_eps, sigma)
    return out


def _dp360_coefficients(scheduler, steps=50, eta=0.5):
    scheduler.set_timesteps(steps)
    out = {}
    for t in scheduler.timesteps.tolist():
        x, eps = torch.ones(1), torch.zeros(1)
        zero = torch.zeros(1)
        c_x = float(scheduler.step(zero, t, x, eta=eta, variance_noise=zero).prev_sample)
        c_eps = float(scheduler.step(torch.ones(1), t, zero, eta=eta, variance_noise=zero).prev_sample)
        sigma = float(scheduler.step(zero, t, zero, eta=eta, variance_noise=torch.ones(1)).prev_sample)
        del eps
        out[t] = (c_x, c_eps, sigma)
    return out


def test_float16_buffers_give_the_release_coefficients():
    stored = DDIMScheduler(**SD15).alphas_cumprod.to(torch.float16)
    scheduler = DDIMScheduler(**SD15)
    apply_release_schedule(scheduler, {"alphas_cumprod": stored})
    ours, release = _dp360_coefficients(scheduler), _release_coefficients(stored)
    for t, expected in release.items():
        assert ours[t] == pytest.approx(expected, rel=1e-4, abs=1e-6), t
    # and they differ from the float32 schedule's where the rounding matters (t = 1)
    plain = _dp360_coefficients(DDIMScheduler(**SD15))
    assert abs(plain[1][1] - ours[1][1]) > 1e-3


def test_float32_buffers_leave_the_schedule_unchanged():
    plain = DDIMScheduler(**SD15)
    scheduler = DDIMScheduler(**SD15)
    apply_release_schedule(scheduler, {"alphas_cumprod": plain.alphas_cumprod.clone()})
    assert _dp360_coefficients(scheduler) == _dp360_coefficients(plain)
    untouched = DDIMScheduler(**SD15)
    apply_release_schedule(untouched, {})
    assert torch.equal(untouched.alphas_cumprod, plain.alphas_cumprod)


def test_bad_stored_schedule_is_refused():
    with pytest.raises(Dp360Error, match="stored noise schedule"):
        apply_release_schedule(DDIMScheduler(**SD15), {"alphas_cumprod": torch.zeros(1000)}, "reconvert")
    with pytest.raises(Dp360Error, match=r"stored noise schedule \(sqrt_alphas_cumprod\)"):
        apply_release_schedule(DDIMScheduler(**SD15), {"sqrt_alphas_cumprod": torch.full((1000,), math.nan)}, "x")


def test_converted_bundle_keeps_float16_buffers_and_loads_them(tmp_path):
    from safetensors.torch import load_file

    from dp360.diffusion.models.bundle import RELEASE_SCHEDULE_FILE, convert_to_bundle, load_bundle
    from dp360.diffusion.models.components import BACK_COMPONENTS, component_config
    from dp360.diffusion.models.configs import TINY
    from dp360.diffusion.models.convert import to_official_layout
    from dp360.diffusion.models.tiny import tiny_components

    components = tiny_components(BACK_COMPONENTS, 1)
    checkpoint = to_official_layout(
        {name: (component_config(TINY, name), module.state_dict()) for name, module in components.items()}
    )
    stored = DDIMScheduler(**SD15).alphas_cumprod.to(torch.float16)
    checkpoint["alphas_cumprod"] = stored
    checkpoint["logvar"] = torch.zeros(1000)
    torch.save(checkpoint, tmp_path / "back.th")
    bundle = convert_to_bundle(tmp_path / "back.th", tmp_path / "bundle", "back", family="tiny")
    kept = load_file(str(bundle / "scheduler" / RELEASE_SCHEDULE_FILE))
    assert kept["alphas_cumprod"].dtype == torch.float16 and torch.equal(kept["alphas_cumprod"], stored)
    assert kept["logvar"].dtype == torch.float32
    pipe = load_bundle(bundle, kind="back")
    assert torch.equal(pipe.scheduler.alphas_cumprod, stored.float())
    assert float(pipe.scheduler.final_alpha_cumprod) == float(stored[0])


def _tiny_back_checkpoint(path, buffers):
    from dp360.diffusion.models.components import BACK_COMPONENTS, component_config
    from dp360.diffusion.models.configs import TINY
    from dp360.diffusion.models.convert import to_official_layout
    from dp360.diffusion.models.tiny import tiny_components

    components = tiny_components(BACK_COMPONENTS, 1)
    checkpoint = to_official_layout(
        {name: (component_config(TINY, name), module.state_dict()) for name, module in components.items()}
    )
    torch.save({**checkpoint, **buffers, "logvar": torch.zeros(1000)}, path)
    return path


def test_the_initial_latent_is_forward_diffused_with_the_stored_coefficients(tmp_path):
    """The release's q_sample at t = 999 multiplies by its stored float16 sqrt buffers; dp360 does the
    same when the bundle keeps them, and diffusers' add_noise (float32) when it does not."""
    from dp360.diffusion.models.bundle import convert_to_bundle, load_bundle

    exact = DDIMScheduler(**SD15).alphas_cumprod.double()  # the release computes them in float64
    release = {
        "alphas_cumprod": exact.to(torch.float16),
        "sqrt_alphas_cumprod": exact.sqrt().to(torch.float16),
        "sqrt_one_minus_alphas_cumprod": (1 - exact).sqrt().to(torch.float16),
    }
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def latents(buffers, name):
        checkpoint = _tiny_back_checkpoint(tmp_path / f"{name}.th", buffers)
        pipe = load_bundle(convert_to_bundle(checkpoint, tmp_path / name, "back", family="tiny"), kind="back")
        result = pipe.prepare_latents(2, torch.Generator().manual_seed(7), init, device=torch.device("cpu"))
        noise = pipe.prepare_latents(2, torch.Generator().manual_seed(7), None, device=torch.device("cpu"))
        return result, noise / pipe.scheduler.init_noise_sigma, pipe.scheduler

    ours, noise, _ = latents(release, "float16")
    expected = (
        release["sqrt_alphas_cumprod"][999].float() * init
        + release["sqrt_one_minus_alphas_cumprod"][999].float() * noise
    )
    assert torch.equal(ours, expected)

    # the square roots of the rounded alphas_cumprod (diffusers' add_noise) are not the stored values
    from_alphas, _, scheduler = latents({"alphas_cumprod": release["alphas_cumprod"]}, "alphas-only")
    assert torch.equal(from_alphas, scheduler.add_noise(init, noise, torch.tensor([999])))
    assert (from_alphas - ours).abs().max() > 1e-6

    # a float32 checkpoint: the float32 schedule, as before
    plain, _, _ = latents({}, "float32")
    assert torch.equal(plain, DDIMScheduler(**SD15).add_noise(init, noise, torch.tensor([999])))
