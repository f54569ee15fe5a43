"""What every part of dp360's field code shares: the fit's settings and presets, the names of its
record and of nerfstudio's folders, the views' plain background, and nerfstudio kept quiet.

The bottom of the nerf package: it imports none of its other modules.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import layout
from ..errors import Dp360Error

FIT_FILE = layout.name_of(layout.FIT_RECORD)
MAX_FIT_ITERATIONS = 1_000_000
EXPERIMENT, METHOD, TIMESTAMP = "dp360", "dp360-head", "fit"
SPLAT_METHOD = "dp360-splat"  # `--field splatfacto` (splat.py); its folder replaces METHOD's
LEGACY_METHODS = ("nerfacto-head",)  # the method's folder name in runs of dp360 before its registration


# `FitSettings.preset` names -> their overrides of the defaults (gpu)
FIT_PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": dict(
        iterations=600,
        rays_per_batch=1024,
        num_levels=12,
        log2_hashmap_size=17,
        max_res=512,
        proposal_samples=(96, 48),
        num_nerf_samples=32,
    ),
    "test": dict(
        iterations=40,
        rays_per_batch=256,
        num_levels=8,
        log2_hashmap_size=14,
        max_res=128,
        hidden_dim=32,
        proposal_samples=(48, 24),
        num_nerf_samples=16,
    ),
}


@dataclass
class FitSettings:
    """Field-fitting settings; `preset()` gives the GPU default and smaller CPU/test ones."""

    iterations: int = 3000
    rays_per_batch: int = 4096
    num_levels: int = 16
    log2_hashmap_size: int = 19
    max_res: int = 2048
    hidden_dim: int = 64
    num_nerf_samples: int = 48
    proposal_samples: tuple[int, int] = (256, 96)
    # The head lives in PanoHead's +-0.5 box; the cameras sit at 2.7 from its centre.
    near: float = 1.9
    far: float = 3.5
    scene_half_size: float = 0.5
    background: str = "auto"  # auto (from the views' borders) | white | black
    seed: int = 42
    appearance_embedding: bool = False  # one appearance for all views: they show one head
    # The field starts as a faint fog the colour head can learn through (nerfacto's 0.01 leaves
    # every ray transparent, so the only colour gradient is the background's, which saturates it).
    init_density: float = 1.0
    # Training composites a random colour behind the views' foreground (a mask of the plain border
    # colour, flood-filled from the image edges), so a transparent head is always wrong and the
    # colour head always learns the true colour, whatever the background's colour.
    random_background: bool = True
    # The learning rate decays over this many steps whatever the fit's length (a horizon tied to a
    # short fit's iterations drops it before the colours are learnt), after a short warm-up.
    lr_decay_steps: int = 20_000
    lr_warmup_steps: int = 20
    # Share of each ray batch drawn from the views' foreground (their alpha, dilated); the rest is
    # drawn uniformly, so the empty space around the head is still learnt. A short fit otherwise
    # spends two thirds of its rays on the plain background (measured +0.6 dB held-out, same cost).
    foreground_ray_share: float = 0.75
    # The colour head ignores the viewing direction (nerfacto's sees it): the views show one head
    # under one light, and every camera above or below their eye-level orbit is a direction no view
    # had, where a view-dependent head's colour is untrained (+0.5 dB at +15 degrees, 3 seeds).
    view_dependent_colour: bool = False
    # Before the photometric fit, the field's density is fitted for this many steps (at most the
    # fit's iterations) to `hull_density` inside the views' visual hull and to nothing outside it
    # (hull.py), so the fit starts from a surface where the head is; 0 skips it.
    hull_prime_steps: int = 200
    hull_density: float = 300.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FitSettings:
        if name not in FIT_PRESETS:
            raise Dp360Error(f"Unknown fit preset '{name}'; choose from {', '.join(FIT_PRESETS)}.")
        return cls(**{**FIT_PRESETS[name], **overrides})

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        from ..checks import check_int, check_seed

        check_int("--fit-iterations", self.iterations, 1, MAX_FIT_ITERATIONS)
        check_int("rays per batch", self.rays_per_batch, 1, 1 << 20)
        check_seed(self.seed)
        check_int("the learning-rate decay steps", self.lr_decay_steps, 1, 100_000_000)
        check_int("the learning-rate warm-up steps", self.lr_warmup_steps, 0, 100_000_000)
        check_int("the visual-hull priming steps", self.hull_prime_steps, 0, 1_000_000)
        if not (1e-3 <= self.hull_density <= 1e6):
            raise Dp360Error(f"The visual hull's density must be between 0.001 and 1000000, not {self.hull_density!r}.")
        if not (1e-6 <= self.init_density <= 1e4):
            raise Dp360Error(f"The initial density must be between 1e-06 and 10000, not {self.init_density!r}.")
        if self.background not in ("auto", "white", "black"):
            raise Dp360Error(f"The fit background must be auto, white or black, not {self.background!r}.")
        if not (0.0 <= self.foreground_ray_share <= 1.0):
            raise Dp360Error(
                f"The foreground share of the rays must be between 0 and 1, not {self.foreground_ray_share!r}."
            )


@contextlib.contextmanager
def nerfstudio_quietly() -> Iterator[None]:
    """nerfstudio prints its log to stdout; keep stdout for dp360's --json summaries."""
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def deterministic_on(device: str) -> Iterator[None]:
    """On a CPU, the same seed gives the same field bit for bit: the scatter-adds of the hash
    grids' backward pass otherwise sum in a thread-dependent order. CUDA fits stay
    non-deterministic (tiny-cuda-nn and nerfacc have no deterministic kernels)."""
    if device != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def border_colour(views_dir: Path) -> np.ndarray:
    """Median colour (0..1) of the one-pixel borders of the view images."""
    transforms = json.loads((Path(views_dir) / "transforms.json").read_text())
    return border_colour_of(Path(views_dir) / frame["file_path"] for frame in transforms["frames"])


def border_colour_of(images: Iterable[Path]) -> np.ndarray:
    """Median colour (0..1) of the one-pixel borders of these images."""
    from PIL import Image

    samples = []
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        samples.append(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))
    return np.median(np.concatenate(samples), axis=0)


# A pixel belongs to the plain background when every channel is within this of the border colour
# (generated views carry a little noise) and it connects to the image's edge through such pixels.
BACKGROUND_TOLERANCE = 0.06
# Below this share of border pixels near their median colour, a view has no plain background
# (a capture, a scene): it is then all foreground.
PLAIN_BORDER_SHARE = 0.9


def foreground_alpha(pixels: np.ndarray, background: Sequence[float] | None = None) -> np.ndarray:
    """(H, W) uint8 alpha of a view: 0 on the plain background around the head, 255 elsewhere.

    The background is the region of pixels close to the border colour that touches the image's
    edges (a flood fill), so head pixels that happen to share the background's colour stay opaque.
    A view whose border is not one plain colour is all foreground."""
    from scipy import ndimage

    rgb = np.asarray(pixels, dtype=np.float32)[..., :3] / 255
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0) if background is None else np.asarray(background, dtype=np.float32)
    if (np.abs(border - colour).max(axis=-1) <= BACKGROUND_TOLERANCE).mean() < PLAIN_BORDER_SHARE:
        return np.full(rgb.shape[:2], 255, np.uint8)
    near = np.abs(rgb - colour).max(axis=-1) <= BACKGROUND_TOLERANCE
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background_mask = np.isin(labels, edge_labels[edge_labels > 0])
    return np.where(background_mask, 0, 255).astype(np.uint8)


def resolve_background(views_dir: Path, setting: str) -> list[float]:
    if setting == "white":
        return [1.0, 1.0, 1.0]
    if setting == "black":
        return [0.0, 0.0, 0.0]
    if setting != "auto":
        raise Dp360Error(f"background must be auto, white or black, not {setting!r}.")
    return [round(float(x), 4) for x in border_colour(views_dir)]


def check_views_folder(views_dir: Path) -> None:
    if not (Path(views_dir) / "transforms.json").is_file():
        raise Dp360Error(
            f"{views_dir} has no transforms.json; generate views first (`dp360 views`), or point at a folder of images with nerfstudio cameras."
        )
