"""The plain-PyTorch splat rasteriser (dp360/nerf/splat_raster.py) against gsplat: the projection and
spherical harmonics it takes from gsplat's PyTorch reference functions, wired as gsplat does, its
compositing against
a per-pixel loop written from the 3DGS rules, its gradients as gsplat's densification reads them,
the whole of it against gsplat's CUDA `rasterization` where there is a GPU, and a small splat fit
on the CPU through it (the random background that keeps a fit on a black background opaque)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from dp360.nerf.splat_raster import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN, rasterize_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WIDTH, HEIGHT = 24, 20


def _scene(count: int = 14, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> dict:
    """`count` Gaussians in front of two cameras looking down +z (one shifted and turned)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    means = (draw(count, 3) - 0.5) * torch.tensor([1.2, 1.0, 0.8], dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    viewmats[:, 2, 3] = 3.0
    angle = 0.3
    viewmats[1, :3, :3] = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]], dtype=torch.float64
    )
    viewmats[1, 0, 3] = 0.2
    Ks = torch.tensor([[50.0, 0, WIDTH / 2], [0, 50.0, HEIGHT / 2], [0, 0, 1]], dtype=torch.float64).repeat(2, 1, 1)
    scene = {
        "means": means,
        "quats": draw(count, 4) - 0.5,
        "scales": 0.05 + 0.2 * draw(count, 3),
        "opacities": 0.2 + 0.79 * draw(count),
        "colors": draw(count, 3),
        "viewmats": viewmats,
        "Ks": Ks,
    }
    return {name: value.to(device=device, dtype=dtype) for name, value in scene.items()}


def _covariances(scene: dict) -> torch.Tensor:
    return _quat_scale_to_covar_preci(scene["quats"], scene["scales"], compute_preci=False, triu=False)[0]


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_info_carries_gsplats_projection_and_antialiased_opacities(rasterize_mode):
    scene = _scene(40, seed=1)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        scene["means"], _covariances(scene), scene["viewmats"], scene["Ks"], WIDTH, HEIGHT, calc_compensations=True
    )
    _, _, info = rasterize_reference(**scene, width=WIDTH, height=HEIGHT, rasterize_mode=rasterize_mode)
    assert (radii > 0).sum() >= 40  # most Gaussians are on screen in both cameras
    assert torch.equal(info["radii"], radii)
    torch.testing.assert_close(info["means2d"], means2d)
    torch.testing.assert_close(info["depths"], depths)
    torch.testing.assert_close(info["conics"], conics)
    expected = scene["opacities"][None] * (compensations if rasterize_mode == "antialiased" else 1.0)
    assert (compensations < 0.99).any()  # the compensation tells the modes apart here
    torch.testing.assert_close(info["opacities"], expected.expand_as(info["opacities"]))


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_colours_are_the_spherical_harmonics_of_the_direction_from_each_camera(degree):
    # one wide, opaque, flat Gaussian in front of both cameras: its colour at the image centre is
    # its SH at the direction from each camera's centre to its mean, plus 0.5
    scene = _scene(1, seed=degree)
    scene["means"] = torch.tensor([[0.1, -0.05, 0.0]])
    scene["scales"] = torch.tensor([[3.0, 3.0, 0.01]])
    scene["quats"] = torch.tensor([[1.0, 0, 0, 0]])
    scene["opacities"] = torch.ones(1)
    coefficients = 0.2 * torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(degree))
    image, alphas, _ = rasterize_reference(
        **{**scene, "colors": coefficients}, width=WIDTH, height=HEIGHT, sh_degree=degree
    )
    rotation, translation = scene["viewmats"][:, :3, :3], scene["viewmats"][:, :3, 3]
    centres = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]
    for camera in range(2):
        expected = _spherical_harmonics(degree, scene["means"][0] - centres[camera], coefficients[0]) + 0.5
        pixel = (camera, HEIGHT // 2, WIDTH // 2)
        torch.testing.assert_close(image[pixel], alphas[pixel] * expected.clamp_min(0.0), atol=1e-5, rtol=1e-5)
    if degree > 0:  # the two cameras see the mean from different directions, so different colours
        assert not torch.allclose(image[0, HEIGHT // 2, WIDTH // 2], image[1, HEIGHT // 2, WIDTH // 2], atol=1e-3)


def _composite_per_pixel(scene: dict, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 3DGS compositing rules, a pixel at a time, on gsplat's own projection: each pixel takes
    the Gaussians whose tiles it lies in, nearest first; alpha = min(0.999, opacity exp(-power)),
    skipped under 1/255; it stops before the transmittance falls to 1e-4."""
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        scene["means"], _covariances(scene), scene["viewmats"], scene["Ks"], WIDTH, HEIGHT
    )
    radii, means2d, depths, conics = (x.double().numpy() for x in (radii, means2d, depths, conics))
    colours, opacities = scene["colors"].double().numpy(), scene["opacities"].double().numpy()
    images = np.zeros((len(radii), HEIGHT, WIDTH, 4))
    alphas = np.zeros((len(radii), HEIGHT, WIDTH))
    for camera in range(len(radii)):
        order = [int(g) for g in np.argsort(depths[camera], kind="stable") if radii[camera, g] > 0]
        for y in range(HEIGHT):
            for x in range(WIDTH):
                transmittance, colour, depth = 1.0, np.zeros(3), 0.0
                for g in order:
                    (mx, my), r = means2d[camera, g], radii[camera, g]
                    if not (
                        math.floor((mx - r) / tile_size) <= x // tile_size < math.ceil((mx + r) / tile_size)
                        and math.floor((my - r) / tile_size) <= y // tile_size < math.ceil((my + r) / tile_size)
                    ):
                        continue
                    dx, dy = mx - (x + 0.5), my - (y + 0.5)
                    a, b, c = conics[camera, g]
                    power = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                    alpha = min(ALPHA_MAX, opacities[g] * math.exp(-power))
                    if power < 0 or alpha < ALPHA_MIN:
                        continue
                    if transmittance * (1 - alpha) <= TRANSMITTANCE_MIN:
                        break
                    colour += transmittance * alpha * colours[g]
                    depth += transmittance * alpha * depths[camera, g]
                    transmittance *= 1 - alpha
                images[camera, y, x] = [*colour, depth]
                alphas[camera, y, x] = 1 - transmittance
    return images, alphas


@pytest.mark.parametrize("tile_size", [8, 16])
def test_the_compositing_follows_the_3dgs_rules_pixel_by_pixel(tile_size):
    scene = _scene(14, seed=2)
    expected, expected_alphas = _composite_per_pixel(scene, tile_size)
    background = torch.tensor([[0.2, 0.4, 0.9], [1.0, 0.0, 0.5]])
    image, alphas, _ = rasterize_reference(
        **scene, width=WIDTH, height=HEIGHT, render_mode="RGB+D", tile_size=tile_size, backgrounds=background
    )
    assert 0.2 < expected_alphas.mean() < 0.9  # some pixels covered, some not: a scene that tells apart
    np.testing.assert_allclose(alphas[..., 0].numpy(), expected_alphas, atol=2e-5)
    expected_rgb = expected[..., :3] + (1 - expected_alphas[..., None]) * background[:, None, None].numpy()
    np.testing.assert_allclose(image[..., :3].numpy(), expected_rgb, atol=2e-5)
    np.testing.assert_allclose(image[..., 3].numpy(), expected[..., 3], atol=1e-4)
    # the expected depth is the accumulated depth over the accumulation
    expected_depth, _, _ = rasterize_reference(
        **scene, width=WIDTH, height=HEIGHT, render_mode="ED", tile_size=tile_size
    )
    covered = expected_alphas > 0.05
    np.testing.assert_allclose(
        expected_depth[..., 0].numpy()[covered], expected[..., 3][covered] / expected_alphas[covered], rtol=1e-4
    )


def test_a_pixel_stops_once_it_is_opaque():
    # three wide opaque discs one behind the other: the first takes the pixel's alpha to 0.999, and
    # the next would take its transmittance under 1e-4, so neither behind it shows at all
    scene = _scene(3, seed=3)
    scene["means"] = torch.tensor([[0.0, 0, 0.0], [0.0, 0, 0.2], [0.0, 0, 0.4]])
    scene["scales"] = torch.tensor([[3.0, 3.0, 0.01]]).repeat(3, 1)
    scene["quats"] = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    scene["opacities"] = torch.ones(3)
    scene["colors"] = torch.eye(3)
    image, alphas, _ = rasterize_reference(**scene, width=WIDTH, height=HEIGHT)
    centre = (0, HEIGHT // 2, WIDTH // 2)
    assert torch.allclose(image[centre], torch.tensor([ALPHA_MAX, 0.0, 0.0])) and alphas[centre] == pytest.approx(
        ALPHA_MAX
    )
    # in a corner, 15 pixels out, the first disc is less opaque and the second shows behind it
    assert image[0, 0, 0, 1] > 1e-3 and image[0, 0, 0, 2] > 1e-5


def test_the_gradients_are_what_densification_reads():
    scene = _scene(14, seed=4)
    parameters = {name: scene[name].clone().requires_grad_() for name in ("means", "scales", "opacities", "colors")}
    image, _, info = rasterize_reference(**{**scene, **parameters}, width=WIDTH, height=HEIGHT)
    info["means2d"].retain_grad()  # as gsplat's strategy does before the backward pass
    weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
    (image * weights).sum().backward()
    visible = info["radii"] > 0
    gradient, absolute = info["means2d"].grad, info["means2d"].absgrad
    assert gradient.shape == absolute.shape == info["means2d"].shape
    assert (gradient[visible].abs().sum(-1) > 0).float().mean() > 0.9 and not gradient[~visible].any()
    # the sum over pixels of each pixel's |gradient| bounds the |sum|, and differs from it
    assert (absolute >= gradient.abs() - 1e-6).all() and (absolute - gradient.abs()).max() > 1e-4
    assert all(value.grad is not None and value.grad.abs().sum() > 0 for value in parameters.values())
    # the gradient is the derivative: a step along it changes the render as predicted
    step = 1e-3 * parameters["means"].grad / parameters["means"].grad.norm()
    with torch.no_grad():
        moved, _, _ = rasterize_reference(
            **{**scene, **parameters, "means": parameters["means"] + step}, width=WIDTH, height=HEIGHT
        )
    predicted = float((parameters["means"].grad * step).sum())
    assert float(((moved - image.detach()) * weights).sum()) == pytest.approx(predicted, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's kernels need a CUDA GPU")
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_gsplats_cuda_kernels_match_the_reference(rasterize_mode):
    from gsplat import rasterization

    scene = _scene(200, seed=5, device="cuda")
    coefficients = torch.randn(200, 16, 3, generator=torch.Generator().manual_seed(1)).cuda() * 0.3
    options = dict(width=WIDTH * 4, height=HEIGHT * 4, sh_degree=3, render_mode="RGB+ED", rasterize_mode=rasterize_mode)
    scene["Ks"][:, :2] *= 4
    fused, fused_alphas, _ = rasterization(**{**scene, "colors": coefficients}, **options)
    reference, reference_alphas, _ = rasterize_reference(**{**scene, "colors": coefficients}, **options)
    torch.testing.assert_close(reference_alphas, fused_alphas, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference[..., :3], fused[..., :3], atol=1e-4, rtol=1e-4)
    covered = fused_alphas[..., 0] > 0.05
    torch.testing.assert_close(reference[..., 3][covered], fused[..., 3][covered], atol=1e-3, rtol=1e-4)


def test_a_splat_fit_on_a_black_background_is_opaque_on_the_head_and_clear_around_it(tmp_path):
    """A small splat fit on the CPU (32 px, 100 steps). Behind a random background (the views' alpha
    composited over it, the default) the head is opaque and the background clear; behind a fixed
    black one this fit leaves the head 56 % opaque, and the health check stops it ("hazy")."""
    from dp360.nerf import synthetic
    from dp360.nerf.checkpoint import load_fitted
    from dp360.nerf.common import FitSettings
    from dp360.nerf.render import render_pose
    from dp360.nerf.splat import ball_seed_points, fit_splat, splat_config

    size, black = 32, (0.0, 0.0, 0.0)
    mesh = synthetic.head_mesh()
    views = synthetic.write_views(tmp_path / "views", size, mesh=mesh, background=black)
    seeds = ball_seed_points(2000, 42)
    (tmp_path / "nerf").mkdir()
    settings = FitSettings.preset("test", iterations=100)
    summary = fit_splat(views, tmp_path / "nerf", settings, "cpu", progress=False, seed_points=seeds)
    assert summary["health"]["foreground_opacity"] > 0.85
    field = load_fitted(tmp_path / "nerf", "cpu", views, splat_config)
    errors, clear = [], []
    for pose in synthetic.held_out_poses(32, 4, 15.0):
        truth = synthetic.render(mesh, pose, size, background=black)
        errors.append(((truth - render_pose(field, pose, size)) ** 2).mean())
        # rendered over white, the space around the head stays white: no splats there, not even
        # black ones (which the views' black alone could not tell from empty space)
        field.model.background_color = torch.ones(3)
        clear.append(render_pose(field, pose, size)[~synthetic.render_mask(mesh, pose, size)].mean())
        field.model.background_color = torch.zeros(3)
    psnr = 10 * math.log10(1 / np.mean(errors))
    assert psnr > 15.5, psnr  # a black head on black scores 13.5 dB here
    assert np.mean(clear) > 0.95, np.mean(clear)
