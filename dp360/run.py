"""Staged runs: prepare -> noise -> views (back view + 360 views) -> fit -> render -> export.

A stage is a function that fills a folder, given a settings dict and input files. The run
manifest (`run.json`) records for every stage its settings, the hashes of its inputs, a key
derived from both, its outputs, timings and status. A re-run skips a stage whose key is
unchanged and whose outputs are all present (`force=True` redoes it); a stage's folder is
built under a temporary name and swapped in whole, so a failure never leaves it half-written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from . import __version__
from .errors import Dp360Error, RunDirectoryError
from .imaging import LoadedImage, atomic_directory, atomic_files_into, file_sha256, load_portrait, save_image_atomic, write_json_atomic

if TYPE_CHECKING:
    from .nerf.stage import FieldStageSettings
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings
    from .views import ViewModels, ViewSettings

log = logging.getLogger(__name__)

MANIFEST_NAME = "run.json"
MANIFEST_FORMAT = 1
# The full pipeline in order, with the folder each stage owns.
PIPELINE: tuple[tuple[str, str], ...] = (
    ("prepare", "prepared"),
    ("noise", "noise"),
    ("views", "views"),
    ("fit", "nerf"),
    ("render", "export"),
    ("export", "export"),
)
STAGE_DESCRIPTIONS = {
    "prepare": "detect the face, crop like PanoHead, estimate the camera",
    "noise": "PanoHead inversion and 3D-aware noise frames",
    "views": "back view (model F), then the consistent 360-degree views (DiffPortrait360)",
    "fit": "radiance field fit (nerfstudio)",
    "render": "turntable video",
    "export": "mesh export",
}
# Bump a stage's version when its code changes what it writes, so old results are redone.
STAGE_VERSIONS = {"prepare": 1, "noise": 1, "views": 1, "fit": 1, "render": 1, "export": 1}
# Folders that more than one stage writes into: each stage replaces only its own files.
SHARED_FOLDERS = {"export"}


class Reporter(Protocol):
    def stage_started(self, name: str, description: str) -> None: ...

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None: ...

    def note(self, message: str) -> None: ...


class LogReporter:
    """Default reporter for library use: everything goes to the `dp360` logger."""

    def stage_started(self, name: str, description: str) -> None:
        log.info("stage %s: %s", name, description)

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        log.info("stage %s: %s (%.1f s)", name, outcome, seconds)

    def note(self, message: str) -> None:
        log.warning("%s", message)


@dataclass
class RunOptions:
    device: str = "auto"
    dtype: str | None = None
    seed: int = 42
    force: bool = False
    progress: bool = True  # progress bars of long stages


@dataclass
class RunSummary:
    out_dir: Path
    status: str
    stages: dict[str, dict[str, Any]]
    outputs: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "status": self.status,
            "stages": self.stages,
            "outputs": self.outputs,
            "notes": self.notes,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _stage_key(name: str, settings: dict[str, Any], input_hashes: dict[str, str]) -> str:
    payload = json.dumps(
        {"stage": name, "version": STAGE_VERSIONS.get(name, 1), "settings": settings, "inputs": input_hashes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class Run:
    """One output folder and its manifest."""

    def __init__(self, out_dir: str | Path, options: RunOptions, reporter: Reporter | None = None):
        self.out_dir = Path(out_dir)
        self.options = options
        self.reporter = reporter or LogReporter()
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.notes: list[str] = []
        self._existed = False
        self._started_empty = False  # the folder did not exist or was empty before this run
        self._completed_any = False
        self.manifest: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------------------

    def open(self, image: LoadedImage, device: str, dtype: str) -> None:
        """Check the folder, load or start the manifest, and store the normalised input."""
        from .runtime import environment

        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if out.is_dir() and any(out.iterdir()) and not self.manifest_path.is_file():
            raise RunDirectoryError(
                f"Output folder '{out}' already holds files that are not a dp360 run; choose a new or empty folder."
            )
        previous: dict[str, Any] = {}
        if self.manifest_path.is_file():
            try:
                previous = json.loads(self.manifest_path.read_text())
                if not isinstance(previous, dict) or "stages" not in previous:
                    raise ValueError
            except ValueError:
                raise RunDirectoryError(
                    f"'{self.manifest_path}' is not a dp360 run manifest; delete it or choose another --out folder."
                ) from None
        self._existed = out.exists()
        self._started_empty = not self._existed or not any(out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format": MANIFEST_FORMAT,
            "dp360_version": __version__,
            "created_at": previous.get("created_at", _now()),
            "updated_at": _now(),
            "status": "running",
            "input": {
                "path": str(image.path),
                "sha256": image.sha256,
                "size": list(image.original_size),
                "notes": image.notes,
            },
            "environment": environment(device, dtype),
            "seed": self.options.seed,
            "stages": previous.get("stages", {}),
        }
        input_png = out / "input.png"
        if previous.get("input", {}).get("sha256") != image.sha256 or not input_png.is_file():
            pixels = image.rgb if image.alpha is None else np.dstack([image.rgb, image.alpha])
            save_image_atomic(input_png, pixels)
        self._save()

    def _save(self) -> None:
        self.manifest["updated_at"] = _now()
        write_json_atomic(self.manifest_path, self.manifest)

    # -- stages ------------------------------------------------------------------------------

    def stage(
        self,
        name: str,
        folder: str,
        settings: dict[str, Any],
        input_hashes: dict[str, str],
        build: Callable[[Path], dict[str, Any]],
    ) -> dict[str, Any]:
        """Run `build(staging_folder)` unless an identical earlier result is present.

        `build` fills the folder and returns a small summary dict; the folder replaces
        `out_dir/folder` only when `build` returns."""
        key = _stage_key(name, settings, input_hashes)
        record = self.manifest["stages"].get(name, {})
        target = self.out_dir / folder
        if (
            not self.options.force
            and record.get("status") == "done"
            and record.get("key") == key
            and all((self.out_dir / rel).is_file() and (self.out_dir / rel).stat().st_size == size for rel, size in record.get("outputs", {}).items())
        ):
            record["last_run"] = "reused"
            self.manifest["stages"][name] = record
            self._completed_any = True
            self.reporter.stage_finished(name, "reused (inputs and settings unchanged)", 0.0)
            self._save()
            return record

        self.reporter.stage_started(name, STAGE_DESCRIPTIONS.get(name, name))
        started, clock = _now(), time.perf_counter()
        record = {"status": "running", "key": key, "settings": settings, "inputs": input_hashes, "started_at": started}
        self.manifest["stages"][name] = record
        self._save()
        try:
            with (atomic_files_into(target) if folder in SHARED_FOLDERS else atomic_directory(target)) as staging:
                summary = build(staging)
                outputs = {
                    str((Path(folder) / path.relative_to(staging)).as_posix()): path.stat().st_size
                    for path in sorted(staging.rglob("*"))
                    if path.is_file()
                }
        except BaseException as error:
            record.update(
                status="failed",
                finished_at=_now(),
                seconds=round(time.perf_counter() - clock, 3),
                error=str(error) if isinstance(error, Dp360Error) else f"{type(error).__name__}: {error}",
            )
            self.manifest["status"] = "failed"
            self._save()
            self.reporter.stage_finished(name, "failed", time.perf_counter() - clock)
            raise
        seconds = time.perf_counter() - clock
        record.update(
            status="done",
            last_run="ran",
            finished_at=_now(),
            seconds=round(seconds, 3),
            outputs=outputs,
            summary=summary,
        )
        self._completed_any = True
        self._save()
        self.reporter.stage_finished(name, "done", seconds)
        return record

    def mark_unavailable(self, name: str, reason: str | None = None) -> None:
        self.manifest["stages"][name] = {
            "status": "not_available",
            "reason": reason or f"the '{name}' stage ({STAGE_DESCRIPTIONS[name]}) is not part of dp360 {__version__} yet",
        }
        self._save()

    def mark_skipped(self, name: str, reason: str) -> None:
        self.manifest["stages"][name] = {"status": "skipped", "reason": reason}
        self._save()

    def finish(self, status: str) -> None:
        self.manifest["status"] = status
        self._save()

    def abandon(self) -> None:
        """After a failure: if the folder was new or empty and no stage finished, leave it as it
        was (gone, or empty) rather than holding a manifest of nothing."""
        if not self._started_empty or self._completed_any or not self.out_dir.is_dir():
            return
        for child in self.out_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if not self._existed:
            self.out_dir.rmdir()

    def summary(self) -> RunSummary:
        stages = {
            name: {k: v for k, v in record.items() if k in ("status", "last_run", "seconds", "reason", "error")}
            for name, record in self.manifest["stages"].items()
        }
        outputs: dict[str, str] = {}
        for record in self.manifest["stages"].values():
            for rel in record.get("outputs", {}) if record.get("status") == "done" else {}:
                outputs[rel] = str(self.out_dir / rel)
        return RunSummary(self.out_dir, self.manifest.get("status", "unknown"), stages, outputs, list(self.notes))


def _note(run: Run, message: str) -> None:
    run.notes.append(message)
    run.reporter.note(message)


def run_pipeline(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: "PrepareSettings | None" = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    stages: tuple[str, ...] = ("prepare",),
    view_settings: "ViewSettings | None" = None,
    models: "ViewModels | None" = None,
    require: tuple[str, ...] = ("prepare",),
    noise_settings: "NoiseSettings | None" = None,
    noise_models: "NoiseModels | None" = None,
    field_settings: "FieldStageSettings | None" = None,
) -> RunSummary:
    """Run the named stages on one portrait into `out_dir`; stages this version does not have
    are recorded as `not_available` and the run ends `incomplete`; a stage in `require` that
    cannot run is an error instead."""
    from .nerf.stage import FieldStageSettings, build_export, build_fit, build_render
    from .panohead.stage import NoiseModels, NoiseSettings
    from .panohead.store import panohead_problem
    from .prepare import PrepareSettings, prepare_portrait
    from .runtime import resolve_device, resolve_dtype
    from .views import ViewModels, ViewSettings

    options = options or RunOptions()
    prepare_settings = prepare_settings or PrepareSettings()
    unknown = [name for name in stages if name not in dict(PIPELINE)]
    if unknown:
        raise Dp360Error(f"Unknown stage(s) {', '.join(unknown)}; stages are {', '.join(dict(PIPELINE))}.")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    view_settings = view_settings or ViewSettings(seed=options.seed)
    noise_settings = noise_settings or NoiseSettings(seed=options.seed)
    noise_settings.views = view_settings.views
    noise_models = noise_models or NoiseModels.locate()
    field_settings = field_settings or FieldStageSettings()
    field_settings.check()
    # Validate the input before anything touches the disk.
    image = load_portrait(image_path)
    if "views" in stages:
        models = models or ViewModels.default(view_settings.views)
        if not Path(models.camera_dir).is_dir() and panohead_problem(noise_models.generator_dir) is None:
            # No official camera images for this view count: render PanoHead's canonical head.
            models.camera_dir = noise_models.camera_images(view_settings.views, device)
        problem = models.problem() if "views" in require else None
        if problem:
            raise Dp360Error(problem)
    run = Run(out_dir, options, reporter)
    for note in image.notes:
        _note(run, f"{Path(image_path).name}: {note}")
    try:
        run.open(image, device, dtype)

        def build_prepare(folder: Path) -> dict[str, Any]:
            result = prepare_portrait(image, folder, prepare_settings, device=device)
            for note in result.notes:
                _note(run, note)
            return {"detector": result.detector, "face_count": result.face_count, "pose": result.pose.as_dict()}

        missing = []
        for name in stages:
            if name == "prepare":
                run.stage(
                    "prepare", "prepared", prepare_settings.key_dict(), {"input": image.sha256}, build_prepare
                )
            elif name == "noise":
                if not view_settings.use_3d_noise:
                    run.mark_skipped("noise", "turned off with --no-3d-noise: views start from Gaussian noise")
                    continue
                problem = noise_models.problem()
                if problem:
                    run.mark_unavailable("noise", problem)
                    _note(run, f"no 3D-aware noise, so the views will follow the cameras less well: {problem}")
                    missing.append("noise")
                    continue
                prepared = run.out_dir / "prepared"
                run.stage(
                    "noise", "noise", noise_settings.key_dict(),
                    {"crop": file_sha256(prepared / "crop.png"), "dataset": file_sha256(prepared / "dataset.json"), **noise_models.hashes()},
                    lambda folder: noise_models.build(prepared, folder, noise_settings, device, progress=run.options.progress),
                )
            elif name == "views":
                problem = models.problem()
                if problem:
                    run.mark_unavailable("views", problem)
                    missing.append("views")
                    continue
                frames = run.out_dir / "noise" / "frames"
                noise_done = run.manifest["stages"].get("noise", {}).get("status") == "done" and view_settings.use_3d_noise
                models.noise_dir = frames if noise_done else None
                noise_hashes = {f"noise/{path.name}": file_sha256(path) for path in sorted(frames.glob("*.png"))} if noise_done else {}
                run.stage("views", "views", {**view_settings.key_dict(), "dtype": dtype}, {"crop": file_sha256(run.out_dir / "prepared" / "crop.png"), **models.hashes(), **noise_hashes}, lambda folder: models.build_views(run.out_dir, folder, view_settings, device, dtype))
            elif name in ("fit", "render", "export"):
                views_dir = run.out_dir / "views"
                upstream = {"fit": "views", "render": "fit", "export": "fit"}[name]
                if run.manifest["stages"].get(upstream, {}).get("status") != "done":
                    run.mark_unavailable(name, f"the '{upstream}' stage has not produced its results")
                    missing.append(name)
                    continue
                progress = run.options.progress
                if name == "fit":
                    fit_settings = field_settings.fit_for(device)
                    view_hashes = {f"views/{path.name}": file_sha256(path) for path in sorted(views_dir.iterdir()) if path.suffix in (".png", ".json") and path.name != "grid.png"}
                    run.stage("fit", "nerf", fit_settings.key_dict(), view_hashes, lambda folder: build_fit(views_dir, folder, run.out_dir / "nerf", fit_settings, device, progress))
                else:
                    checkpoint = {"nerf": run.manifest["stages"]["fit"]["key"]}
                    if name == "render":
                        run.stage("render", "export", field_settings.turntable.key_dict(), checkpoint, lambda folder: build_render(run.out_dir, folder, field_settings.turntable, device, progress))
                    else:
                        mesh_key = {**field_settings.mesh.key_dict(), "formats": list(field_settings.mesh_formats)}
                        run.stage("export", "export", mesh_key, checkpoint, lambda folder: build_export(run.out_dir, folder, field_settings.mesh, field_settings.mesh_formats, device))
            else:
                run.mark_unavailable(name)
                missing.append(name)
        if missing:
            _note(run, f"not run: {', '.join(missing)} (see run.json for why)")
        run.finish("incomplete" if missing else "done")
    except BaseException:
        run.abandon()
        raise
    return run.summary()


def reconstruct(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: "PrepareSettings | None" = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: "ViewSettings | None" = None,
    models: "ViewModels | None" = None,
    noise_settings: "NoiseSettings | None" = None,
    noise_models: "NoiseModels | None" = None,
    field_settings: "FieldStageSettings | None" = None,
) -> RunSummary:
    """The whole pipeline on one portrait: prepare -> noise -> views -> fit -> render -> export."""
    return run_pipeline(image_path, out_dir, prepare_settings, options, reporter, stages=tuple(dict(PIPELINE)), view_settings=view_settings, models=models, noise_settings=noise_settings, noise_models=noise_models, field_settings=field_settings)


def views(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: "PrepareSettings | None" = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: "ViewSettings | None" = None,
    models: "ViewModels | None" = None,
    noise_settings: "NoiseSettings | None" = None,
    noise_models: "NoiseModels | None" = None,
) -> RunSummary:
    """Prepare, PanoHead inversion (3D-aware noise, unless turned off), then the back view and
    the 360-degree views into `out_dir/views/`."""
    return run_pipeline(image_path, out_dir, prepare_settings, options, reporter, ("prepare", "noise", "views"), view_settings, models, require=("prepare", "views"), noise_settings=noise_settings, noise_models=noise_models)


def prepare(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: "PrepareSettings | None" = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
) -> RunSummary:
    """Only the prepare stage: `out_dir/prepared/{crop.png, dataset.json, overlay.png, face.json}`."""
    return run_pipeline(image_path, out_dir, prepare_settings, options, reporter, stages=("prepare",))
