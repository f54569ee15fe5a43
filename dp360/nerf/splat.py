"""3D Gaussian splats as the run's field (`--field splatfacto`): nerfstudio's splatfacto (on gsplat)
configured for the head orbit, registered with nerfstudio as the method "dp360-splat", and the
export of the splats as `export/head.splat.ply` in the standard 3DGS layout.

The method is splatfacto with the settings of dp360-head (method.py) where they apply:
- the world frame of `views/transforms.json` kept as is, and the same bounded scene box
  (PanoHead's +-0.5 box, where its heads live);
- in training, a random background colour composited behind both the splats and the views'
  foreground (the alpha `HeadDataset` derives from the views' plain border), as dp360-head does:
  behind the views' fixed black a 64 px, 300-step fit left the head 66 % opaque inside the views'
  foreground, and the health check stopped it (99 % behind a random one); renders use the views'
  colour;
- no camera optimisation (the cameras are exact by construction);
- splatfacto's schedule fitted into the fit's iterations (see `splat_schedule`), and its sizes
  (densification, culling, the learning rate of the means) scaled from nerfstudio's auto-scaled
  scenes (cameras at distance 1) to our frame (cameras at 2.7);
- the splats start from seed points (`pick_seed_points`), the best source first: the PanoHead
  inversion's depth at the orbit cameras (`noise/depth.npz`, which the noise stage writes), else
  the surface of a nerfacto field of the run (its density, thresholded as the mesh export does),
  else a ball of points inside the head box drawn with the fit's seed.
- LPIPS is never built (it would download AlexNet weights), as in dp360-head.

gsplat rasterises on CUDA only (and splatfacto moves its camera intrinsics to CUDA). On any other
device the model rasterises through `splat_raster.rasterize_reference`, gsplat's maths in plain
PyTorch: slow, but enough for the tests and the 64 px quality benchmark to fit and render splats on
a CPU. The commands still refuse a splat field off CUDA before any work (`require_cuda`, through
`FieldMethod.needs_cuda`): at real sizes the reference would take hours and more memory than the
machine has. The mesh export reads a density field, which splats do not have: the export stage of a
splat field writes the PLY and records why no mesh was written.

This module imports nerfstudio at the top; dp360's CLI imports it lazily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, get_viewmat

from .. import cameras, layout
from ..errors import Dp360Error
from .checkpoint import load_fitted
from .common import EXPERIMENT, FIT_FILE, METHOD, SPLAT_METHOD, TIMESTAMP, FitSettings, resolve_background
from .mesh import HEAD_BOX_HALF
from .method import HeadDataset, HeadPipelineConfig, WithoutLpips, head_config, no_download_metrics
from .splat_raster import rasterize_reference

SPLAT_FILE = layout.name_of(layout.SPLATS)  # in export/: the splats in the standard 3DGS PLY layout
SEED_FILE = "seed_points.npz"  # in the fit's folder: what the splats started from
SEED_POINT_COUNT = 50_000
SEED_BALL_RADIUS = 0.3  # a ball of this radius lies inside the +-0.5 head box and holds the head's core
SEED_GRID = 64  # density samples per axis of the head box when seeding from a nerfacto field
SEED_GREY = 128
# Our frame is nerfstudio's auto-scaled one (cameras at distance 1) enlarged by the orbit radius:
# splatfacto's lengths are scaled by it.
ORBIT_SCALE = cameras.CAMERA_RADIUS
# nerfstudio's splatfacto defaults that are lengths (in its auto-scaled frame) and learning rates
NERFSTUDIO_DENSIFY_SIZE, NERFSTUDIO_CULL_SCALE, NERFSTUDIO_MEANS_LR = 0.01, 0.5, 1.6e-4

DESCRIPTION = (
    "dp360's splat field: splatfacto (3D Gaussian splats, CUDA) for a 360-degree orbit of exact cameras around a "
    "bounded head on a plain background (world frame kept, no camera optimisation, background from the views)."
)


def require_cuda(
    device: str,
    what: str = "--field splatfacto",
    advice: str = "run on a CUDA GPU (--device cuda) or use --field nerfacto",
) -> None:
    """Splats rasterise on CUDA only: refuse any other device with one sentence."""
    if not str(device).startswith("cuda"):
        raise Dp360Error(
            f"{what} needs a CUDA GPU (gsplat rasterises splats on CUDA only) but the device is {device}; {advice}."
        )


# -- seed points -----------------------------------------------------------------------------------


@dataclass
class SeedPoints:
    points: np.ndarray  # (N, 3) float32, world frame
    colours: np.ndarray  # (N, 3) uint8
    source: str  # what they were drawn from, recorded in fit.json

    def save(self, path: Path) -> Path:
        with open(path, "wb") as handle:  # a file inside the fit's own staging folder
            np.savez(handle, points=self.points.astype(np.float32), colours=self.colours.astype(np.uint8))
        return path

    @classmethod
    def load(cls, path: Path, source: str = "file") -> SeedPoints:
        with np.load(path, allow_pickle=False) as data:
            points, colours = np.asarray(data["points"], np.float32), np.asarray(data["colours"], np.uint8)
        if points.ndim != 2 or points.shape[1] != 3 or colours.shape != points.shape or len(points) < 4:
            raise Dp360Error(f"'{path}' does not hold seed points (4 or more points with colours); refit the field.")
        return cls(points, colours, source)


def ball_seed_points(count: int, seed: int, radius: float = SEED_BALL_RADIUS) -> SeedPoints:
    """`count` points uniform in a ball around the origin (inside the head box), mid-grey."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True).clip(1e-12)
    radii = radius * rng.random(count) ** (1 / 3)  # uniform in volume
    points = (directions * radii[:, None]).astype(np.float32)
    return SeedPoints(points, np.full((count, 3), SEED_GREY, np.uint8), f"ball of radius {radius} (seed {seed})")


def density_seed_points(loaded, count: int, seed: int, resolution: int = SEED_GRID) -> SeedPoints:
    """`count` points on the surface of a fitted nerfacto field (a `LoadedField`): the voxels of the
    head box whose density is above the mesh export's automatic iso-level and that touch a voxel
    below it, a point drawn uniformly inside each chosen voxel; coloured as the field shows them
    from outside (along the direction away from the head's centre)."""
    from scipy.ndimage import binary_erosion

    from .mesh import density_grid, field_colours, surface_iso_level, view_depths

    grid = density_grid(loaded, resolution, HEAD_BOX_HALF)
    level, _ = surface_iso_level(loaded, grid, view_depths(loaded))
    inside = grid > level
    surface = inside & ~binary_erosion(inside)
    voxels = np.argwhere(surface if surface.any() else inside)
    if len(voxels) == 0:
        raise Dp360Error("The nerfacto field has no density above its iso-level inside the head box to seed splats.")
    rng = np.random.default_rng(seed)
    spacing = 2 * HEAD_BOX_HALF / (resolution - 1)
    chosen = voxels[rng.integers(0, len(voxels), count)]
    # grid sample k sits at -half + k * spacing: a point within half a spacing of it, kept in the box
    points = -HEAD_BOX_HALF + (chosen + rng.random((count, 3)) - 0.5) * spacing
    points = np.clip(points, -HEAD_BOX_HALF, HEAD_BOX_HALF).astype(np.float32)
    outward = points / np.linalg.norm(points, axis=1, keepdims=True).clip(1e-6)
    colours = (field_colours(loaded, points, outward) * 255).round().astype(np.uint8)
    return SeedPoints(points, colours, f"nerfacto density surface (level {level:.3g}, seed {seed})")


def depth_seed_points(depth_file: Path, count: int, seed: int, opacity_threshold: float = 0.9) -> SeedPoints:
    """`count` points on the surface of the PanoHead head fitted to the portrait (the noise stage's
    `depth.npz`): every pixel of its orbit renders that is opaque enough, lifted along its ray to
    the rendered depth, coloured by the noise frame at that pixel; drawn without replacement."""
    from PIL import Image

    from ..panohead.stage import DEPTH_FILE

    depth_file = Path(depth_file)
    try:
        with np.load(depth_file, allow_pickle=False) as data:
            depth, opacity, labels = (np.asarray(data[name], np.float32) for name in ("depth", "opacity", "labels"))
    except (OSError, ValueError, KeyError) as error:
        raise Dp360Error(
            f"'{depth_file}' is not a {DEPTH_FILE} of the noise stage ({error}); rerun with `dp360 reconstruct --force`."
        ) from None
    views, resolution = depth.shape[0], depth.shape[-1]
    if depth.shape != (views, resolution, resolution) or opacity.shape != depth.shape or labels.shape != (views, 25):
        raise Dp360Error(
            f"'{depth_file}' has depth, opacity and cameras of different counts; rerun with `dp360 reconstruct --force`."
        )
    frames = sorted((depth_file.parent / "frames").glob("*.png"))
    points, colours = [], []
    for index in range(views):
        cam2world, intrinsics = cameras.parse_panohead_label(labels[index])
        origins, directions = cameras.pixel_rays(
            torch.from_numpy(cam2world[None]).float(), torch.from_numpy(intrinsics[None]).float(), resolution
        )
        lifted = (origins + directions * torch.from_numpy(depth[index]).reshape(1, -1, 1))[0].numpy()
        keep = (opacity[index].reshape(-1) > opacity_threshold) & (np.abs(lifted) <= HEAD_BOX_HALF).all(axis=1)
        if len(frames) == views:
            frame = Image.open(frames[index]).convert("RGB").resize((resolution, resolution), Image.BOX)
            rgb = np.asarray(frame, np.uint8).reshape(-1, 3)
        else:
            rgb = np.full((resolution * resolution, 3), SEED_GREY, np.uint8)
        points.append(lifted[keep])
        colours.append(rgb[keep])
    points, colours = np.concatenate(points), np.concatenate(colours)
    if len(points) < 4:
        raise Dp360Error(f"'{depth_file}' shows no opaque head inside the head box to seed splats from.")
    chosen = np.random.default_rng(seed).permutation(len(points))[:count]
    return SeedPoints(
        points[chosen].astype(np.float32),
        colours[chosen],
        f"PanoHead depth of the inversion ({views} views, seed {seed})",
    )


def pick_seed_points(run_dir: Path, seed: int, device: str, count: int = SEED_POINT_COUNT) -> SeedPoints:
    """The splats' seed points for a run, the best source first: the PanoHead inversion's depth
    (`noise/depth.npz`), else the surface of a nerfacto field the run holds in `nerf/`, else a
    ball inside the head box."""
    from ..panohead.stage import DEPTH_FILE

    run_dir = Path(run_dir)
    if (run_dir / layout.NOISE / DEPTH_FILE).is_file():
        return depth_seed_points(run_dir / layout.NOISE / DEPTH_FILE, count, seed)
    record = run_dir / layout.NERF / FIT_FILE
    if record.is_file():
        try:
            method = json.loads(record.read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            method = None
        if method == METHOD:
            field = load_fitted(run_dir / layout.NERF, device, run_dir / layout.VIEWS, head_config)
            return density_seed_points(field, count, seed)
    return ball_seed_points(count, seed)


# -- the nerfstudio method -------------------------------------------------------------------------


@dataclass
class HeadSplatModelConfig(SplatfactoModelConfig):
    """splatfacto with the views' background colour, seed points from a file or a seeded ball,
    and without LPIPS."""

    _target: type = field(default_factory=lambda: HeadSplatModel)
    background_rgb: Optional[tuple[float, float, float]] = None
    """Background colour (0..1) composited behind the splats; None: the median colour of the
    training images' borders."""
    seed_points_file: Optional[Path] = None
    """An .npz of `points` (N, 3) and `colours` (N, 3, uint8) to start from; None: a ball of
    `seed_point_count` points inside the head box drawn with `seed`."""
    seed_point_count: int = SEED_POINT_COUNT
    seed: int = 42
    random_background: bool = True
    """In training, composite a random colour behind both the splats and the views' foreground (their
    alpha, from `HeadDataset`), as dp360-head does; renders and evaluation use `background_rgb`."""


class HeadSplatModel(WithoutLpips, SplatfactoModel):
    config: HeadSplatModelConfig

    def populate_modules(self) -> None:
        if self.seed_points is None:  # nerfstudio passes the dataparser's points; ours come from the config
            file = self.config.seed_points_file
            seeds = (
                SeedPoints.load(Path(file))
                if file is not None and Path(file).is_file()
                else ball_seed_points(self.config.seed_point_count, self.config.seed)
            )
            self.seed_points = (torch.from_numpy(seeds.points), torch.from_numpy(seeds.colours))
        points, colours = self.seed_points
        # splatfacto builds colour features on CUDA; hand it no colours and set them here instead,
        # so the model also builds on a CPU.
        self.seed_points = (points.float(), colours[:0])
        with no_download_metrics():
            super().populate_modules()
        rgb = colours.float().cpu() / 255
        dc = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-6)
        self.gauss_params["features_dc"].data = dc.to(self.gauss_params["features_dc"])
        if self.config.background_rgb is not None:
            self.set_background(self.config.background_rgb)

    def set_background(self, colour: Sequence[float] | torch.Tensor) -> None:
        self.background_color = torch.as_tensor([float(x) for x in colour], dtype=torch.float32)
        self.background_rgb = self.background_color  # the name the fit's health check reads (dp360-head's)

    def _get_background_color(self) -> torch.Tensor:
        # splatfacto composites the views' alpha over the same colour in its loss (`composite_with_background`)
        if self.training and self.config.random_background:
            return torch.rand(3, device=self.device)
        return self.background_color.to(self.device)

    def get_outputs(self, camera: Cameras) -> dict[str, Any]:
        if self.device.type == "cuda" or not isinstance(camera, Cameras):
            return super().get_outputs(camera)
        return self._reference_outputs(camera)

    def _reference_outputs(self, camera: Cameras) -> dict[str, Any]:
        """splatfacto's outputs on a device other than CUDA, rasterised by `rasterize_reference`
        (splatfacto's own moves the intrinsics to CUDA and calls gsplat's CUDA kernels). The same
        steps as splatfacto's, less the camera optimiser and bilateral grid, which dp360-splat turns
        off."""
        width, height = int(camera.width.item()), int(camera.height.item())
        params = dict(self.gauss_params)
        if self.crop_box is not None and not self.training:
            inside = self.crop_box.within(self.means).squeeze(-1)
            if not inside.any():
                return self.get_empty_outputs(width, height, self.background_color)
            params = {name: value[inside] for name, value in params.items()}
        downscale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / downscale)
        viewmat = get_viewmat(camera.camera_to_worlds.to(self.device))
        intrinsics = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(downscale)
        self.last_size = (height, width)
        colours = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if self.config.sh_degree > 0:
            degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colours, degree = torch.sigmoid(colours).squeeze(1), None
        with_depth = self.config.output_depth_during_training or not self.training
        render, alpha, self.info = rasterize_reference(
            means=params["means"],
            quats=params["quats"],
            scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1),
            colors=colours,
            viewmats=viewmat,
            Ks=intrinsics,
            width=width,
            height=height,
            sh_degree=degree,
            render_mode="RGB+ED" if with_depth else "RGB",
            rasterize_mode=self.config.rasterize_mode,
            # each splat's 3-sigma square only, not gsplat's whole tiles around it: 2.3x faster in a
            # 32 px fit, and what it leaves out is the faint tail (alpha under 1.1 % of the opacity)
            tile_size=None,
        )
        if self.training:
            self.strategy.step_pre_backward(
                self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info
            )
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        depth = None
        if with_depth:
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        return {
            "rgb": rgb.squeeze(0),
            "depth": depth,
            "accumulation": alpha.squeeze(0),
            "background": background if self.training else background.expand(height, width, 3),
        }


class HeadImageDatamanager(FullImageDatamanager[HeadDataset]):
    """nerfstudio's full-image data manager over `HeadDataset` (the views with their alpha)."""


@dataclass
class HeadImageDatamanagerConfig(FullImageDatamanagerConfig):
    _target: type = field(default_factory=lambda: HeadImageDatamanager)


def splat_schedule(iterations: int) -> dict[str, int]:
    """splatfacto's schedule (made for 30000 iterations) fitted into `iterations`: its statistics
    window (refine every 100 steps) kept, its phases as fractions of the fit: warm-up to 1/10,
    densification in the first half with one opacity reset half-way through it, the images at full
    resolution from 1/5 and all spherical-harmonic degrees from 3/10. At 30000 iterations this is
    splatfacto's own schedule."""
    steps = max(int(iterations), 1)
    refine_every = 100
    stop_split_at = max(steps // 2, 1)
    return {
        "refine_every": refine_every,
        "warmup_length": min(500, steps // 10),
        "stop_split_at": stop_split_at,
        "stop_screen_size_at": min(4000, stop_split_at),
        "reset_alpha_every": max(1, min(30, stop_split_at // (2 * refine_every))),  # in refinements
        "resolution_schedule": max(1, min(3000, steps // 10)),  # 2 doublings: full resolution at 2/10
        "sh_degree_interval": max(1, min(1000, steps // 10)),
    }


def splat_config(
    settings: FitSettings,
    device: str = "cuda",
    views_dir: Path | None = None,
    background: Sequence[float] | None = None,
    seed_points_file: Path | None = None,
) -> TrainerConfig:
    """nerfstudio's TrainerConfig of dp360-splat (see the module docstring). Of the fit settings it
    uses the iterations, the scene box, the background and the seed; the others are nerfacto's."""
    steps = max(settings.iterations, 1)

    def adam(lr: float, final: float | None = None) -> dict[str, Any]:
        scheduler = None if final is None else ExponentialDecaySchedulerConfig(lr_final=final, max_steps=steps)
        return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}

    means_lr = NERFSTUDIO_MEANS_LR * ORBIT_SCALE
    optimizers = {  # splatfacto's, less the camera optimiser and bilateral grid
        "means": adam(means_lr, means_lr / 100),
        "features_dc": adam(0.0025),
        "features_rest": adam(0.0025 / 20),
        "opacities": adam(0.05),
        "scales": adam(0.005),
        "quats": adam(0.001),
    }
    dataparser = NerfstudioDataParserConfig(
        orientation_method="none",
        center_method="none",
        auto_scale_poses=False,
        scale_factor=1.0,
        scene_scale=settings.scene_half_size,
        eval_mode="all",
        load_3D_points=False,  # seed points come from the model config, not a point-cloud file
    )
    if views_dir is not None:
        dataparser.data = Path(views_dir)
    cuda = device.startswith("cuda")
    config = TrainerConfig(
        method_name=SPLAT_METHOD,
        max_num_iterations=settings.iterations,
        steps_per_eval_image=10**9,
        steps_per_eval_batch=0,
        steps_per_eval_all_images=10**9,
        steps_per_save=2000,
        mixed_precision=False,
        pipeline=HeadPipelineConfig(
            datamanager=HeadImageDatamanagerConfig(
                # "gpu" caches the images on the training device (the CPU's memory in a CPU fit);
                # "cpu" pins them in host memory for a CUDA device, which a CPU-only machine cannot
                dataparser=dataparser,
                cache_images="gpu",
                cache_images_type="uint8",
            ),
            model=HeadSplatModelConfig(
                background_color="white",  # under `background_rgb`, or the views' colour (HeadPipeline)
                background_rgb=None if background is None else tuple(float(x) for x in background),
                camera_optimizer=CameraOptimizerConfig(mode="off"),
                densify_size_thresh=NERFSTUDIO_DENSIFY_SIZE * ORBIT_SCALE,
                cull_scale_thresh=NERFSTUDIO_CULL_SCALE * ORBIT_SCALE,
                rasterize_mode="classic",  # the mode common splat viewers render
                seed_points_file=None if seed_points_file is None else Path(seed_points_file),
                seed=settings.seed,
                random_background=settings.random_background,
                **splat_schedule(steps),
            ),
        ),
        optimizers=optimizers,
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
    config.machine.device_type = "cuda" if cuda else "cpu"
    config.machine.seed = settings.seed
    return config


def fit_splat(
    views_dir: Path,
    out_dir: Path,
    settings: FitSettings,
    device: str = "cuda",
    progress: bool = True,
    final_dir: Path | None = None,
    seed_points: SeedPoints | None = None,
) -> dict[str, Any]:
    """Train splats on `views_dir` into `out_dir` (a fresh folder), in the layout of `fit_field`
    (`dp360/dp360-splat/fit/` and fit.json). Returns a summary. `seed_points`: what to start from
    (default: a ball inside the head box); written to `out_dir/seed_points.npz`."""
    from .common import check_views_folder
    from .train import train, write_fit

    check_views_folder(views_dir)
    background = resolve_background(views_dir, settings.background)
    seeds = seed_points if seed_points is not None else ball_seed_points(SEED_POINT_COUNT, settings.seed)
    seed_file = seeds.save(Path(out_dir) / SEED_FILE)
    config = splat_config(settings, device, Path(views_dir).resolve(), background, seed_file)
    trainer, timing = train(config, out_dir, settings, device, progress, "splats")
    config.pipeline.model.seed_points_file = Path(final_dir or out_dir) / SEED_FILE  # where config.yml will find it
    summary = {
        "method": SPLAT_METHOD,
        "iterations": settings.iterations,
        **timing,
        "background": background,
        "splats": int(trainer.pipeline.model.num_points),
        "seed_points": {"count": len(seeds.points), "source": seeds.source},
        "config": f"{EXPERIMENT}/{SPLAT_METHOD}/{TIMESTAMP}/config.yml",
    }
    return write_fit(trainer, config, views_dir, out_dir, final_dir, settings, summary)


# -- the PLY export --------------------------------------------------------------------------------

SPLAT_PARAMETERS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")


def splat_parameters(model: SplatfactoModel) -> dict[str, np.ndarray]:
    """The model's Gaussians as float32 arrays, in splatfacto's names and shapes: means (N, 3),
    scales (N, 3) log, quats (N, 4) w x y z, features_dc (N, 3), features_rest (N, K - 1, 3),
    opacities (N, 1) logit."""
    return {name: model.gauss_params[name].detach().float().cpu().numpy() for name in SPLAT_PARAMETERS}


def splat_parameters_of_checkpoint(nerf_dir: Path) -> dict[str, np.ndarray]:
    """The Gaussians of a run's splat field read from its checkpoint (checked, as `load_field`
    reads it), without building the model: exporting them needs no CUDA."""
    from .checkpoint import REFIT, fit_checkpoints, read_fit_checkpoint

    checkpoints = fit_checkpoints(nerf_dir)
    if not checkpoints:
        raise Dp360Error(f"{nerf_dir} has no nerfstudio checkpoint; {REFIT}.")
    weights = read_fit_checkpoint(checkpoints[-1])["pipeline"]
    parameters = {}
    for name in SPLAT_PARAMETERS:
        tensor = weights.get(f"_model.gauss_params.{name}", weights.get(f"module._model.gauss_params.{name}"))
        if tensor is None:
            raise Dp360Error(f"'{checkpoints[-1]}' holds no splats ({name} is missing); {REFIT}.")
        parameters[name] = tensor.detach().float().cpu().numpy()
    count = len(parameters["means"])
    if count == 0:
        raise Dp360Error(f"'{checkpoints[-1]}' holds no splats (the field pruned every Gaussian); {REFIT}.")
    expected = {"means": 3, "scales": 3, "quats": 4, "features_dc": 3, "opacities": 1}
    if any(parameters[name].reshape(count, -1).shape[1] != width for name, width in expected.items()) or (
        parameters["features_rest"].size % (3 * max(count, 1))
    ):
        raise Dp360Error(f"'{checkpoints[-1]}' holds splat parameters of mismatched shapes; {REFIT}.")
    return parameters


def ply_property_names(rest_coefficients: int) -> list[str]:
    """The 3DGS vertex layout for `rest_coefficients` (K - 1) higher spherical-harmonic coefficients per
    channel."""
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{index}" for index in range(3 * rest_coefficients)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def splat_vertices(parameters: dict[str, np.ndarray]) -> np.ndarray:
    """The Gaussians as a structured array in the 3DGS PLY vertex layout: position, a zero normal,
    the colour's SH DC term, the higher terms channel-major (all of red's, then green's, then
    blue's, as the reference 3DGS writer orders them), opacity as a logit, scales as logs and the
    rotation as a unit quaternion w x y z. Gaussians with a non-finite value are left out."""
    means = np.asarray(parameters["means"], np.float32).reshape(-1, 3)
    count = len(means)
    rest = np.asarray(parameters["features_rest"], np.float32).reshape(count, -1, 3)
    quats = np.asarray(parameters["quats"], np.float32).reshape(count, 4)
    quats = quats / np.linalg.norm(quats, axis=1, keepdims=True).clip(1e-12)
    columns = [
        means,
        np.zeros((count, 3), np.float32),
        np.asarray(parameters["features_dc"], np.float32).reshape(count, 3),
        rest.transpose(0, 2, 1).reshape(count, -1),  # (N, K-1, 3) -> channel-major (N, 3 * (K-1))
        np.asarray(parameters["opacities"], np.float32).reshape(count, 1),
        np.asarray(parameters["scales"], np.float32).reshape(count, 3),
        quats,
    ]
    table = np.concatenate(columns, axis=1)
    table = table[np.isfinite(table).all(axis=1)]
    vertices = np.empty(len(table), dtype=[(name, "<f4") for name in ply_property_names(rest.shape[1])])
    for index, name in enumerate(vertices.dtype.names):
        vertices[name] = table[:, index]
    return vertices


def write_splat_ply(parameters: dict[str, np.ndarray], out: Path, overwrite: bool = False) -> Path:
    """Write the Gaussians to `out` as a binary little-endian 3DGS PLY, atomically; an existing file
    is refused unless `overwrite` (see dp360.outputs)."""
    from plyfile import PlyData, PlyElement

    from ..atomic import atomic_path
    from ..outputs import check_file_target

    out = check_file_target(out, overwrite)
    vertices = splat_vertices(parameters)
    if len(vertices) == 0:
        raise Dp360Error("The splat field has no Gaussian with finite values to export; refit the field.")
    with atomic_path(out) as temporary:
        PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<").write(str(temporary))
    return out


NO_MESH = (
    "a splat field has no density to mesh (marching cubes needs nerfacto's); its Gaussians are in "
    f"{layout.EXPORT}/{SPLAT_FILE}, or refit with --field nerfacto for a mesh"
)
