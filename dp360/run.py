"""Staged runs: prepare -> noise -> views (back view + 360 views) -> fit -> render -> export.

Every stage is a `dp360.stage.Stage` declared by the package that owns it; `pipeline_stages()`
lists them in order and the runner only loops over that list. The run manifest (`run.json`)
records for every stage its settings, the hashes of the files it read, a key derived from both,
its outputs, timings and status. A re-run skips a stage whose key is unchanged and whose outputs
are all present (`force=True` redoes it); a stage's folder is built under a temporary name and
swapped in whole, so a failure never leaves it half-written.

A run folder belongs to one run at a time (an exclusive lock, `RunLock`) and to one input (a
different input is refused unless `force`). Every setting is checked before anything is read or
written.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import __version__
from .errors import Dp360Error, RunDirectoryError
from .stage import RunConfig, Stage, StageContext, Unavailable, check_seed

if TYPE_CHECKING:
    from .diffusion.stage import ViewModels, ViewSettings
    from .imaging import LoadedImage
    from .nerf.stage import FieldStageSettings
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings

log = logging.getLogger(__name__)

MANIFEST_NAME = "run.json"
MANIFEST_FORMAT = 1
LOCK_NAME = ".dp360.lock"
# --max-pixels: below 1 MP a portrait is too small anyway; above 1 GP the decoded image alone
# needs gigabytes.
MIN_MAX_PIXELS, MAX_MAX_PIXELS = 1_000_000, 1_000_000_000
# The dtypes each device kind can run the networks in (half precision on a CPU is refused: most
# of its kernels are missing or far slower than fp32 there).
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32"), "mps": ("fp16", "fp32")}


def pipeline_stages() -> tuple[Stage, ...]:
    """The stages of the full pipeline, in order."""
    from .diffusion.stage import VIEWS_STAGE
    from .eval.consistency import CONSISTENCY_STAGE
    from .nerf.stage import EXPORT_STAGE, FIT_STAGE, RENDER_STAGE
    from .panohead.stage import NOISE_STAGE
    from .prepare.stage import PREPARE_STAGE
    from .report import REPORT_STAGE

    return (
        PREPARE_STAGE,
        NOISE_STAGE,
        VIEWS_STAGE,
        FIT_STAGE,
        RENDER_STAGE,
        EXPORT_STAGE,
        CONSISTENCY_STAGE,
        REPORT_STAGE,
    )


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
    force: bool = False  # redo stages even when unchanged; replace a run of another input
    progress: bool = True  # progress bars of long stages
    max_pixels: int | None = None  # input images above this are refused (None: imaging's default)
    download: bool = True  # fetch missing weight files before the stages (off: list them and stop)
    keep_checkpoints: bool = False  # keep raw downloaded checkpoints after their conversion


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


def _stage_key(stage: Stage, settings: dict[str, Any], input_hashes: dict[str, str]) -> str:
    payload = json.dumps(
        {"stage": stage.name, "version": stage.version, "settings": settings, "inputs": input_hashes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# -- the lock ------------------------------------------------------------------------------------


class RunLock:
    """An exclusive `flock` on `<run>/.dp360.lock`, held for the whole run.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a dead
    run is simply taken over (its pid, written into the file, is reported). Hand-written rather
    than `filelock` because the file must be checked to be the one still linked in the folder
    (a failing first run removes it) and must carry the holder's pid for the refusal message."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.previous_pid: int | None = None  # the pid of a dead run whose lock was taken over

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._taken(holder) from None
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder before us removed the file: lock the one now in its place
        previous = os.read(fd, 64).decode(errors="replace").strip()
        self.previous_pid = int(previous) if previous.isdigit() and int(previous) != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _taken(self, holder: str) -> RunDirectoryError:
        return RunDirectoryError(
            f"Another dp360 run (pid {holder}) is writing to '{self.path.parent}'; wait for it to finish "
            "or choose another --out folder."
        )

    def check_free(self) -> None:
        """Refuse, as `acquire` would, when a live run holds the lock; takes nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._taken(os.read(fd, 64).decode(errors="replace").strip() or "?") from None
            raise
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# -- the manifest --------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """A run.json of the expected shape, or a RunDirectoryError that says how to recover."""
    damaged = RunDirectoryError(
        f"'{path}' is damaged or is not a dp360 run manifest; pass --force to start this run over, "
        "or choose another --out folder."
    )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise damaged from None
    except OSError as error:
        raise RunDirectoryError(f"'{path}' cannot be read ({error.strerror}); check its permissions.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise damaged
    if not isinstance(manifest.get("input", {}), dict):
        raise damaged
    notes = manifest.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise damaged
    for record in manifest["stages"].values():
        if not isinstance(record, dict) or not isinstance(record.get("outputs", {}), dict):
            raise damaged
        if not all(isinstance(size, int) for size in record.get("outputs", {}).values()):
            raise damaged
    return manifest


class Run:
    """One output folder: its lock, its manifest, and the stages run into it."""

    def __init__(self, out_dir: str | Path, options: RunOptions, reporter: Reporter | None = None):
        self.out_dir = Path(out_dir)
        self.options = options
        self.reporter = reporter or LogReporter()
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.notes: list[str] = []
        self.lock = RunLock(self.out_dir)
        self._existed = False
        self._started_empty = False  # the folder was new or empty when this run took it
        self._completed_any = False
        self.manifest: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------------------

    def _ours_only(self) -> bool:
        """The folder holds nothing but a lock and temporaries of dp360 (an earlier run killed
        before it wrote its manifest)."""
        from .imaging import is_dp360_temporary

        return all(child.name == LOCK_NAME or is_dp360_temporary(child.name) for child in self.out_dir.iterdir())

    def check_target(self, image: LoadedImage) -> None:
        """The refusals of `open`, read-only: run before long work (downloads) that precedes it."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if not out.is_dir():
            return
        self.lock.check_free()
        if not self.manifest_path.is_file():
            if not self._ours_only():
                raise RunDirectoryError(
                    f"Output folder '{out}' already holds files that are not a dp360 run; choose a new or empty folder."
                )
            return
        if self.options.force:
            return
        previous = read_manifest(self.manifest_path)
        before = previous.get("input", {}).get("sha256")
        if before and before != image.sha256:
            name = Path(str(previous["input"].get("path", "?"))).name
            raise RunDirectoryError(
                f"'{out}' holds the run of another input ('{name}'); choose another --out folder, "
                "or pass --force to replace that run."
            )

    def open(self, image: LoadedImage, device: str, dtype: str) -> None:
        """Take the folder: lock it, check that it is ours and holds this input's run, remove
        temporaries of dead runs, and load or start the manifest."""
        from .imaging import remove_stale_temporaries, save_image_atomic
        from .runtime import environment

        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if out.is_dir() and not self.manifest_path.is_file() and not self._ours_only():
            raise RunDirectoryError(
                f"Output folder '{out}' already holds files that are not a dp360 run; choose a new or empty folder."
            )
        self._existed = out.is_dir()
        out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        # Everything below runs under the lock: no other run changes the folder meanwhile.
        self._started_empty = not self.manifest_path.is_file() and self._ours_only()
        if self.lock.previous_pid is not None:
            self._note(
                f"took over the lock of an earlier run (pid {self.lock.previous_pid}) that ended without releasing it"
            )
        for removed in remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted run", removed)
        previous: dict[str, Any] = {}
        if self.manifest_path.is_file():
            try:
                previous = read_manifest(self.manifest_path)
            except RunDirectoryError:
                if not self.options.force:
                    raise
                self._note(f"{self.manifest_path} was damaged; starting the run over (--force)")
                previous = {"stages": {}}
            before = previous.get("input", {}).get("sha256")
            if before and before != image.sha256:
                name = Path(str(previous["input"].get("path", "?"))).name
                if not self.options.force:
                    raise RunDirectoryError(
                        f"'{out}' holds the run of another input ('{name}'); choose another --out folder, "
                        "or pass --force to replace that run."
                    )
                self._discard_stages(previous)
                self._note(f"replaced the run of '{name}' in {out} (--force)")
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
            "notes": list(self.notes),  # this run's notes and warnings
        }
        input_png = out / "input.png"
        if previous.get("input", {}).get("sha256") != image.sha256 or not input_png.is_file():
            pixels = image.rgb if image.alpha is None else np.dstack([image.rgb, image.alpha])
            save_image_atomic(input_png, pixels)
        self._save()

    def _discard_stages(self, previous: dict[str, Any]) -> None:
        """Remove the folders of the stages of a replaced run (recorded in its manifest, so ours)."""
        folders = {stage.folder for stage in pipeline_stages()}
        for folder in folders:
            path = self.out_dir / folder
            if path.is_dir():
                shutil.rmtree(path)
        previous["stages"] = {}

    def _note(self, message: str, record: bool = True) -> None:
        """Tell the user; with `record`, also keep it in run.json (this run's notes, which the report
        shows; notes made before `open` enter there)."""
        self.notes.append(message)
        if record and self.manifest:
            self.manifest["notes"].append(message)
        self.reporter.note(message)

    def _save(self) -> None:
        from .imaging import write_json_atomic

        self.manifest["updated_at"] = _now()
        write_json_atomic(self.manifest_path, self.manifest)

    def _save_quietly(self) -> None:
        """Record a failure even when the disk is what failed (the original error is reported)."""
        try:
            self._save()
        except OSError:
            log.warning("could not update %s", self.manifest_path)

    # -- stages ------------------------------------------------------------------------------

    def _outputs_present(self, record: dict[str, Any]) -> bool:
        return all(
            (self.out_dir / rel).is_file() and (self.out_dir / rel).stat().st_size == size
            for rel, size in record.get("outputs", {}).items()
        )

    def stage(self, stage: Stage, context: StageContext) -> dict[str, Any]:
        """Run `stage` unless an identical earlier result is present."""
        from .imaging import atomic_directory, atomic_files_into

        settings, input_hashes = stage.settings(context), stage.inputs(context)
        key = _stage_key(stage, settings, input_hashes)
        records = self.manifest["stages"]
        record = records.get(stage.name, {})
        if (
            not self.options.force
            and record.get("status") == "done"
            and record.get("key") == key
            and self._outputs_present(record)
        ):
            record["last_run"] = "reused"
            self._completed_any = True
            self.reporter.stage_finished(stage.name, "reused (inputs and settings unchanged)", 0.0)
            self._save()
            return record

        self.reporter.stage_started(stage.name, stage.description)
        clock = time.perf_counter()
        record = {"status": "running", "key": key, "settings": settings, "inputs": input_hashes, "started_at": _now()}
        records[stage.name] = record
        self._save()
        target = self.out_dir / stage.folder
        try:
            with (atomic_files_into if stage.shared_folder else atomic_directory)(target) as staging:
                summary = stage.build(context, staging)
                outputs = {
                    (Path(stage.folder) / path.relative_to(staging)).as_posix(): path.stat().st_size
                    for path in sorted(staging.rglob("*"))
                    if path.is_file()
                }
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt)
            record.update(
                status="interrupted" if interrupted else "failed",
                finished_at=_now(),
                seconds=round(time.perf_counter() - clock, 3),
                error=_describe(error),
            )
            self.manifest["status"] = "interrupted" if interrupted else "failed"
            self._save_quietly()
            self.reporter.stage_finished(stage.name, "failed", time.perf_counter() - clock)
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
        self.reporter.stage_finished(stage.name, "done", seconds)
        return record

    def mark(self, name: str, verdict: Unavailable) -> None:
        self.manifest["stages"][name] = {"status": verdict.status, "reason": verdict.reason}
        self._save()

    def finish(self, status: str) -> None:
        self.manifest["status"] = status
        self._save()

    def close(self, failed: BaseException | None = None) -> None:
        """Release the folder. After a failure in a folder that was new or empty, where no stage
        finished, leave it as it was (gone, or empty) rather than holding a manifest of nothing:
        under the lock, everything in it is this run's."""
        if not self.lock.held:
            return
        if failed is not None and self._started_empty and not self._completed_any:
            for child in self.out_dir.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            self.lock.release(remove=True)
            if not self._existed:
                try:
                    self.out_dir.rmdir()
                except OSError:
                    pass  # another run has just taken the folder
            return
        if failed is not None and self.manifest.get("status") == "running":
            self.manifest["status"] = "interrupted" if isinstance(failed, KeyboardInterrupt) else "failed"
            self._save_quietly()
        self.lock.release()

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


def _describe(error: BaseException) -> str:
    if isinstance(error, Dp360Error):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


# -- validation ------------------------------------------------------------------------------------


def check_run_settings(
    options: RunOptions,
    stages: tuple[str, ...],
    prepare: PrepareSettings | None = None,
    views: ViewSettings | None = None,
    noise: NoiseSettings | None = None,
    field: FieldStageSettings | None = None,
) -> tuple[str, str]:
    """Check every setting the named stages use, before anything is read or written; returns
    the resolved (device, dtype). Raises a Dp360Error naming the first bad setting."""
    from .runtime import resolve_device, resolve_dtype
    from .stage import check_int

    check_seed(options.seed)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    supported = DEVICE_DTYPES[device.split(":")[0]]
    if dtype not in supported:
        raise Dp360Error(f"--dtype {dtype} is not supported on {device}; use {' or '.join(supported)}.")
    if options.max_pixels is not None:
        check_int("--max-pixels", options.max_pixels, MIN_MAX_PIXELS, MAX_MAX_PIXELS)
    for settings, used_by in ((prepare, {"prepare"}), (views, {"noise", "views"}), (noise, {"noise"})):
        if settings is not None and used_by & set(stages):
            settings.check()
    if field is not None and {"fit", "render", "export"} & set(stages):
        field.check(device)
    return device, dtype


def fetch_weights(stages: tuple[Stage, ...], context: StageContext, options: RunOptions, note) -> list[str]:
    """Before any stage: fetch and convert every weight file the stages need from dp360's cache
    (or, with downloads off, stop with one message listing what is missing)."""
    from . import weights

    needs = [need for stage in stages for need in stage.weights(context)]
    return weights.ensure(
        needs,
        download=options.download,
        keep_checkpoints=options.keep_checkpoints,
        progress=options.progress,
        note=note,
    )


def run_pipeline(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    stages: tuple[str, ...] = ("prepare",),
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    require: tuple[str, ...] = ("prepare",),
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
    field_settings: FieldStageSettings | None = None,
) -> RunSummary:
    """Run the named stages on one portrait into `out_dir`. A stage that cannot run (missing
    weights, or an upstream stage that did not) is recorded and the run ends `incomplete`; a
    stage in `require` that cannot run is an error before anything is written."""
    from .diffusion.stage import ViewModels, ViewSettings
    from .imaging import load_portrait
    from .nerf.stage import FieldStageSettings
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings

    options = options or RunOptions()
    known = {stage.name: stage for stage in pipeline_stages()}
    unknown = [name for name in stages if name not in known]
    if unknown:
        raise Dp360Error(f"Unknown stage(s) {', '.join(unknown)}; stages are {', '.join(known)}.")
    selected = tuple(stage for stage in known.values() if stage.name in stages)
    view_settings = view_settings or ViewSettings(seed=options.seed)
    noise_settings = noise_settings or NoiseSettings(seed=options.seed)
    noise_settings.views = view_settings.views
    config = RunConfig(
        prepare=prepare_settings or PrepareSettings(),
        noise=noise_settings,
        views=view_settings,
        field=field_settings or FieldStageSettings(),
        view_models=models or ViewModels.default(view_settings.views),
        noise_models=noise_models or NoiseModels.locate(),
    )
    device, dtype = check_run_settings(options, stages, config.prepare, config.views, config.noise, config.field)
    image = load_portrait(image_path, **({"max_pixels": options.max_pixels} if options.max_pixels else {}))
    run = Run(out_dir, options, reporter)
    run.check_target(image)
    if "views" in stages:  # a setting check, before the downloads
        config.view_models.check_options(device)
    context = StageContext(Path(out_dir), image, device, dtype, options.progress, config, options.seed, note=run._note)
    fetch_weights(selected, context, options, run._note)
    # Before anything is written: a required stage that cannot run is an error, and every
    # stage's check may refuse a setting that cannot work with what it finds (camera images).
    for stage in selected:
        if stage.name in require:
            stage.resolve(context)
        verdict = stage.check(context)
        if stage.name in require and verdict is not None and verdict.status == "not_available":
            raise Dp360Error(verdict.reason)
    for note in image.notes:
        run._note(f"{Path(image_path).name}: {note}")
    failure: BaseException | None = None
    try:
        run.open(image, device, dtype)
        context.records = run.manifest["stages"]
        missing = []
        for stage in selected:
            blocked = next((name for name in stage.needs if not context.done(name)), None)
            verdict = (
                Unavailable("not_available", f"the '{blocked}' stage has not produced its results") if blocked else None
            )
            if verdict is None:
                stage.resolve(context)
                verdict = stage.check(context)
            if verdict is not None:
                run.mark(stage.name, verdict)
                if verdict.note:
                    run._note(verdict.note)
                if verdict.status == "not_available":
                    missing.append(stage.name)
                continue
            run.stage(stage, context)
        if missing:
            # a summary for the console: run.json has each stage's reason already
            run._note(f"not run: {', '.join(missing)} (see run.json for why)", record=False)
        run.finish("incomplete" if missing else "done")
    except BaseException as error:
        failure = error
        raise
    finally:
        run.close(failure)
    return run.summary()


def reconstruct(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
    field_settings: FieldStageSettings | None = None,
) -> RunSummary:
    """The whole pipeline on one portrait: prepare -> noise -> views -> fit -> render -> export."""
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        stages=tuple(stage.name for stage in pipeline_stages()),
        view_settings=view_settings,
        models=models,
        noise_settings=noise_settings,
        noise_models=noise_models,
        field_settings=field_settings,
    )


def views(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    view_settings: ViewSettings | None = None,
    models: ViewModels | None = None,
    noise_settings: NoiseSettings | None = None,
    noise_models: NoiseModels | None = None,
) -> RunSummary:
    """Prepare, PanoHead inversion (3D-aware noise, unless turned off), then the back view and
    the 360-degree views into `out_dir/views/`."""
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        ("prepare", "noise", "views"),
        view_settings,
        models,
        require=("prepare", "views"),
        noise_settings=noise_settings,
        noise_models=noise_models,
    )


def prepare(
    image_path: str | Path,
    out_dir: str | Path,
    prepare_settings: PrepareSettings | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
) -> RunSummary:
    """Only the prepare stage: `out_dir/prepared/{crop.png, dataset.json, overlay.png, face.json}`."""
    return run_pipeline(image_path, out_dir, prepare_settings, options, reporter, stages=("prepare",))
