"""The fit, render and export stages of a run (folders `nerf/` and `export/`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import layout
from ..atomic import file_sha256
from ..errors import Dp360Error
from ..pipeline.stage import Stage, StageContext
from .checkpoint import fit_checkpoints
from .common import FIT_FILE, FitSettings
from .export import export_field
from .fit import FIELD_METHODS, load_field
from .mesh import MESH_FORMATS, MeshSettings
from .render import TurntableSettings, render_turntable, write_frames

TURNTABLE_NAME = layout.name_of(layout.TURNTABLE)
MESH_STEM = layout.MESH_STEM


FIELDS = tuple(FIELD_METHODS)  # `--field`: nerfacto (dp360-head, method.py) or splatfacto (dp360-splat, splat.py)


@dataclass
class FieldStageSettings:
    fit: FitSettings | None = None  # None: the "gpu" preset on CUDA, the "cpu" preset otherwise
    turntable: TurntableSettings = field(default_factory=TurntableSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    mesh_formats: tuple[str, ...] = ("glb",)
    field: str = "nerfacto"  # one of FIELDS

    def fit_for(self, device: str, seed: int = 42) -> FitSettings:
        """The fit's settings: as given, else the device's preset with the run's seed."""
        if self.fit is not None:
            return self.fit
        return FitSettings.preset("gpu" if device.startswith("cuda") else "cpu", seed=seed)

    def check(self, device: str | None = None, toolchain: bool = True) -> None:
        """Every setting; with `device`, also that the field can be fitted there (splats: CUDA, and
        with `toolchain` gsplat's CUDA kernels compiled or compilable on this machine)."""
        if self.field not in FIELDS:
            raise Dp360Error(f"--field must be one of {', '.join(FIELDS)}, not {self.field!r}.")
        needs_cuda = FIELD_METHODS[self.field].needs_cuda
        if needs_cuda and device is not None and not device.startswith("cuda"):
            raise Dp360Error(
                f"--field {self.field} needs a CUDA GPU (gsplat rasterises splats on CUDA only) but the device is "
                f"{device}; run on a CUDA GPU (--device cuda) or use --field nerfacto."
            )
        if needs_cuda and device is not None and toolchain:
            from ..gpu import splat_problem

            # before the first stage: without nvcc gsplat fails only in the fit, after the views
            problem = splat_problem()
            if problem:
                raise Dp360Error(problem)
        if self.fit is not None:
            self.fit.check()
        self.turntable.check()
        self.mesh.check()
        unknown = [name for name in self.mesh_formats if name not in MESH_FORMATS]
        if unknown or not self.mesh_formats:
            raise Dp360Error(
                f"Mesh formats must be among {', '.join(MESH_FORMATS)}; got {', '.join(self.mesh_formats) or 'none'}."
            )


def build_fit(
    run_dir: Path,
    folder: Path,
    settings: FitSettings,
    field_name: str,
    device: str,
    progress: bool,
    note=lambda message: None,
) -> dict[str, Any]:
    return FIELD_METHODS[field_name].fit_run(run_dir, folder, settings, device, progress, note)


def build_render(
    run_dir: Path, folder: Path, settings: TurntableSettings, device: str, progress: bool
) -> dict[str, Any]:
    loaded = load_field(run_dir / layout.NERF, device, run_dir / layout.VIEWS)
    frames, fps = render_turntable(loaded, settings, progress)
    write_frames(frames, folder / TURNTABLE_NAME, "mp4", settings.fps)
    return {"frames": len(frames), "resolution": settings.resolution, "render_fps": round(fps, 2)}


def build_export(
    run_dir: Path, folder: Path, settings: MeshSettings, formats: tuple[str, ...], device: str
) -> dict[str, Any]:
    summary, _ = export_field(
        run_dir, lambda mesh_format: folder / f"{MESH_STEM}.{mesh_format}", formats, settings, device
    )
    return summary


# -- the stages -----------------------------------------------------------------------------------


def view_hashes(run_dir: Path) -> dict[str, str]:
    """The files of `views/` the fit reads: the images and transforms.json (not the grid)."""
    views = run_dir / layout.VIEWS
    return {
        f"{layout.VIEWS}/{path.name}": file_sha256(path)
        for path in sorted(views.iterdir())
        if path.suffix in (".png", ".json") and path.name != layout.name_of(layout.GRID)
    }


def field_hashes(run_dir: Path) -> dict[str, str]:
    """What `load_field` reads: the fit's settings and background, its checkpoint, and the views'
    cameras. A refitted field that differs therefore redoes the turntable and the mesh; one that
    is bit-identical (a seeded CPU fit) keeps them."""
    nerf = run_dir / layout.NERF
    hashes = {layout.FIT_RECORD: _fit_record_hash(nerf / FIT_FILE)}
    files = [run_dir / layout.TRANSFORMS]
    files += fit_checkpoints(nerf)
    hashes.update({path.relative_to(run_dir).as_posix(): file_sha256(path) for path in files if path.is_file()})
    return hashes


def _fit_record_hash(path: Path) -> str:
    """The hash of the fields of fit.json that shape the loaded field (not its timings)."""
    try:
        record = json.loads(path.read_text())
        shaping = {key: record.get(key) for key in ("method", "settings", "background")}
    except (OSError, ValueError, AttributeError):
        return file_sha256(path) if path.is_file() else "missing"
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _fit_settings(context: StageContext[FieldStageSettings]) -> FitSettings:
    return context.config.fit_for(context.device, context.seed)


def _fit_key(context: StageContext[FieldStageSettings]) -> dict[str, Any]:
    key = _fit_settings(context).key_dict()
    field_name = context.config.field
    if field_name != "nerfacto":  # only named when not the default, so nerfacto runs keep their keys
        key["field"] = field_name
    return key


def _fit_inputs(context: StageContext[FieldStageSettings]) -> dict[str, str]:
    """The views, and for splats the PanoHead depth they start from (`splat.pick_seed_points`)."""
    from ..panohead.stage import DEPTH_FILE

    hashes = view_hashes(context.run_dir)
    depth = context.run_dir / layout.NOISE / DEPTH_FILE
    if FIELD_METHODS[context.config.field].reads_panohead_depth and depth.is_file():
        hashes[f"{layout.NOISE}/{DEPTH_FILE}"] = file_sha256(depth)
    return hashes


FIT_STAGE: Stage[FieldStageSettings] = Stage(
    config="field",
    name="fit",
    folder=layout.NERF,
    description="radiance field fit (nerfstudio)",
    settings=_fit_key,
    inputs=_fit_inputs,
    build=lambda context, folder: build_fit(
        context.run_dir,
        folder,
        _fit_settings(context),
        context.config.field,
        context.device,
        context.progress,
        context.note,
    ),
    needs=("views",),
    version=3,  # 2: registered with nerfstudio as dp360-head (was nerfacto-head); 3: training callbacks run
)

RENDER_STAGE: Stage[FieldStageSettings] = Stage(
    config="field",
    name="render",
    folder=layout.EXPORT,
    description="turntable video",
    settings=lambda context: context.config.turntable.key_dict(),
    inputs=lambda context: field_hashes(context.run_dir),
    build=lambda context, folder: build_render(
        context.run_dir, folder, context.config.turntable, context.device, context.progress
    ),
    needs=("fit",),
    version=2,
    shared_folder=True,
)

EXPORT_STAGE: Stage[FieldStageSettings] = Stage(
    config="field",
    name="export",
    folder=layout.EXPORT,
    description="mesh export",
    settings=lambda context: {
        **context.config.mesh.key_dict(),
        "formats": list(context.config.mesh_formats),
    },
    # a texture baked from the views reads them too
    inputs=lambda context: {
        **field_hashes(context.run_dir),
        **(view_hashes(context.run_dir) if context.config.mesh.texture == "views" else {}),
    },
    build=lambda context, folder: build_export(
        context.run_dir, folder, context.config.mesh, context.config.mesh_formats, context.device
    ),
    needs=("fit",),
    version=4,  # 3: the surface from the views' depth, a UV texture baked from the views; 4: faces outward when open
    shared_folder=True,
)
