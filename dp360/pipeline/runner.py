"""The generic runner: it takes a run folder and runs a list of stages into it, each stage with
its own config (`RunConfig.of`), and knows no stage by name. The library's entry points
(`dp360.run`: reconstruct, views, prepare, fit_views) choose the stages and build the config.

Every stage is a `dp360.pipeline.stage.Stage` declared by the package that owns it;
`dp360.pipeline.registry` lists them in order. The run
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..checks import check_seed
from ..errors import Dp360Error, RunDirectoryError
from ..manifest import (
    INPUT_IMAGE,
    LOCK_NAME,
    MANIFEST_NAME,
    RunLock,
    check_no_links,
    read_manifest,
    run_identity,
)
from .registry import RunConfig, pipeline_stages, views_run_stages
from .stage import Stage, StageContext, Unavailable

if TYPE_CHECKING:
    from ..imaging import LoadedImage
    from ..nerf.views_input import ViewsInput

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
    from ..runtime import AUTOCAST_NEEDS_CUDA

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
        from ..atomic import is_dp360_temporary

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
        from ..atomic import remove_stale_temporaries
        from ..imaging import save_image_atomic
        from ..runtime import environment

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
        from ..atomic import remove_empty_folder_inside, remove_file_inside

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
        from ..atomic import is_dp360_temporary

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
        from ..atomic import write_json_atomic

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
        from ..atomic import atomic_directory, atomic_files_into, remove_file_inside

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
    options: RunOptions, stages: tuple[Stage, ...], config: RunConfig | None = None
) -> tuple[str, str]:
    """Check the run's options and the config of every stage among `stages`, before anything is
    read or written; returns the resolved (device, dtype). Raises a Dp360Error naming the first
    bad setting."""
    from ..checks import check_int
    from ..runtime import resolve_device, resolve_dtype

    check_seed(options.seed)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    refusal = dtype_refusal(dtype, device)
    if refusal:
        raise Dp360Error(refusal)
    if options.max_pixels is not None:
        check_int("--max-pixels", options.max_pixels, MIN_MAX_PIXELS, MAX_MAX_PIXELS)
    if config is not None:
        config.check(stages, device)
    return device, dtype


def for_stage(context: StageContext, stage: Stage, config: RunConfig) -> StageContext:
    """The context `stage` sees: the run's, with the stage's own config only."""
    return replace(context, config=config.of(stage))


def fetch_weights(
    stages: tuple[Stage, ...], context: StageContext, config: RunConfig, options: RunOptions, note
) -> list[str]:
    """Before any stage: fetch and convert every weight file the stages need from dp360's cache
    (or, with downloads off, stop with one message listing what is missing)."""
    from .. import weights

    needs = [need for stage in stages for need in stage.weights(for_stage(context, stage, config))]
    return weights.ensure(
        needs,
        download=options.download,
        keep_checkpoints=options.keep_checkpoints,
        progress=options.progress,
        note=note,
    )


def check_stages(
    selected: tuple[Stage, ...], context: StageContext, config: RunConfig, require: tuple[str, ...]
) -> None:
    """Before anything is written: a required stage that cannot run is an error, and every
    stage's check may refuse a setting that cannot work with what it finds (camera images)."""
    for stage in selected:
        own = for_stage(context, stage, config)
        if stage.name in require:
            stage.resolve(own)
        verdict = stage.check(own)
        if stage.name in require and verdict is not None and verdict.status == "not_available":
            raise Dp360Error(verdict.reason)


def run_stages(
    run: Run, source: LoadedImage | ViewsInput, selected: tuple[Stage, ...], context: StageContext, config: RunConfig
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
            own = for_stage(context, stage, config)
            if verdict is None:
                stage.resolve(own)
                verdict = stage.check(own)
            if verdict is not None:
                run.mark(stage.name, verdict)
                if verdict.note:
                    run._note(verdict.note)
                if verdict.status == "not_available":
                    missing.append(stage.name)
                continue
            run.stage(stage, own)
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
