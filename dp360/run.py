"""Staged runs: prepare -> noise -> views (back view + 360 views) -> fit -> render -> export.

Every stage is a `dp360.stage.Stage` declared by the package that owns it; `pipeline_stages()`
lists them in order and the runner only loops over that list. A run of views made elsewhere
(`fit_views`, `dp360 fit`) runs `views_run_stages()` instead: the views are imported into
`views/`, then the same fit -> render -> export -> consistency -> report stages. The run
manifest (`run.json`) records for every stage its settings, the hashes of the files it read, a
key derived from both, its outputs, timings and status. A re-run skips a stage whose key is unchanged and whose outputs
are all present (`force=True` redoes it); a stage's folder is built under a temporary name and
swapped in whole, so a failure never leaves it half-written.

A run folder belongs to one run at a time (an exclusive lock, `RunLock`) and to one input, a
portrait or a views folder (a different input is refused unless `force`). Every setting is
checked before anything is read or written.

A run folder is one dp360 can show it made: its run.json carries dp360's own fields (`format`
"dp360-run", `format_version`, `dp360_version`, a `run_id`); a folder whose run.json lacks them,
or whose run.json is damaged, is the user's and is refused whatever the flags. Nothing is written,
removed or locked through a symbolic link (`check_no_links`), and `force` replaces only what the
record lists as dp360's own: other files in a stage's folder are left where they are, and named.
"""

from __future__ import annotations

import datetime as _dt
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

from .checks import check_seed
from .errors import Dp360Error, RunDirectoryError
from .manifest import (
    INPUT_IMAGE,
    LOCK_NAME,
    MANIFEST_NAME,
    RunLock,
    check_no_links,
    read_manifest,
    run_identity,
)
from .recipes import recipe
from .registry import pipeline_stages, views_run_stages
from .stage import RunConfig, Stage, StageContext, Unavailable

if TYPE_CHECKING:
    from .diffusion.stage import ViewModels, ViewSettings
    from .imaging import LoadedImage
    from .nerf.stage import FieldStageSettings
    from .nerf.views_input import ViewsInput
    from .panohead.stage import NoiseModels, NoiseSettings
    from .prepare import PrepareSettings

log = logging.getLogger(__name__)

# --max-pixels: below 1 MP a portrait is too small anyway; above 1 GP the decoded image alone
# needs gigabytes.
MIN_MAX_PIXELS, MAX_MAX_PIXELS = 1_000_000, 1_000_000_000
# The dtypes each device kind can run the networks in (half precision on a CPU is refused: most
# of its kernels are missing or far slower than fp32 there).
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32", "autocast"), "mps": ("fp16", "fp32")}


def dtype_refusal(dtype: str, device: str, shown: str | None = None) -> str | None:
    """The sentence refusing `dtype` on `device` (a device name or kind, called `shown` in it), or
    None when it runs there."""
    from .runtime import AUTOCAST_NEEDS_CUDA

    supported = DEVICE_DTYPES[device.split(":")[0]]
    shown = shown or device
    if dtype in supported:
        return None
    if dtype == "autocast":
        return AUTOCAST_NEEDS_CUDA.format(device=shown)
    return f"--dtype {dtype} is not supported on {shown}; use {' or '.join(supported)}."


# -- the input a run belongs to -------------------------------------------------------------------


def input_record(source: LoadedImage | ViewsInput) -> dict[str, Any]:
    """What run.json keeps (`input`) of the input a run belongs to: a portrait or a views folder."""
    if getattr(source, "kind", None) == "views":
        return source.record()
    return {
        "path": str(source.path),
        "sha256": source.sha256,
        "size": list(source.original_size),
        "notes": source.notes,
    }


def _input_kind(record: dict[str, Any]) -> str:
    return "views" if record.get("kind") == "views" else "portrait"


def _input_name(record: dict[str, Any]) -> str:
    if _input_kind(record) == "views":
        return f"the views folder '{record.get('path', '?')}'"
    return f"the portrait '{Path(str(record.get('path', '?'))).name}'"


def _same_folder(recorded: Any, folder: Path) -> bool:
    try:
        return isinstance(recorded, str) and Path(recorded).resolve() == Path(folder).resolve()
    except (OSError, RuntimeError):
        return False


def other_input(out: Path, previous: dict[str, Any], source: LoadedImage | ViewsInput) -> str | None:
    """The sentence that refuses `source` in `out`, whose run.json (`previous`) records the run of
    another input; None when it records this input's run (or none). A views folder is the same
    input when its path or its content is: its images may change (the stages are then redone)."""
    record = previous.get("input", {})
    if not record.get("sha256"):
        return None
    kind = getattr(source, "kind", "portrait")
    advice = "; choose another --out folder, or pass --force to replace that run."
    if _input_kind(record) != kind:
        this = "a views folder" if kind == "views" else "a portrait"
        return f"'{out}' holds the run of {_input_name(record)}, not of {this}{advice}"
    if kind == "views":
        if record["sha256"] == source.sha256 or _same_folder(record.get("path"), source.path):
            return None
        return f"'{out}' holds the run of another views folder ('{record.get('path', '?')}'){advice}"
    if record["sha256"] != source.sha256:
        return f"'{out}' holds the run of another input ('{Path(str(record.get('path', '?'))).name}'){advice}"
    return None


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


def _recorded_outputs(manifest: dict[str, Any]) -> list[str]:
    """Every file the record lists as a stage's output (relative to the run folder)."""
    return [rel for record in manifest.get("stages", {}).values() for rel in record.get("outputs", {})]


def _all_stage_folders() -> list[str]:
    return sorted({stage.folder for stage in (*pipeline_stages(), *views_run_stages())})


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
        from .atomic import is_dp360_temporary

        return all(child.name == LOCK_NAME or is_dp360_temporary(child.name) for child in self.out_dir.iterdir())

    def check_target(self, source: LoadedImage | ViewsInput) -> None:
        """The refusals of `open`, read-only: run before long work (downloads) that precedes it."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if not out.is_dir():
            return
        self.lock.check_free()
        if not os.path.lexists(self.manifest_path):
            if not self._ours_only():
                raise RunDirectoryError(
                    f"Output folder '{out}' already holds files that are not a dp360 run; choose a new or empty folder."
                )
            return
        previous = read_manifest(self.manifest_path)  # a foreign or damaged one: refused whatever the flags
        self.check_links(previous)
        if self.options.force:
            return
        refusal = other_input(out, previous, source)
        if refusal:
            raise RunDirectoryError(refusal)

    def check_links(self, manifest: dict[str, Any]) -> None:
        """Refuse links (and things of the wrong kind) wherever this run writes, removes or locks:
        the lock, run.json, input.png, every stage's folder and every output the record lists."""
        check_no_links(
            self.out_dir,
            folders=_all_stage_folders(),
            files=(LOCK_NAME, MANIFEST_NAME, INPUT_IMAGE, *_recorded_outputs(manifest)),
        )

    def open(self, source: LoadedImage | ViewsInput, device: str, dtype: str) -> None:
        """Take the folder: lock it, check that it is ours and holds this input's run (a portrait's
        or a views folder's), remove temporaries of dead runs, and load or start the manifest."""
        from .atomic import remove_stale_temporaries
        from .imaging import save_image_atomic
        from .runtime import environment

        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if out.is_dir() and not os.path.lexists(self.manifest_path) and not self._ours_only():
            raise RunDirectoryError(
                f"Output folder '{out}' already holds files that are not a dp360 run; choose a new or empty folder."
            )
        self._existed = out.is_dir()
        out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        # Everything below runs under the lock: no other run changes the folder meanwhile.
        self._started_empty = not os.path.lexists(self.manifest_path) and self._ours_only()
        if self.lock.previous_pid is not None:
            self._note(
                f"took over the lock of an earlier run (pid {self.lock.previous_pid}) that ended without releasing it"
            )
        previous: dict[str, Any] = {}
        if os.path.lexists(self.manifest_path):
            # a foreign or damaged run.json is refused whatever the flags: nothing here is provably ours
            previous = read_manifest(self.manifest_path)
        self.check_links(previous)
        for removed in remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted run", removed)
        if previous:
            refusal = other_input(out, previous, source)
            if refusal:
                if not self.options.force:
                    raise RunDirectoryError(refusal)
                self._discard_stages(previous)
                self._note(f"replaced the run of {_input_name(previous['input'])} in {out} (--force)")
        self.manifest = {
            **run_identity(previous.get("run_id")),
            "created_at": previous.get("created_at", _now()),
            "updated_at": _now(),
            "status": "running",
            "input": input_record(source),
            "environment": environment(device, dtype),
            "seed": self.options.seed,
            "stages": previous.get("stages", {}),
            "notes": list(self.notes),  # this run's notes and warnings
        }
        input_png = out / INPUT_IMAGE
        if getattr(source, "kind", None) == "views":
            input_png.unlink(missing_ok=True)  # a views run has no portrait (one left by a replaced run goes)
        elif previous.get("input", {}).get("sha256") != source.sha256 or not input_png.is_file():
            pixels = source.rgb if source.alpha is None else np.dstack([source.rgb, source.alpha])
            save_image_atomic(input_png, pixels)
        self._save()

    def _discard_stages(self, previous: dict[str, Any]) -> None:
        """Remove the outputs of a replaced run, the files its record lists (so dp360's own), and
        the folders they leave empty; anything else is left where it is and named in a note."""
        from .atomic import remove_empty_folder_inside, remove_file_inside

        folders = set(_all_stage_folders())
        emptied: set[Path] = set()
        for rel in _recorded_outputs(previous):
            if Path(rel).parts[0] not in folders:
                continue
            # through folder descriptors: a link on the way is refused, never followed
            if remove_file_inside(self.out_dir, rel):
                emptied.update(parent for parent in Path(rel).parents if parent != Path("."))
        for folder in sorted(emptied, key=lambda each: len(each.parts), reverse=True):
            remove_empty_folder_inside(self.out_dir, folder)  # only when empty
        self._note_foreign(self._foreign_files(folders, set()))
        previous["stages"] = {}

    def _foreign_files(self, folders: Any, own: set[str]) -> list[str]:
        """The files (and links) inside the stage folders `folders` that `own` does not list and that
        are no temporaries of dp360: the user's, never replaced nor removed."""
        from .atomic import is_dp360_temporary

        found = []
        for folder in sorted(folders):
            root = self.out_dir / folder
            if not root.is_dir() or root.is_symlink():
                continue
            for where, dirs, names in os.walk(root):  # never follows links
                dirs[:] = [name for name in dirs if not is_dp360_temporary(name)]
                for name in names:
                    rel = (Path(where) / name).relative_to(self.out_dir).as_posix()
                    if rel not in own and not is_dp360_temporary(name):
                        found.append(rel)
                found.extend(
                    (Path(where) / name).relative_to(self.out_dir).as_posix()
                    for name in list(dirs)
                    if (Path(where) / name).is_symlink()
                )
        return sorted(found)

    def _note_foreign(self, foreign: list[str]) -> None:
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            self._note(f"left untouched {len(foreign)} file(s) that run.json does not list as dp360's: {shown}")

    def _note(self, message: str, record: bool = True) -> None:
        """Tell the user; with `record`, also keep it in run.json (this run's notes, which the report
        shows; notes made before `open` enter there)."""
        self.notes.append(message)
        if record and self.manifest:
            self.manifest["notes"].append(message)
        self.reporter.note(message)

    def _save(self) -> None:
        from .atomic import write_json_atomic

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
        from .atomic import atomic_directory, atomic_files_into, remove_file_inside

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

        # Replacing the folder as a whole would remove files that are not dp360's: when there are
        # any, write file by file instead, and remove only this stage's own earlier outputs.
        check_no_links(self.out_dir, folders=(stage.folder,))
        earlier = set(record.get("outputs", {})) if isinstance(record.get("outputs"), dict) else set()
        foreign = (
            [] if stage.shared_folder else self._foreign_files((stage.folder,), set(_recorded_outputs(self.manifest)))
        )
        file_by_file = stage.shared_folder or bool(foreign)

        self.reporter.stage_started(stage.name, stage.description)
        self._note_foreign(foreign)
        clock = time.perf_counter()
        record = {"status": "running", "key": key, "settings": settings, "inputs": input_hashes, "started_at": _now()}
        records[stage.name] = record
        self._save()
        target = self.out_dir / stage.folder

        def guard() -> None:  # just before the swap: nothing on the way became a link meanwhile
            check_no_links(self.out_dir, folders=(stage.folder,))

        try:
            with (atomic_files_into if file_by_file else atomic_directory)(target, guard=guard) as staging:
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
        if foreign:  # this stage's own earlier outputs that it did not make again
            for rel in sorted(earlier - set(outputs)):
                remove_file_inside(self.out_dir, rel)
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
                    real_dir = child.is_dir() and not child.is_symlink()
                    shutil.rmtree(child, ignore_errors=True) if real_dir else child.unlink(missing_ok=True)
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
    from .checks import check_int
    from .runtime import resolve_device, resolve_dtype

    check_seed(options.seed)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    refusal = dtype_refusal(dtype, device)
    if refusal:
        raise Dp360Error(refusal)
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
    context = StageContext(
        Path(out_dir),
        image,
        device,
        dtype,
        options.progress,
        config,
        options.seed,
        note=run._note,
        stage_names=tuple(known),
    )
    fetch_weights(selected, context, options, run._note)
    check_stages(selected, context, require)
    for note in image.notes:
        run._note(f"{Path(image_path).name}: {note}")
    return run_stages(run, image, selected, context)


def check_stages(selected: tuple[Stage, ...], context: StageContext, require: tuple[str, ...]) -> None:
    """Before anything is written: a required stage that cannot run is an error, and every
    stage's check may refuse a setting that cannot work with what it finds (camera images)."""
    for stage in selected:
        if stage.name in require:
            stage.resolve(context)
        verdict = stage.check(context)
        if stage.name in require and verdict is not None and verdict.status == "not_available":
            raise Dp360Error(verdict.reason)


def run_stages(
    run: Run, source: LoadedImage | ViewsInput, selected: tuple[Stage, ...], context: StageContext
) -> RunSummary:
    """Take the run folder for `source` and run the stages in order into it: a stage that cannot
    run (missing weights, or an upstream stage that did not) is recorded and the run ends
    `incomplete`. The folder is released however this ends."""
    context.providers = {}
    for stage in selected:
        for name in stage.provides:
            context.providers[name] = (*context.providers.get(name, ()), stage.name)
    failure: BaseException | None = None
    try:
        run.open(source, context.device, context.dtype)
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


def fit_views(
    views_dir: str | Path,
    out_dir: str | Path,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    field_settings: FieldStageSettings | None = None,
) -> RunSummary:
    """A radiance field, turntable, mesh, consistency score and report for views made elsewhere:
    a folder in nerfstudio's layout (transforms.json + images; a run's views/, another method's
    views, a capture). The views are checked before anything is written, then imported into
    `out_dir/views/` and run through the same stages as `reconstruct`'s from the fit on. The run
    folder belongs to that views folder: a rerun reuses what is unchanged (a changed image redoes
    the fit and what follows), another views folder or a portrait's run there is refused unless
    `options.force`."""
    from .nerf.stage import FieldStageSettings
    from .nerf.views_input import read_views

    options = options or RunOptions()
    field_settings = field_settings or FieldStageSettings()
    selected = views_run_stages()
    device, dtype = check_run_settings(options, tuple(stage.name for stage in selected), field=field_settings)
    views = read_views(views_dir, options.max_pixels)
    out = Path(out_dir)
    if views.path == out.resolve() or views.path.is_relative_to(out.resolve()):
        raise RunDirectoryError(
            f"The views folder '{views_dir}' lies inside the run folder '{out}', whose folders a run replaces; "
            "choose another --out folder, or copy the views elsewhere first."
        )
    run = Run(out, options, reporter)
    run.check_target(views)
    config = RunConfig(field=field_settings)
    context = StageContext(
        out,
        None,
        device,
        dtype,
        options.progress,
        config,
        options.seed,
        note=run._note,
        views_input=views,
        stage_names=tuple(stage.name for stage in views_run_stages()),
    )
    fetch_weights(selected, context, options, run._note)
    check_stages(selected, context, require=recipe("fit").require)
    for note in views.notes:
        run._note(f"{views.path.name}: {note}")
    return run_stages(run, views, selected, context)


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
        stages=recipe("reconstruct").stages,
        view_settings=view_settings,
        models=models,
        noise_settings=noise_settings,
        noise_models=noise_models,
        field_settings=field_settings,
        require=recipe("reconstruct").require,
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
        recipe("views").stages,
        view_settings,
        models,
        require=recipe("views").require,
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
    prepare_only = recipe("prepare")
    return run_pipeline(
        image_path,
        out_dir,
        prepare_settings,
        options,
        reporter,
        stages=prepare_only.stages,
        require=prepare_only.require,
    )
