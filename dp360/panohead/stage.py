"""The noise stage and the camera-condition renders.

`build_noise` inverts the prepared crop into PanoHead and renders the tuned head at the N orbit
cameras (view 0 frontal, as the views stage expects): `noise/frames/000.png ...`,
`noise/condition.mp4` (the reference's condition32.mp4), `noise/w.pt` (pivot W+ and fitted
camera), `noise/fit.png` (target | inversion at the input camera) and `noise/inversion.json`.

`camera_condition_images` renders a fixed-seed canonical head at any orbit, for view counts
without official `sphere32` images (or when those are absent).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import cameras, layout
from ..atomic import atomic_directory, file_sha256, write_json_atomic
from ..checks import check_int
from ..errors import Dp360Error
from ..imaging import save_image_atomic
from ..pipeline.stage import ModelCache, Stage, StageContext, Unavailable
from ..weights import Need
from .inversion import InversionSettings, canonical_ws, invert, render_views, render_views_with_depth, to_uint8

CONDITION_FPS = 30
DEPTH_FILE = layout.name_of(layout.DEPTH)  # depth and opacity of the fitted head at the orbit cameras (seeds splats)
MAX_INVERSION_STEPS = 10_000


@dataclass
class NoiseSettings:
    invert_steps: int = 200
    pti_steps: int = 5
    # a run's are the views' count and the run's seed (handed over by `portrait_config`)
    views: int = 32
    seed: int = 42

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        check_int("--invert-steps", self.invert_steps, 0, MAX_INVERSION_STEPS)
        check_int("--pti-steps", self.pti_steps, 0, MAX_INVERSION_STEPS)


def _frontal_label(device) -> torch.Tensor:
    return torch.from_numpy(cameras.orbit_labels(1)).to(device)


def load_target(crop_path: Path, resolution: int) -> torch.Tensor:
    """The crop as PanoHead's projector reads it: square centre crop, Lanczos to `resolution`, [-1, 1]."""
    image = Image.open(crop_path).convert("RGB")
    width, height = image.size
    side = min(width, height)
    image = image.crop(
        ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    )
    image = image.resize((resolution, resolution), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return pixels / 127.5 - 1


def read_label(dataset_json: Path) -> torch.Tensor:
    labels = json.loads(Path(dataset_json).read_text()).get("labels") or []
    if not labels:
        raise Dp360Error(f"{dataset_json} holds no camera label; rerun the prepare stage.")
    cam2world, intrinsics = cameras.parse_panohead_label(labels[0][1])
    return torch.tensor([cameras.panohead_label(cam2world, intrinsics)], dtype=torch.float32)


def build_noise(
    prepared_dir: Path, folder: Path, generator, lpips, settings: NoiseSettings, device: str, progress: bool = True
) -> dict[str, Any]:
    """Fill `folder` (the noise stage's staging folder); returns a small summary."""
    generator = generator.to(device)
    target = load_target(prepared_dir / "crop.png", generator.config.img_resolution)
    label = read_label(prepared_dir / layout.name_of(layout.DATASET))
    inversion = InversionSettings(invert_steps=settings.invert_steps, pti_steps=settings.pti_steps, seed=settings.seed)
    result = invert(
        generator, target, label, lpips, inversion, progress=progress, frontal_camera=_frontal_label(device)
    )
    fitted = render_views(result.generator, result.ws, result.camera, seed=settings.seed)
    orbit = torch.from_numpy(cameras.orbit_labels(settings.views))
    frames, depth, opacity = render_views_with_depth(result.generator, result.ws, orbit, seed=settings.seed)
    del result.generator

    frames_dir = folder / layout.name_of(layout.NOISE_FRAMES)
    frames_dir.mkdir(parents=True)
    pixels = to_uint8(frames)
    for index, frame in enumerate(pixels):
        save_image_atomic(frames_dir / f"{index:03d}.png", frame)
    from ..video import write_mp4

    write_mp4(folder / "condition.mp4", pixels, fps=CONDITION_FPS)
    save_image_atomic(folder / "fit.png", np.concatenate([to_uint8(target)[0], to_uint8(fitted)[0]], axis=1))
    torch.save({"ws": result.ws.cpu(), "camera": result.camera.cpu()}, folder / "w.pt")
    # the fitted head's surface at the orbit cameras: what a splat field (`--field splatfacto`) starts from
    with open(folder / DEPTH_FILE, "wb") as handle:
        np.savez_compressed(
            handle,
            depth=depth[:, 0].numpy().astype(np.float32),
            opacity=opacity[:, 0].clamp(0, 1).numpy().astype(np.float32),
            labels=orbit.numpy().astype(np.float32),
        )
    error = float((fitted - target).abs().mean())
    summary = {
        "frames": len(pixels),
        "resolution": generator.config.img_resolution,
        "projection_loss": [round(result.projection_losses[0], 5), round(result.projection_losses[-1], 5)]
        if result.projection_losses
        else None,
        "pti_loss": [round(result.pti_losses[0], 5), round(result.pti_losses[-1], 5)] if result.pti_losses else None,
        "mean_abs_error": round(error, 5),
    }
    write_json_atomic(
        folder / "inversion.json",
        {
            **summary,
            "settings": inversion.key_dict(),
            "camera_offset": (result.camera - label.to(result.camera.device)).flatten()[[3, 7, 11]].tolist(),
        },
    )
    return summary


def camera_condition_images(generator, view_count: int, out_dir: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Render the canonical head at the `view_count` orbit cameras into `out_dir` (atomic)."""
    generator = generator.to(device)
    ws = canonical_ws(generator, _frontal_label(device), seed=seed)
    images = to_uint8(render_views(generator, ws, torch.from_numpy(cameras.orbit_labels(view_count)), seed=seed))
    with atomic_directory(out_dir) as staging:
        for index, image in enumerate(images):
            save_image_atomic(staging / f"{index:03d}.png", image)
    return Path(out_dir)


@dataclass
class NoiseModels:
    """Where the noise stage finds the converted PanoHead generator and the LPIPS backbone. The
    loaded models live in the run's `ModelCache` (a batch worker keeps them); the inversion
    fine-tunes a copy of the generator (PTI), so a kept one stays pristine."""

    generator_dir: Path
    lpips_backbone: Path

    @classmethod
    def locate(cls, weights_dir: Path | None = None) -> NoiseModels:
        from ..cache import panohead_dir
        from .perceptual import backbone_path

        # --weights-dir holds every converted model of the run; dp360's cache is used (and filled
        # on first use) only without it
        generator_dir = Path(weights_dir) / "panohead" if weights_dir is not None else panohead_dir()
        return cls(generator_dir, backbone_path())

    def generator_need(self) -> Need | None:
        """The converted generator, when it is to be in dp360's cache (fetched on first use)."""
        from ..cache import panohead_dir
        from .store import PANOHEAD_INSTALLER

        if Path(self.generator_dir) != panohead_dir():
            return None
        return Need("panohead", self.generator_dir, installer=PANOHEAD_INSTALLER)

    def problem(self) -> str | None:
        from .perceptual import VGG16_FILE, VGG16_URL
        from .store import check_present_generator, panohead_problem

        check_present_generator(self.generator_dir)  # damaged: an error, not a reason to go without
        problem = panohead_problem(self.generator_dir)
        if problem:
            return problem
        if not Path(self.lpips_backbone).is_file():
            return f"The perceptual-loss backbone is not at {self.lpips_backbone}; run `dp360 weights download perceptual` (or put {VGG16_FILE} from {VGG16_URL} there), or pass --no-3d-noise."
        return None

    def hashes(self) -> dict[str, str]:
        from .store import WEIGHTS_FILE

        return {
            "panohead": file_sha256(Path(self.generator_dir) / WEIGHTS_FILE),
            "lpips_backbone": file_sha256(self.lpips_backbone),
        }

    def generator(self, device: str, models: ModelCache | None = None):
        from .store import load_generator

        return (models or ModelCache()).model(
            "panohead",
            (str(self.generator_dir), str(device)),
            lambda: load_generator(self.generator_dir, device=device),
        )

    def build(
        self,
        prepared_dir: Path,
        folder: Path,
        settings: NoiseSettings,
        device: str,
        progress: bool = True,
        models: ModelCache | None = None,
    ) -> dict[str, Any]:
        from .perceptual import load_lpips

        models = models or ModelCache()
        lpips = models.model(
            "lpips", (str(self.lpips_backbone), str(device)), lambda: load_lpips(device, self.lpips_backbone)
        )
        return build_noise(prepared_dir, folder, self.generator(device, models), lpips, settings, device, progress)

    def camera_images(self, view_count: int, device: str, models: ModelCache | None = None) -> Path:
        """Camera-condition renders for `view_count` views, cached on disk per generator."""
        from ..cache import cache_dir

        digest = self.hashes()["panohead"][:12]
        out_dir = cache_dir() / "cameras" / f"orbit{view_count}-{digest}"
        if not out_dir.is_dir():
            camera_condition_images(self.generator(device, models), view_count, out_dir, device)
        return out_dir


@dataclass
class NoiseStageConfig:
    """The noise stage's config: its settings (the view count is the views stage's, handed over by
    `dp360.pipeline.registry.portrait_config`), the model locations, and whether it runs at all
    (off with --no-3d-noise: the views then start from Gaussian noise)."""

    settings: NoiseSettings
    models: NoiseModels
    enabled: bool = True

    def check(self, device: str | None = None) -> None:
        if self.enabled:
            self.settings.check()


# -- the stage ------------------------------------------------------------------------------------


def _check(context: StageContext[NoiseStageConfig]) -> Unavailable | None:
    if not context.config.enabled:
        return Unavailable("skipped", "turned off with --no-3d-noise: views start from Gaussian noise")
    problem = context.config.models.problem()
    if problem:
        return Unavailable(
            "not_available", problem, f"no 3D-aware noise, so the views will follow the cameras less well: {problem}"
        )
    return None


def _weights(context: StageContext[NoiseStageConfig]) -> tuple[Need, ...]:
    """The generator and the perceptual backbone, unless the noise is off or the generator comes
    from --weights-dir without one (the stage is then not available, as before)."""
    if not context.config.enabled:
        return ()
    from .perceptual import backbone_path

    models = context.config.models
    generator = models.generator_need()
    if generator is None and not Path(models.generator_dir).is_dir():
        return ()
    perceptual = (
        Need("perceptual", Path(models.lpips_backbone)) if Path(models.lpips_backbone) == backbone_path() else None
    )
    return tuple(need for need in (generator, perceptual) if need is not None)


def _inputs(context: StageContext[NoiseStageConfig]) -> dict[str, str]:
    prepared = context.run_dir / layout.PREPARED
    return {
        "crop": file_sha256(prepared / "crop.png"),
        "dataset": file_sha256(prepared / layout.name_of(layout.DATASET)),
        **context.config.models.hashes(),
    }


def _build(context: StageContext[NoiseStageConfig], folder: Path) -> dict[str, Any]:
    config = context.config
    return config.models.build(
        context.run_dir / layout.PREPARED, folder, config.settings, context.device, context.progress, context.models
    )


NOISE_STAGE: Stage[NoiseStageConfig] = Stage(
    name="noise",
    folder=layout.NOISE,
    description="PanoHead inversion and 3D-aware noise frames",
    config="noise",
    settings=lambda context: context.config.settings.key_dict(),
    inputs=_inputs,
    build=_build,
    check=_check,
    needs=("prepare",),
    weights=_weights,
    version=3,  # 2: importance sampling as PanoHead's (smoothed weights, S-3 intervals); 3: depth.npz
)
