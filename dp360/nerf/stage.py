"""The fit, render and export stages of a run (folders `nerf/` and `export/`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Dp360Error
from .fit import FitSettings, fit_field, load_field
from .mesh import MESH_FORMATS, MeshSettings, extract_mesh, write_mesh
from .render import TurntableSettings, render_turntable, write_frames

TURNTABLE_NAME = "turntable.mp4"
MESH_STEM = "head"


@dataclass
class FieldStageSettings:
    fit: FitSettings | None = None  # None: the "gpu" preset on CUDA, the "cpu" preset otherwise
    turntable: TurntableSettings = field(default_factory=TurntableSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    mesh_formats: tuple[str, ...] = ("glb",)

    def fit_for(self, device: str) -> FitSettings:
        return self.fit if self.fit is not None else FitSettings.preset("gpu" if device.startswith("cuda") else "cpu")

    def check(self) -> None:
        self.turntable.check()
        self.mesh.check()
        unknown = [name for name in self.mesh_formats if name not in MESH_FORMATS]
        if unknown or not self.mesh_formats:
            raise Dp360Error(f"Mesh formats must be among {', '.join(MESH_FORMATS)}; got {', '.join(self.mesh_formats) or 'none'}.")


def build_fit(views_dir: Path, folder: Path, final_dir: Path, settings: FitSettings, device: str, progress: bool) -> dict[str, Any]:
    return fit_field(views_dir, folder, settings, device, progress, final_dir=final_dir)


def build_render(run_dir: Path, folder: Path, settings: TurntableSettings, device: str, progress: bool) -> dict[str, Any]:
    loaded = load_field(run_dir / "nerf", device, run_dir / "views")
    frames, fps = render_turntable(loaded, settings, progress)
    write_frames(frames, folder / TURNTABLE_NAME, "mp4", settings.fps)
    return {"frames": len(frames), "resolution": settings.resolution, "render_fps": round(fps, 2)}


def build_export(run_dir: Path, folder: Path, settings: MeshSettings, formats: tuple[str, ...], device: str) -> dict[str, Any]:
    loaded = load_field(run_dir / "nerf", device, run_dir / "views")
    mesh = extract_mesh(loaded, settings)
    for mesh_format in formats:
        write_mesh(mesh, folder / f"{MESH_STEM}.{mesh_format}", mesh_format)
    return {"faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)), "iso_level": round(mesh.metadata["iso_level"], 4), "bounds": [[round(float(x), 4) for x in row] for row in mesh.bounds], "formats": list(formats)}
