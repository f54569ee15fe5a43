"""Every file and folder of a run folder, named once.

The relative names (`CROP`, `TRANSFORMS`, ...) are what run.json's records and the report use; a
`RunLayout` gives the same paths under one run folder. The bottom layer: stages, the runner, the
report, eval, batch and the CLI all read a run's layout here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The folders, one per stage family (a stage's `folder`).
PREPARED = "prepared"
NOISE = "noise"
VIEWS = "views"
NERF = "nerf"
EXPORT = "export"
EVAL = "eval"

# The run's own record, its lock and the portrait as decoded.
MANIFEST = "run.json"
LOCK = ".dp360.lock"
INPUT = "input.png"

# What each stage writes, relative to the run folder.
CROP = f"{PREPARED}/crop.png"
OVERLAY = f"{PREPARED}/overlay.png"
FACE = f"{PREPARED}/face.json"
DATASET = f"{PREPARED}/dataset.json"
NOISE_FRAMES = f"{NOISE}/frames"
NOISE_FIT = f"{NOISE}/fit.png"  # the crop | PanoHead's head fitted to it
DEPTH = f"{NOISE}/depth.npz"  # depth and opacity of the PanoHead inversion at the orbit cameras
BACK_VIEW = f"{VIEWS}/back_ref.png"
TRANSFORMS = f"{VIEWS}/transforms.json"
GRID = f"{VIEWS}/grid.png"
ORBIT = f"{VIEWS}/orbit.mp4"
FIT_RECORD = f"{NERF}/fit.json"
TURNTABLE = f"{EXPORT}/turntable.mp4"
MESH_STEM = "head"
MESH = f"{EXPORT}/{MESH_STEM}.glb"  # the default mesh format's file
SPLATS = f"{EXPORT}/{MESH_STEM}.splat.ply"  # instead of the mesh, for a splat field
REPORT = f"{EXPORT}/report.html"
CONSISTENCY = f"{EVAL}/consistency.json"


def name_of(relative: str) -> str:
    """The last part of a relative name (`CROP` -> "crop.png"), for a stage writing into its folder."""
    return relative.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __truediv__(self, relative: str) -> Path:
        return self.root / relative

    @property
    def prepared(self) -> Path:
        return self.root / PREPARED

    @property
    def noise(self) -> Path:
        return self.root / NOISE

    @property
    def views(self) -> Path:
        return self.root / VIEWS

    @property
    def nerf(self) -> Path:
        return self.root / NERF

    @property
    def export(self) -> Path:
        return self.root / EXPORT

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def crop(self) -> Path:
        return self.root / CROP
