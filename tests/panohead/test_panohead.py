"""PanoHead in plain PyTorch: ops, generator, renderer, safe pickle loading, inversion (CPU, tiny)."""

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dp360 import cameras
from dp360.errors import Dp360Error
from dp360.panohead import ops
from dp360.panohead.generator import PanoHeadConfig, PanoHeadGenerator, released_config
from dp360.panohead.inversion import InversionSettings, invert, render_views, w_statistics
from dp360.panohead.perceptual import load_lpips, write_random_backbone
from dp360.panohead.persistence import UnsafePickleError, read_network_pickle, write_network_pickle
from dp360.panohead.rendering import (
    PLANE_AXES,
    RenderSettings,
    importance_depths,
    ray_march,
    render_rays,
    sample_trigrid,
    smooth_weights,
)
from dp360.panohead.store import convert_panohead_pickle, load_generator
from dp360.panohead.tiny import tiny_generator

KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "keys"


# -- StyleGAN ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_fused_modulated_conv_equals_plain(up, demodulate):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 8, 8, generator=generator)
    weight = torch.randn(5, 6, 3, 3, generator=generator)
    styles = torch.randn(3, 6, generator=generator)
    noise = torch.randn(3, 1, 8 * up, 8 * up, generator=generator)
    kernel = ops.setup_filter()
    fused = ops.modulated_conv2d(
        x, weight, styles, noise, up=up, padding=1, kernel=kernel, demodulate=demodulate, fused=True
    )
    plain = ops.modulated_conv2d(
        x, weight, styles, noise, up=up, padding=1, kernel=kernel, demodulate=demodulate, fused=False
    )
    assert fused.shape == (3, 5, 8 * up, 8 * up)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_upsampling_conv_equals_upsample_then_conv_in_the_interior():
    # The transposed-convolution fast path must equal the plain order of operations
    # (zero-insertion upsampling + FIR filter, then a 3x3 convolution) away from the borders.
    # As in StyleGAN2, upsampling layers apply their weight as a true convolution (flipped).
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 10, 10, generator=generator)
    weight = torch.randn(3, 4, 3, 3, generator=generator)
    kernel = ops.setup_filter()
    fast = ops.conv2d_resample(x, weight, kernel, up=2, padding=1)
    plain = torch.nn.functional.conv2d(ops.upsample2d(x, kernel), weight.flip([2, 3]), padding=1)
    torch.testing.assert_close(fast[..., 4:-4, 4:-4], plain[..., 4:-4, 4:-4], rtol=1e-4, atol=1e-4)


def test_upsampling_keeps_a_constant_image_constant():
    x = torch.full((1, 2, 6, 6), 3.0)
    up = ops.upsample2d(x, ops.setup_filter())
    assert up.shape == (1, 2, 12, 12)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))


def test_bias_act_gain_and_clamp():
    x = torch.tensor([[-1.0, 2.0]])
    out = ops.bias_act(x, torch.tensor([0.0, 1.0]), "lrelu", clamp=3.0)
    torch.testing.assert_close(out, torch.tensor([[-0.2 * math.sqrt(2), 3.0]]))


# -- generator ----------------------------------------------------------------------------------


@pytest.mark.skipif(not (KEYS / "panohead_G_ema.keys.json").is_file(), reason="no PanoHead key manifest")
def test_state_dict_matches_the_released_generator_exactly():
    manifest = json.loads((KEYS / "panohead_G_ema.keys.json").read_text())["entries"]
    init_kwargs = json.loads((KEYS / "panohead_init_kwargs.json").read_text())["init_kwargs"]
    with torch.device("meta"):
        generator = PanoHeadGenerator(PanoHeadConfig.from_init_kwargs(init_kwargs))
    ours = {key: list(value.shape) for key, value in generator.state_dict().items()}
    assert list(ours) == list(manifest)
    assert all(ours[key] == entry["shape"] for key, entry in manifest.items())
    # The built-in released configuration is the same network.
    with torch.device("meta"):
        builtin = PanoHeadGenerator(released_config())
    assert {k: list(v.shape) for k, v in builtin.state_dict().items()} == ours


@pytest.fixture(scope="module")
def tiny():
    return tiny_generator(0)


def _front(count=1):
    return torch.from_numpy(cameras.orbit_labels(1)).repeat(count, 1)


def test_forward_shapes_and_determinism(tiny):
    z = torch.randn(2, tiny.config.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = tiny(z, _front(2), generator=torch.Generator().manual_seed(3))
        again = tiny(z, _front(2), generator=torch.Generator().manual_seed(3))
        other = tiny(z.flip(0), _front(2), generator=torch.Generator().manual_seed(3))
    size, raw = tiny.config.img_resolution, tiny.config.neural_rendering_resolution
    assert first["image"].shape == (2, 3, size, size) and first["image_raw"].shape == (2, 3, raw, raw)
    assert first["image_depth"].shape == (2, 1, raw, raw) and first["image_mask"].shape == (2, 1, raw, raw)
    for key in first:
        torch.testing.assert_close(first[key], again[key])
    assert not torch.allclose(other["image"], first["image"])  # the latent matters
    assert not torch.allclose(first["image"][0], first["image"][1])
    depth = first["image_depth"]
    settings = tiny.render_settings  # stratified jitter may reach one spacing past ray_end
    spacing = (settings.ray_end - settings.ray_start) / (settings.depth_resolution - 1)
    assert float(depth.min()) >= settings.ray_start - 1e-4 and float(depth.max()) <= settings.ray_end + spacing + 1e-4


def test_camera_offset_moves_the_translation_only(tiny):
    z = torch.randn(1, tiny.config.z_dim)
    c = _front()
    offset = tiny.camera_offset(z, c)
    shifted = tiny.apply_camera_offset(c, offset)
    changed = (shifted - c).abs().flatten().nonzero().flatten().tolist()
    assert set(changed) <= {3, 7, 11} and offset.shape == (1, 3)


# -- renderer -----------------------------------------------------------------------------------


def _sphere_field(radius, density_raw):
    def field(points):
        inside = (points.norm(dim=-1, keepdim=True) < radius).float()
        sigma = inside * density_raw + (1 - inside) * -1e3
        return torch.ones_like(sigma).repeat(1, 1, 3), sigma

    return field


def test_volume_renderer_matches_the_closed_form_for_a_constant_density_sphere():
    radius, sigma = 0.3, 4.0
    raw = 1 + math.log(math.expm1(sigma))  # the marcher applies softplus(raw - 1)
    settings = RenderSettings(depth_resolution=400, depth_resolution_importance=0, deterministic=True, triplane_crop=0)
    origin = torch.tensor([[[0.0, 0.0, 2.7]]])
    offsets = torch.tensor([0.0, 0.15, 0.25, 0.35])
    directions = torch.nn.functional.normalize(
        torch.stack([offsets / 2.7, torch.zeros(4), -torch.ones(4)], dim=-1), dim=-1
    )[None]
    _, depth, opacity = render_rays(_sphere_field(radius, raw), origin.expand(1, 4, 3), directions, settings)
    # chord length of a ray at distance d from the centre: 2 sqrt(r^2 - d^2)
    distance = 2.7 * torch.sin(torch.atan(offsets / 2.7))
    chord = 2 * torch.sqrt((radius**2 - distance**2).clamp(min=0))
    expected = 1 - torch.exp(-sigma * chord)
    torch.testing.assert_close(opacity[0, :, 0], expected, atol=0.02, rtol=0)
    # the central ray's expected depth: entry at 2.4, weighted by the exponential falloff
    entry, length = 2.7 - radius, 2 * radius
    mean_depth = entry + (1 / sigma - length * math.exp(-sigma * length) / (1 - math.exp(-sigma * length)))
    assert abs(float(depth[0, 0, 0]) - mean_depth) < 0.01


def test_importance_sampling_sharpens_a_thin_surface():
    # A thin opaque shell: with importance samples the opacity estimate is right even when the
    # stratified pass alone barely touches it.
    def shell(points):
        distance = points.norm(dim=-1, keepdim=True)
        sigma = torch.where(
            (distance - 0.3).abs() < 0.01, torch.full_like(distance, 200.0), torch.full_like(distance, -1e3)
        )
        return torch.ones_like(distance).repeat(1, 1, 3), sigma

    origin = torch.tensor([[[0.0, 0.0, 2.7]]])
    direction = torch.tensor([[[0.0, 0.0, -1.0]]])
    base = dict(depth_resolution=24, deterministic=True, triplane_crop=0)
    _, _, fine = render_rays(shell, origin, direction, RenderSettings(depth_resolution_importance=48, **base))
    _, _, dense = render_rays(
        shell,
        origin,
        direction,
        RenderSettings(depth_resolution=4000, depth_resolution_importance=0, deterministic=True, triplane_crop=0),
    )
    assert abs(float(fine) - float(dense)) < 0.05 and float(dense) > 0.9


# PanoHead's importance sampling (EG3D's `sample_importance` / `sample_pdf`), re-derived in plain
# Python: max over neighbours (padding -inf), mean of adjacent pairs, + 0.01; the bins are the
# midpoints of the coarse depths and the density is the smoothed weights less their first and
# last value (S-3 intervals between the first S-2 midpoints).


def _smoothed_by_hand(weights):
    count = len(weights)
    pooled = [
        max(weights[i - 1] if i >= 1 else -math.inf, weights[i] if i < count else -math.inf) for i in range(count + 1)
    ]
    return [(pooled[i] + pooled[i + 1]) / 2 + 0.01 for i in range(count)]


def _importance_by_hand(depths, weights, us):
    """One ray: coarse depths (S), ray-march weights (S-1), uniform numbers -> importance depths."""
    midpoints = [(a + b) / 2 for a, b in zip(depths[:-1], depths[1:])]
    density = [value + 1e-5 for value in _smoothed_by_hand(weights)[1:-1]]
    total = sum(density)
    cdf = [0.0]
    for value in density:
        cdf.append(cdf[-1] + value / total)
    samples = []
    for u in us:
        index = sum(1 for value in cdf if value <= u)  # searchsorted(right=True)
        below, above = max(index - 1, 0), min(index, len(density))
        span = cdf[above] - cdf[below]
        span = 1.0 if span < 1e-5 else span
        samples.append(midpoints[below] + (u - cdf[below]) / span * (midpoints[above] - midpoints[below]))
    return samples


@pytest.mark.parametrize(
    "weights, expected",
    [
        ([0, 0, 0, 1, 0, 0, 0], [0, 0, 0.5, 1, 0.5, 0, 0]),  # a spike spreads half a weight each side
        ([0, 0, 0, 1, 1, 1], [0, 0, 0.5, 1, 1, 1]),  # a step rises one interval early
        ([2, 0, 0, 0, 3], [2, 1, 0, 1.5, 3]),  # the ends keep their own value (max with -inf padding)
        ([0.3, 0.9, 0.1, 0.4, 0.7, 0.2, 0.0, 0.5], None),  # arbitrary: the plain loop only
    ],
)
def test_coarse_weights_are_smoothed_by_max_then_mean_of_neighbours_plus_one_percent(weights, expected):
    smoothed = smooth_weights(torch.tensor([weights, weights[::-1]], dtype=torch.float64))
    assert smoothed.shape == (2, len(weights))
    by_hand = [_smoothed_by_hand(weights), _smoothed_by_hand(weights[::-1])]
    torch.testing.assert_close(smoothed, torch.tensor(by_hand, dtype=torch.float64))
    if expected is not None:
        closed = torch.tensor(expected, dtype=torch.float64) + 0.01
        torch.testing.assert_close(smoothed[0], closed)


def test_uniform_weights_spread_importance_samples_over_s_minus_3_midpoint_intervals():
    # Equal weights -> a uniform density over [midpoint 0, midpoint S-3]; with u = linspace(0, 1)
    # the samples are the closed-form inverse CDF. Spreading over all S-1 midpoints (S-2
    # intervals) would end one coarse spacing later.
    steps, spacing, count = 10, 0.1, 7
    depths = (2.0 + spacing * torch.arange(steps, dtype=torch.float64)).reshape(1, 1, steps, 1)
    weights = torch.full((1, 1, steps - 1, 1), 0.2, dtype=torch.float64)
    samples = importance_depths(depths, weights, count, deterministic=True).flatten()
    u = torch.linspace(0, 1, count, dtype=torch.float64)
    first, last = 2.0 + spacing / 2, 2.0 + spacing / 2 + (steps - 3) * spacing
    torch.testing.assert_close(samples, first + u * (last - first))


def test_a_weight_spike_draws_importance_samples_around_the_sample_before_its_interval():
    # Ray-march weight only on interval 5 (coarse samples 5 to 6, S = 12 evenly spaced). PanoHead's
    # smoothed density puts 0.51 | 1.01 | 0.51 on the midpoint intervals [m3, m4], [m4, m5],
    # [m5, m6] and 0.01 on the other six, which is symmetric about coarse sample 5 (not the
    # middle of the spike's interval): half a coarse spacing before it.
    steps, spike, count = 12, 5, 101
    z = [2.0 + 0.1 * i for i in range(steps)]
    depths = torch.tensor(z, dtype=torch.float64).reshape(1, 1, steps, 1)
    weights = torch.zeros(1, 1, steps - 1, 1, dtype=torch.float64)
    weights[0, 0, spike] = 1.0
    samples = importance_depths(depths, weights, count, deterministic=True).flatten()
    u = torch.linspace(0, 1, count, dtype=torch.float64)
    torch.testing.assert_close(
        samples, torch.tensor(_importance_by_hand(z, weights.flatten().tolist(), u.tolist()), dtype=torch.float64)
    )
    assert abs(float(samples[count // 2]) - z[spike]) < 1e-9  # the median sits on coarse sample 5
    torch.testing.assert_close(samples + samples.flip(0), torch.full_like(samples, 2 * z[spike]))  # symmetric
    # Exactly the u's that fall in the spike's share of the CDF land inside [m3, m6].
    floor, total = 0.01 + 1e-5, 3 * (0.01 + 1e-5) + 2 * (0.51 + 1e-5) + (1.01 + 1e-5) + 3 * (0.01 + 1e-5)
    low, high = 3 * floor / total, 1 - 3 * floor / total
    midpoint = [(a + b) / 2 for a, b in zip(z[:-1], z[1:])]
    inside = (samples >= midpoint[3] - 1e-12) & (samples <= midpoint[6] + 1e-12)
    assert torch.equal(inside, (u >= low) & (u <= high)) and int(inside.sum()) > 90


def test_importance_depths_match_the_plain_derivation_on_jittered_depths_and_random_weights():
    rng = torch.Generator().manual_seed(4)
    batch, rays, steps, count = 2, 3, 9, 16
    depths = 2.0 + torch.sort(torch.rand(batch, rays, steps, 1, generator=rng, dtype=torch.float64), dim=2).values
    weights = torch.rand(batch, rays, steps - 1, 1, generator=rng, dtype=torch.float64) ** 3
    for deterministic in (True, False):
        samples = importance_depths(
            depths, weights, count, deterministic, generator=torch.Generator().manual_seed(9)
        ).reshape(batch * rays, count)
        if deterministic:
            us = torch.linspace(0, 1, count, dtype=torch.float64).expand(batch * rays, count)
        else:
            us = torch.rand(batch * rays, count, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        flat_depths, flat_weights = depths.reshape(batch * rays, steps), weights.reshape(batch * rays, steps - 1)
        expected = [
            _importance_by_hand(flat_depths[r].tolist(), flat_weights[r].tolist(), us[r].tolist())
            for r in range(batch * rays)
        ]
        torch.testing.assert_close(samples, torch.tensor(expected, dtype=torch.float64))


def test_render_rays_draws_importance_samples_as_panohead_with_the_same_random_numbers():
    # The fine pass's depths equal the plain derivation from the coarse pass's own weights, with
    # the random numbers in PanoHead's order: the stratified jitter first, then the CDF's u.
    calls = []
    sphere = _sphere_field(0.3, 3.0)

    def recording(points):
        calls.append(points.clone())
        return sphere(points)

    steps, count, rays = 16, 8, 4
    settings = RenderSettings(depth_resolution=steps, depth_resolution_importance=count, triplane_crop=0)
    origins = torch.tensor([0.0, 0.0, 2.7], dtype=torch.float64).expand(1, rays, 3)
    directions = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0, -1.0], [0.05, 0.0, -1.0], [0.0, -0.08, -1.0], [0.2, 0.1, -1.0]], dtype=torch.float64),
        dim=-1,
    )[None]
    render_rays(recording, origins, directions, settings, generator=torch.Generator().manual_seed(11))
    assert len(calls) == 2

    def along(points, samples):
        return ((points.reshape(1, rays, samples, 3) - origins[:, :, None]) * directions[:, :, None]).sum(-1)

    coarse, fine = along(calls[0], steps), along(calls[1], count)
    replay = torch.Generator().manual_seed(11)
    spacing = (settings.ray_end - settings.ray_start) / (steps - 1)
    jitter = torch.rand(1, rays, steps, 1, generator=replay, dtype=torch.float64) * spacing
    grid = torch.linspace(settings.ray_start, settings.ray_end, steps, dtype=torch.float64)
    torch.testing.assert_close(coarse, (grid.reshape(1, 1, steps, 1) + jitter)[..., 0])
    us = torch.rand(rays, count, generator=replay, dtype=torch.float64)
    colors, sigma = sphere(calls[0])
    _, _, weights = ray_march(colors.reshape(1, rays, steps, 3), sigma.reshape(1, rays, steps, 1), coarse.unsqueeze(-1))
    expected = [
        _importance_by_hand(coarse[0, r].tolist(), weights[0, r, :, 0].tolist(), us[r].tolist()) for r in range(rays)
    ]
    torch.testing.assert_close(fine[0], torch.tensor(expected, dtype=torch.float64))


def _blob_planes(centre, size=32, depth=16, sharpness=40.0):
    """Tri-grid whose feature 0 is a Gaussian blob at `centre` (world units, box 1)."""
    grids = []
    axis = (torch.arange(size) + 0.5) / size - 0.5
    axis_depth = (torch.arange(depth) + 0.5) / depth - 0.5
    for axes in PLANE_AXES:
        d, h, w = torch.meshgrid(axis_depth, axis, axis, indexing="ij")
        coords = {axes[0]: w, axes[1]: h, axes[2]: d}
        squared = sum((coords[i] - centre[i]) ** 2 for i in range(3))
        grids.append(torch.exp(-sharpness * squared)[None].repeat(2, 1, 1, 1))  # C=2, D, H, W
    return torch.stack(grids).reshape(1, 3, 2 * depth, size, size), depth


@pytest.mark.parametrize("yaw", [0.0, 40.0, -70.0])
def test_yaw_moves_rendered_content_where_the_camera_projection_says(yaw):
    centre = (0.2, -0.1, 0.15)
    planes, depth = _blob_planes(centre)
    settings = RenderSettings(
        ray_start=2.0,
        ray_end=3.4,
        depth_resolution=64,
        depth_resolution_importance=32,
        triplane_depth=depth,
        deterministic=True,
        triplane_crop=0,
    )

    def field(points):
        features = sample_trigrid(planes, points, 1.0, depth).mean(dim=1)
        return features, 60 * features[..., :1] - 20

    resolution = 48
    pose = cameras.orbit_pose(yaw, 10.0)
    intrinsics = cameras.normalized_intrinsics(focal=2.0)
    origins, directions = cameras.pixel_rays(
        torch.tensor(pose, dtype=torch.float32)[None], torch.tensor(intrinsics, dtype=torch.float32)[None], resolution
    )
    _, _, opacity = render_rays(field, origins, directions, settings)
    image = opacity.reshape(resolution, resolution)
    assert float(image.max()) > 0.5
    ys, xs = torch.meshgrid(torch.arange(resolution) + 0.5, torch.arange(resolution) + 0.5, indexing="ij")
    centroid = np.array([float((image * xs).sum() / image.sum()), float((image * ys).sum() / image.sum())])
    expected = cameras.project_points(np.array([centre]), pose, intrinsics, resolution, resolution)[0]
    assert np.linalg.norm(centroid - expected) < 1.5, (centroid, expected)


# -- safe pickle loading ------------------------------------------------------------------------


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unpickler_refuses_a_code_executing_payload(tmp_path, tiny):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as handle:
        pickle.dump({"G_ema": _Payload(f"touch {marker}")}, handle)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        read_network_pickle(bad)
    assert not marker.exists()
    # Through the converter: the same refusal, nothing written.
    with pytest.raises(UnsafePickleError):
        convert_panohead_pickle(bad, tmp_path / "converted")
    assert not (tmp_path / "converted").exists() and not marker.exists()


def test_unpickler_never_runs_the_stored_module_source(tmp_path, tiny, monkeypatch):
    marker = tmp_path / "executed"
    import dp360.panohead.persistence as persistence

    original = persistence._persistent_tree

    def with_payload_source(module, class_name, init_kwargs=None):
        record = original(module, class_name, init_kwargs)
        record.meta["module_src"] = f"open({str(marker)!r}, 'w').write('ran')\n"
        return record

    monkeypatch.setattr(persistence, "_persistent_tree", with_payload_source)
    path = write_network_pickle(tmp_path / "src.pkl", tiny, tiny.config.init_kwargs())
    network = read_network_pickle(path)
    assert network.class_name == "training.triplane.TriPlaneGenerator" and len(network.state_dict) == len(
        tiny.state_dict()
    )
    assert not marker.exists()


def test_well_formed_pickle_converts_and_loads_strictly(tmp_path, tiny):
    path = write_network_pickle(tmp_path / "tiny.pkl", tiny, tiny.config.init_kwargs())
    folder = convert_panohead_pickle(path, tmp_path / "panohead")
    loaded = load_generator(folder)
    for key, value in tiny.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    z = torch.randn(1, tiny.config.z_dim)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(z, _front(), generator=torch.Generator().manual_seed(0))["image"],
            tiny(z, _front(), generator=torch.Generator().manual_seed(0))["image"],
        )


def test_a_conversion_replaces_only_a_generator_dp360_converted(tmp_path, tiny):
    path = write_network_pickle(tmp_path / "tiny.pkl", tiny, tiny.config.init_kwargs())
    folder = convert_panohead_pickle(path, tmp_path / "panohead")
    assert json.loads((folder / "panohead.json").read_text())["format"] == "dp360-panohead"
    before = (folder / "generator.safetensors").stat().st_mtime_ns
    convert_panohead_pickle(path, folder)  # ours: replaced
    assert (folder / "generator.safetensors").stat().st_mtime_ns != before

    # look-alikes: the right names, shapes and init_kwargs, but not dp360's record, or a link
    lookalike = tmp_path / "lookalike"
    shutil.copytree(folder, lookalike)
    config = json.loads((lookalike / "panohead.json").read_text())
    del config["format"]
    (lookalike / "panohead.json").write_text(json.dumps(config))
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    user_file = tmp_path / "user.safetensors"
    user_file.write_bytes(b"user")
    (linked / "generator.safetensors").unlink()
    (linked / "generator.safetensors").symlink_to(user_file)
    for target in (lookalike, linked):
        kept = {name: (target / name).read_bytes() for name in os.listdir(target)}
        with pytest.raises(Dp360Error, match="not a converted dp360 PanoHead generator; choose a new or empty folder"):
            convert_panohead_pickle(path, target)
        assert {name: (target / name).read_bytes() for name in os.listdir(target)} == kept
    assert user_file.read_bytes() == b"user"
    load_generator(lookalike)  # an older conversion (no format name) still loads


def test_a_pickle_with_wrong_shapes_is_refused_with_the_offenders(tmp_path, tiny):
    kwargs = tiny.config.init_kwargs()
    kwargs["w_dim"] = 16  # the weights no longer fit the network the kwargs describe
    path = write_network_pickle(tmp_path / "wrong.pkl", tiny, kwargs)
    with pytest.raises(Dp360Error, match="wrong shape: .*affine"):
        convert_panohead_pickle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_converted_generator_is_one_clear_sentence(tmp_path):
    with pytest.raises(Dp360Error, match="dp360 weights convert panohead"):
        load_generator(tmp_path / "nothing")


# -- perceptual loss and inversion --------------------------------------------------------------


def test_lpips_needs_its_backbone_and_measures_differences(tmp_path):
    with pytest.raises(Dp360Error, match="dp360 weights download perceptual"):
        load_lpips(backbone=tmp_path / "missing.pth")
    lpips = load_lpips(backbone=write_random_backbone(tmp_path / "vgg.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert bool((lpips(x, y) > 0).all())


def _target(generator, psi=0.5, seed=5, yaw=0.0):
    front = _front()
    z = torch.randn(1, generator.config.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ws = generator.mapping(z, front, truncation_psi=psi)
        camera = torch.tensor([cameras.panohead_label(cameras.orbit_pose(yaw, 0.0))], dtype=torch.float32)
        _, _, z_mean = w_statistics(generator, front, 2000, 0)
        fit_camera = generator.apply_camera_offset(camera, generator.camera_offset(z_mean, camera))
        image = generator.synthesis(ws, fit_camera, generator=torch.Generator().manual_seed(0))["image"]
    return ws, camera, image


def test_inversion_recovers_a_known_latent(tiny):
    ws_true, camera, target = _target(tiny)
    settings = InversionSettings(
        invert_steps=150,
        pti_steps=0,
        lpips_weight=0,
        mse_weight=1.0,
        w_regularization=0.1,
        w_avg_samples=2000,
        latent_space="w",
    )
    result = invert(tiny, target, camera, None, settings, progress=False, frontal_camera=_front())
    w_avg, _, _ = w_statistics(tiny, _front(), 2000, 0)
    assert result.projection_losses[-1] < result.projection_losses[0] / 20
    assert float((result.ws - ws_true).norm()) < 0.3 * float((w_avg - ws_true).norm())


def test_w_plus_inversion_and_pti_fit_the_target_and_its_other_views(tiny, tmp_path):
    ws_true, camera, target = _target(tiny, yaw=20.0)
    lpips = load_lpips(backbone=write_random_backbone(tmp_path / "vgg.pth"))
    settings = InversionSettings(invert_steps=60, pti_steps=4, w_avg_samples=2000)
    before = {key: value.clone() for key, value in tiny.state_dict().items()}
    result = invert(tiny, target, camera, lpips, settings, progress=False, frontal_camera=_front())
    assert result.projection_losses[-1] < result.projection_losses[0] / 5
    assert result.pti_losses[-1] < result.pti_losses[0]
    # The tuned copy is separate: the input generator is unchanged.
    assert all(torch.equal(before[key], value) for key, value in tiny.state_dict().items())
    assert any(not torch.equal(before[key], value) for key, value in result.generator.state_dict().items())
    # Novel views of the inverted head are closer to the true head's than the average head's.
    orbit = torch.from_numpy(cameras.orbit_labels(4))
    truth = render_views(tiny, ws_true, orbit)
    w_avg, _, _ = w_statistics(tiny, _front(), 2000, 0)
    baseline = (render_views(tiny, w_avg.repeat(1, tiny.num_ws, 1), orbit) - truth).abs().mean()
    fitted = (render_views(result.generator, result.ws, orbit) - truth).abs().mean()
    assert float(fitted) < 0.6 * float(baseline)


def test_inversion_without_perceptual_weights_is_an_error(tiny):
    _, camera, target = _target(tiny)
    with pytest.raises(Dp360Error, match="perceptual"):
        invert(
            tiny, target, camera, None, InversionSettings(invert_steps=1, pti_steps=0, w_avg_samples=16), progress=False
        )
