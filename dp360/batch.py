"""Many portraits at once, on Ray: `run_batch` spreads the portraits of a batch over workers.

A worker is a Ray actor (`PortraitWorker`) holding one GPU (or CPU cores when there is no GPU).
It keeps its models loaded (a `ModelCache` that keeps them, passed to every run) and runs one
portrait after another through `dp360.run.run_pipeline`, the same staged run as `dp360
reconstruct`, each into its own run folder. The batch folder is dp360's own:

    DIR/batch.json    marks the folder as a batch and names each input's run folder
    DIR/batch.jsonl   one line per portrait as it ends (input, status, seconds per stage, error)
    DIR/<name>/       one run folder per portrait (run.json, prepared/, views/, ...)

A re-run of the same batch sends every portrait again: each run reuses the stages it finished,
so a finished portrait costs a few file hashes and a partial one resumes. A bad input (a
`Dp360Error`) is recorded and not retried; any other failure, and a worker that dies (killed, out
of memory), is retried up to `retries` more times: Ray restarts the dead actor (`max_restarts`)
and its portrait goes back to the queue.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import glob
import hashlib
import json
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import Dp360Error, RunDirectoryError
from .manifest import MANIFEST_NAME, RunLock
from .pipeline.recipes import recipe
from .pipeline.runner import dtype_refusal
from .run import RunOptions

if TYPE_CHECKING:
    from .diffusion.stage import ViewModels, ViewSettings
    from .nerf.stage import FieldStageSettings
    from .panohead.stage import NoiseModels, NoiseSettings
    from .pipeline.registry import RunConfig
    from .prepare import PrepareSettings

log = logging.getLogger(__name__)

BATCH_MANIFEST = "batch.json"
BATCH_LOG = "batch.jsonl"
BATCH_FORMAT = 1
BATCH_KIND = "dp360 batch"  # batch.json's "kind": only dp360 writes it
MAX_BATCH_MANIFEST_BYTES = 64 << 20  # 64 MiB: names of about a million portraits
LIST_SUFFIXES = (".txt", ".csv")
# A CSV list names its images in the first of these columns (else in its first column).
CSV_PATH_COLUMNS = ("path", "image", "input", "file", "filename")
# The environment the workers get from the driver: where weights are cached and whether they may be
# downloaded (a local cluster inherits it anyway; workers of a joined cluster would not).
FORWARDED_PREFIXES = ("DP360_", "HF_")
FORWARDED_VARIABLES = ("XDG_CACHE_HOME", "TORCH_HOME")
WORKER_START_SECONDS = 600.0  # a (re)started worker answers within this, or it is given up
CONNECT_SECONDS = 10.0  # a cluster's address answers within this, or it is refused
POLL_SECONDS = 0.5  # how often the progress is refreshed while portraits run
MAX_RETRIES = 100
STATUSES = ("done", "incomplete", "failed", "interrupted")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- inputs -----------------------------------------------------------------------------------------


def image_suffixes() -> frozenset[str]:
    """The file suffixes Pillow can open: what a folder of portraits is searched for."""
    from PIL import Image

    return frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _read_list(path: Path) -> list[Path]:
    """The images a .txt list (one path a line, # comments) or a .csv list names; relative paths
    are relative to the list's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise Dp360Error(
            f"The list '{path}' cannot be read ({reason}); pass a text or CSV file of image paths."
        ) from None
    if path.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = next((header.index(name) for name in CSV_PATH_COLUMNS if name in header), None)
        entries = (
            [row[column] for row in rows[1:] if len(row) > column] if column is not None else [row[0] for row in rows]
        )
    else:
        entries = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [path.parent / Path(entry.strip()).expanduser() for entry in entries if entry.strip()]


def collect_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """The portraits named by `items`: image files, folders (their images, not recursively),
    glob patterns (`**` recurses) and .txt / .csv lists; absolute, each once, in the order given.
    A missing path or a pattern that matches nothing is refused; a file a list names is kept even
    if it is missing or broken (its portrait then fails with the reason, and the others run)."""
    suffixes = image_suffixes()
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found.extend(
                sorted(
                    child
                    for child in path.iterdir()
                    if child.is_file() and child.suffix.lower() in suffixes and not child.name.startswith(".")
                )
            )
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found.extend(_read_list(path))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [match for match in matches if match.is_file()]
            if not matches:
                raise Dp360Error(
                    f"The pattern '{text}' matches no file; check the pattern, or pass the files or their folder."
                )
            found.extend(matches)
        else:
            raise Dp360Error(f"'{text}' does not exist; pass image files, folders, glob patterns or .txt/.csv lists.")
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(str(path.absolute()), path.absolute())
    if not unique:
        raise Dp360Error("No portraits found in the given inputs; pass image files, folders, patterns or lists.")
    return list(unique.values())


def run_names(inputs: list[Path], previous: dict[str, str] | None = None) -> dict[str, str]:
    """Each input's run folder name: its stem; stems that several inputs share get a short hash
    of the input's path (the same every time); names given by an earlier run of the batch stay."""
    previous = previous or {}
    names = dict(previous)
    taken = set(names.values())
    new = [path for path in inputs if str(path) not in names]
    stems = [path.stem for path in new]
    for path in new:
        name = path.stem
        if stems.count(name) > 1 or name in taken or not name or name.startswith("."):
            name = f"{path.stem or 'portrait'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        names[str(path)] = name
        taken.add(name)
    return {str(path): names[str(path)] for path in inputs}


# -- the batch folder ----------------------------------------------------------------------------


class BatchFolder:
    """`DIR`: its lock, `batch.json` (input -> run folder name) and `batch.jsonl` (one line per
    ended portrait). A folder that holds anything but a batch is refused."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir).absolute()
        self.manifest_path = self.out_dir / BATCH_MANIFEST
        self.log_path = self.out_dir / BATCH_LOG
        self.lock = RunLock(self.out_dir)
        self.manifest: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        damaged = RunDirectoryError(
            f"'{self.manifest_path}' is damaged or is not a dp360 batch file; choose another --out folder "
            "(the run folders in it can be kept: move them there)."
        )
        from .safety import read_plain_file

        try:
            # never through a link, nor a FIFO or a device planted in its place, and bounded
            manifest = json.loads(read_plain_file(self.manifest_path, MAX_BATCH_MANIFEST_BYTES))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise damaged from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise damaged from None
            raise RunDirectoryError(
                f"'{self.manifest_path}' cannot be read ({error.strerror}); check its permissions."
            ) from None
        runs = manifest.get("runs") if isinstance(manifest, dict) else None
        # only a file dp360 wrote: a look-alike `{"runs": {}}` does not make a user's folder a batch
        if (
            not isinstance(runs, dict)
            or manifest.get("kind") != BATCH_KIND
            or manifest.get("format") != BATCH_FORMAT
            or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..") for v in runs.values())
        ):
            raise damaged
        return manifest

    def check(self) -> None:
        """The refusals of `open`, read-only: a file, a run folder, or a folder of other files."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"Output path '{out}' is a file; choose a folder for --out.")
        if not out.is_dir():
            return
        if os.path.lexists(self.manifest_path):  # a link, FIFO or folder there: refused by _read
            self._read()
            self.lock.check_free()
            return
        if os.path.lexists(out / MANIFEST_NAME):
            raise RunDirectoryError(
                f"'{out}' is the run folder of one portrait, not a batch; choose a new or empty folder for --out."
            )
        from .atomic import is_dp360_temporary

        foreign = [
            child.name
            for child in out.iterdir()
            if not (child.name == self.lock.path.name or is_dp360_temporary(child.name))
        ]
        if foreign:
            raise RunDirectoryError(
                f"Output folder '{out}' already holds files that are not a dp360 batch (such as '{sorted(foreign)[0]}'); "
                "choose a new or empty folder."
            )

    def open(self, inputs: list[Path], command: str) -> dict[str, Path]:
        """Take the folder (lock, names) and return each input's run folder."""
        from .atomic import write_json_atomic

        self.check()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            previous = self._read() if os.path.lexists(self.manifest_path) else {}
            names = run_names(inputs, previous.get("runs"))
            self.manifest = {
                "format": BATCH_FORMAT,
                "kind": BATCH_KIND,
                "created_at": previous.get("created_at", _now()),
                "updated_at": _now(),
                "command": command,
                "runs": {**previous.get("runs", {}), **names},
                "last": previous.get("last"),
            }
            write_json_atomic(self.manifest_path, self.manifest)
        except BaseException:
            self.lock.release()
            raise
        return {key: self.out_dir / name for key, name in names.items()}

    def record(self, result: PortraitResult) -> None:
        """Append the portrait's line to batch.jsonl: one write of a whole line, synced, so a
        batch killed at any moment leaves only whole lines."""
        line = (json.dumps(result.log_line(), sort_keys=False) + "\n").encode()
        # O_NOFOLLOW: a link planted as batch.jsonl is refused, never appended to through
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            descriptor = os.open(self.log_path, flags, 0o666)
        except OSError as error:
            raise RunDirectoryError(
                f"'{self.log_path}' is not a file dp360 can append to ({error.strerror}); "
                "it was not written by dp360: move it away and rerun."
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise RunDirectoryError(
                    f"'{self.log_path}' is not a plain file; it was not written by dp360: move it away and rerun."
                )
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def close(self, counts: dict[str, int] | None) -> None:
        from .atomic import write_json_atomic

        if not self.lock.held:
            return
        try:
            if counts is not None:
                self.manifest.update(updated_at=_now(), last={"finished_at": _now(), **counts})
                write_json_atomic(self.manifest_path, self.manifest)
        finally:
            self.lock.release()


# -- what every portrait runs with -----------------------------------------------------------


@dataclass
class BatchRecipe:
    """The run every portrait of a batch gets: the stages, their settings and where the models are."""

    stages: tuple[str, ...]
    require: tuple[str, ...]  # stages that must be able to run (else the portrait fails at once)
    promised: tuple[str, ...]  # stages whose results make a portrait `done` (else `incomplete`)
    options: RunOptions = field(default_factory=RunOptions)
    prepare: PrepareSettings | None = None
    views: ViewSettings | None = None
    noise: NoiseSettings | None = None
    field: FieldStageSettings | None = None
    weights_dir: Path | None = None  # converted bundles and panohead/ (default: each node's dp360 cache)
    camera_dir: Path | None = None
    offload: bool = False
    low_vram: bool = False
    compile_models: bool = False

    @classmethod
    def of(cls, command: str, **settings) -> BatchRecipe:
        """The portraits' run as `dp360 COMMAND` (reconstruct, views) runs it (`dp360.recipes`)."""
        chosen = recipe(command)
        return cls(chosen.stages, chosen.require, chosen.promised, **settings)

    @classmethod
    def reconstruct(cls, **settings) -> BatchRecipe:
        """Everything, as `dp360 reconstruct`: done when the turntable and the mesh are there."""
        return cls.of("reconstruct", **settings)

    @classmethod
    def until_views(cls, **settings) -> BatchRecipe:
        """Prepare, 3D-aware noise and the views, as `dp360 views`."""
        return cls.of("views", **settings)

    def __post_init__(self) -> None:
        from .diffusion.stage import ViewSettings
        from .nerf.stage import FieldStageSettings
        from .panohead.stage import NoiseSettings
        from .prepare import PrepareSettings

        self.prepare = self.prepare or PrepareSettings()
        self.views = self.views or ViewSettings()
        self.noise = self.noise or NoiseSettings()  # the seed and view count: the run's (portrait_config)
        self.field = self.field or FieldStageSettings()

    def check(self) -> None:
        """Every setting that does not depend on the workers' device, before anything starts."""
        from .diffusion.stage import check_memory_options
        from .pipeline.registry import pipeline_stages, portrait_config
        from .pipeline.runner import check_run_settings

        if self.options.device not in ("auto", "cpu", "cuda"):
            raise Dp360Error(
                f"--device {self.options.device} cannot be used for a batch: each worker gets its own GPU from Ray; "
                "use auto, cuda or cpu."
            )
        # on a CPU here: what depends on the workers' device (the field's, the memory options') is
        # checked by check_device
        config = portrait_config(
            self.options.seed, self.prepare, self.views, self.noise, replace(self.field, field="nerfacto")
        )
        stages = tuple(stage for stage in pipeline_stages() if stage.name in self.stages)
        check_run_settings(replace(self.options, device="cpu", dtype=None), stages, config)
        check_memory_options(self.offload, self.low_vram, self.compile_models)

    def check_device(self, kind: str) -> str:
        """The settings that depend on the workers' device kind (cuda or cpu); returns the dtype."""
        from .diffusion.stage import check_memory_options
        from .runtime import resolve_dtype

        dtype = resolve_dtype(self.options.dtype, kind)
        refusal = dtype_refusal(dtype, kind, shown=f"{kind} workers")
        if refusal:
            raise Dp360Error(refusal)
        if {"fit", "render", "export"} & set(self.stages):
            # gsplat's toolchain is this machine's only when its GPU serves (remote workers check their own)
            self.field.check(kind, toolchain=kind == "cuda" and _local_cuda())
        if kind == "cpu" or _local_cuda():
            # a remote GPU is checked by its worker, at its first portrait
            check_memory_options(self.offload, self.low_vram, self.compile_models, kind)
        return dtype

    def locate(self, dtype: str) -> tuple[ViewModels, NoiseModels]:
        """The models as the process that calls this finds them (its node's cache, or weights_dir)."""
        from .diffusion.stage import ViewModels
        from .panohead.stage import NoiseModels

        view_models = ViewModels.locate(
            self.views.views, dtype, self.weights_dir, self.camera_dir, self.offload, self.low_vram, self.compile_models
        )
        return view_models, NoiseModels.locate(self.weights_dir)

    def config(self, dtype: str) -> RunConfig:
        """The configuration of each portrait's run, with the models as this process finds them."""
        from .pipeline.registry import portrait_config

        view_models, noise_models = self.locate(dtype)
        return portrait_config(
            self.options.seed, self.prepare, self.views, self.noise, self.field, view_models, noise_models
        )

    def fetch_weights(self, kind: str, dtype: str, out_dir: Path, note) -> list[str]:
        """Fetch and convert the weights every portrait needs into this node's cache (no portrait's
        input is read: the stages' weights depend on their settings only)."""
        from .pipeline.registry import pipeline_stages
        from .pipeline.runner import fetch_weights
        from .pipeline.stage import StageContext

        context = StageContext(out_dir, None, kind, dtype, self.options.progress, None, self.options.seed)
        stages = tuple(stage for stage in pipeline_stages() if stage.name in self.stages)
        return fetch_weights(stages, context, self.config(dtype), self.options, note)


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class ClusterSettings:
    """Where the workers run and how many there are."""

    address: str | None = None  # a running Ray cluster (`ray start --head`); None: start one here
    gpus_per_task: float = 1.0  # GPUs each worker holds (fractions share a GPU)
    cpus_per_task: float = 1.0  # CPU cores each worker holds (its torch threads on a CPU worker)
    workers: int | None = None  # at most this many workers (default: as many as the resources allow)
    retries: int = 2  # more tries of a portrait that crashed or whose worker died (not of a bad input)

    def check(self) -> None:
        from .checks import check_float, check_int

        check_float("--gpus-per-task", self.gpus_per_task, 0.01, 64)
        check_float("--cpus-per-task", self.cpus_per_task, 0.01, 1024)
        check_int("--retries", self.retries, 0, MAX_RETRIES)
        if self.workers is not None:
            check_int("--workers", self.workers, 1, 100_000)


# -- one portrait, in a worker -------------------------------------------------------------------


@dataclass
class PortraitTask:
    input: str  # absolute path of the image
    run_dir: str  # its run folder
    attempt: int = 0  # tries so far (the one sent next is attempt + 1)


@dataclass
class PortraitResult:
    input: str
    run_dir: str
    status: str  # done | incomplete | failed | interrupted
    error: str | None = None
    retryable: bool = False  # a crash or a dead worker, not a bad input
    seconds: dict[str, float] = field(default_factory=dict)  # stages that ran in the last try
    stages: dict[str, str] = field(default_factory=dict)  # every stage's status in run.json
    reused: list[str] = field(default_factory=list)  # stages whose earlier results were kept
    notes: list[str] = field(default_factory=list)
    pid: int | None = None  # the worker process of the last try
    loads: dict[str, int] = field(default_factory=dict)  # model loads of that worker so far
    attempts: int = 1
    wall_seconds: float = 0.0
    finished_at: str = ""

    def log_line(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "run": self.run_dir,
            "status": self.status,
            "attempts": self.attempts,
            "seconds": self.seconds,
            "wall_seconds": round(self.wall_seconds, 3),
            "error": self.error,
            "stages": self.stages,
            "reused": self.reused,
            "worker": {"pid": self.pid, "loads": self.loads},
            "finished_at": self.finished_at or _now(),
        }


class _StageClock:
    """The run's reporter inside a worker: keeps each stage's outcome and seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.notes: list[str] = []

    def stage_started(self, name: str, description: str) -> None:
        pass

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        if outcome.startswith("reused"):
            self.reused.append(name)
        else:
            self.seconds[name] = round(seconds, 3)

    def note(self, message: str) -> None:
        self.notes.append(message)


def _forwarded_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_VARIABLES
    }


@contextlib.contextmanager
def _node_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by the workers of one node (of one cache, when it is shared), so
    that the first one fetches the weights and the others wait and find them."""
    import fcntl

    from .cache import cache_dir

    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PortraitWorker:
    """One worker of a batch (run as a Ray actor): its models stay loaded from one portrait to
    the next. `kind` is cuda (Ray gives the actor its GPU as cuda:0) or cpu."""

    def __init__(self, recipe: BatchRecipe, kind: str, dtype: str, environment: dict[str, str], threads: int):
        os.environ.update(environment)
        from .pipeline.registry import pipeline_stages
        from .pipeline.stage import ModelCache

        pipeline_stages()  # imports every stage's code (torch, diffusers, nerfstudio) while the worker starts
        if kind == "cpu":
            import torch

            torch.set_num_threads(max(1, threads))
        self.recipe, self.kind, self.dtype = recipe, kind, dtype
        self.options = replace(recipe.options, device=kind, dtype=dtype, progress=False)
        self.view_models, self.noise_models = recipe.locate(dtype)
        self.model_cache = ModelCache(keep=True)  # the models stay loaded from one portrait to the next
        self._weights_ready = False

    def pid(self) -> int:
        return os.getpid()

    def loads(self) -> dict[str, int]:
        return dict(self.model_cache.loads)

    def run(self, task: PortraitTask) -> PortraitResult:
        from .atomic import filesystem_error
        from .manifest import read_manifest
        from .run import run_pipeline

        clock, started = _StageClock(), time.perf_counter()
        result = PortraitResult(task.input, task.run_dir, "failed", pid=os.getpid(), attempts=task.attempt)
        try:
            if not self._weights_ready:
                with _node_lock("batch-weights.lock"):
                    self.recipe.fetch_weights(self.kind, self.dtype, Path(task.run_dir).parent, clock.note)
                self._weights_ready = True
            summary = run_pipeline(
                task.input,
                task.run_dir,
                self.recipe.prepare,
                self.options,
                clock,
                stages=self.recipe.stages,
                view_settings=self.recipe.views,
                models=self.view_models,
                require=self.recipe.require,
                noise_settings=self.recipe.noise,
                noise_models=self.noise_models,
                field_settings=self.recipe.field,
                model_cache=self.model_cache,
            )
            missing = [name for name in self.recipe.promised if summary.stages.get(name, {}).get("status") != "done"]
            result.status = "incomplete" if missing else "done"
            if missing:
                reasons = [f"{name}: {summary.stages.get(name, {}).get('reason', 'not run')}" for name in missing]
                result.error = "not run: " + "; ".join(reasons)
        except KeyboardInterrupt:
            result.status, result.error = "interrupted", "interrupted (rerun the batch to resume)"
        except Exception as error:  # one portrait's failure is recorded; the worker goes on
            problem = error if isinstance(error, Dp360Error) else filesystem_error(error)
            result.error = str(problem) if problem is not None else f"{type(error).__name__}: {error}"
            result.retryable = problem is None
            if problem is None:
                log.exception("portrait %s failed", task.input)
        manifest_path = Path(task.run_dir) / MANIFEST_NAME
        with contextlib.suppress(Dp360Error, OSError):
            if manifest_path.is_file():
                records = read_manifest(manifest_path)["stages"]
                result.stages = {name: str(record.get("status")) for name, record in records.items()}
        result.seconds, result.reused, result.notes = clock.seconds, clock.reused, clock.notes
        result.loads = self.loads()
        result.wall_seconds = time.perf_counter() - started
        result.finished_at = _now()
        return result


# -- the driver ------------------------------------------------------------------------------------


class BatchReporter(Protocol):
    def batch_started(self, total: int, workers: int, kind: str) -> None: ...

    def portrait_started(self, task: PortraitTask, worker: int, pid: int | None) -> None: ...

    def portrait_retried(self, result: PortraitResult) -> None: ...

    def portrait_finished(self, result: PortraitResult) -> None: ...

    def note(self, message: str) -> None: ...


class LogBatchReporter:
    """Default reporter for library use: everything goes to the `dp360` logger."""

    def batch_started(self, total: int, workers: int, kind: str) -> None:
        log.info("batch: %d portraits on %d %s workers", total, workers, kind)

    def portrait_started(self, task: PortraitTask, worker: int, pid: int | None) -> None:
        log.info("worker %d (pid %s): %s, try %d", worker, pid, task.input, task.attempt)

    def portrait_retried(self, result: PortraitResult) -> None:
        log.warning("%s: %s; trying again", result.input, result.error)

    def portrait_finished(self, result: PortraitResult) -> None:
        log.info("%s: %s", result.input, result.status)

    def note(self, message: str) -> None:
        log.warning("%s", message)


@dataclass
class BatchSummary:
    out_dir: Path
    kind: str  # the workers' device kind
    workers: int
    results: list[PortraitResult]
    wall_seconds: float
    startup_seconds: float = 0.0  # of wall_seconds: until every worker had started (Ray, processes, imports)

    def counts(self) -> dict[str, int]:
        return {status: sum(result.status == status for result in self.results) for status in STATUSES}

    def stage_seconds(self) -> dict[str, float]:
        """Mean seconds of each stage over the portraits that ran it."""
        spans: dict[str, list[float]] = {}
        for result in self.results:
            for name, seconds in result.seconds.items():
                spans.setdefault(name, []).append(seconds)
        return {name: round(sum(values) / len(values), 3) for name, values in spans.items()}

    def portraits_per_hour(self) -> float:
        ended = sum(result.status in ("done", "incomplete") for result in self.results)
        return ended * 3600 / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "workers": self.workers,
            "device": self.kind,
            "counts": self.counts(),
            "wall_seconds": round(self.wall_seconds, 3),
            "startup_seconds": round(self.startup_seconds, 3),
            "portraits_per_hour": round(self.portraits_per_hour(), 1),
            "stage_seconds": self.stage_seconds(),
            "runs": [result.log_line() for result in self.results],
        }


@dataclass
class _Worker:
    index: int
    handle: Any  # the Ray actor
    pid: int | None = None


# Ray's raylet starts its workers at nice 15 by default, to keep the driver responsive. A batch's
# workers are the work itself: at nice 15 any other busy process on the machine starves them
# (under two CPU-bound processes the tiny test batch ran several times slower). A user's own
# RAY_worker_niceness is kept.
WORKER_NICENESS = "0"


def start_local_ray(**init_options) -> None:
    """`ray.init` of a local cluster whose workers run at normal priority (WORKER_NICENESS)."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)
    ray.init(**init_options)


def _check_reachable(address: str) -> None:
    """A host:port address must accept a connection within seconds (ray.init would wait minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # 'auto', ray:// (Ray Client): ray.init finds or refuses them itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise Dp360Error(
            f"Cannot reach the Ray cluster at {address} ({error.strerror or error}); start it with `ray start --head` "
            "on its head node and pass the address it prints, or drop --address to run on this machine."
        ) from None


def _connect(cluster: ClusterSettings) -> bool:
    """Connect to the cluster at `address`, join the one this process is already connected to,
    or start one on this machine; True when this call started (and must stop) it."""
    import ray

    if cluster.address:
        _check_reachable(cluster.address)
    if ray.is_initialized():
        return False
    try:
        if cluster.address:
            ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            start_local_ray(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as error:
        raise Dp360Error(
            f"Cannot reach the Ray cluster at {cluster.address} ({error}); start it with `ray start --head` "
            "on its head node, or drop --address to run on this machine."
        ) from None
    return not cluster.address


def _kind(recipe: BatchRecipe, cluster: ClusterSettings, resources: dict[str, float] | None) -> str:
    """cuda when GPU workers fit (from the cluster's resources, or this machine's before Ray starts)."""
    if recipe.options.device == "cpu":
        return "cpu"
    if resources is None:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
        if not gpus:  # a GPU torch cannot use (an old driver) is refused, not quietly left idle
            from .runtime import refuse_unusable_gpu

            refuse_unusable_gpu(recipe.options.device)
    else:
        gpus = resources.get("GPU", 0.0)
    if gpus >= cluster.gpus_per_task:
        return "cuda"
    if recipe.options.device == "cuda":
        raise Dp360Error(
            f"--device cuda was asked for but the Ray cluster has {gpus:g} GPU(s), fewer than --gpus-per-task "
            f"{cluster.gpus_per_task:g}; use --device cpu, or a cluster with GPUs."
        )
    return "cpu"


def _worker_count(kind: str, cluster: ClusterSettings, resources: dict[str, float], portraits: int) -> int:
    if kind == "cuda":
        fits = int(resources.get("GPU", 0.0) / cluster.gpus_per_task + 1e-9)
    else:
        fits = int(resources.get("CPU", 0.0) / cluster.cpus_per_task + 1e-9)
    if fits < 1:
        raise Dp360Error(
            f"The Ray cluster has {resources.get('CPU', 0):g} CPU(s), too few for one worker of --cpus-per-task "
            f"{cluster.cpus_per_task:g}; lower --cpus-per-task."
        )
    return max(1, min(fits, cluster.workers or fits, portraits))


def _restarted_pid(worker: _Worker) -> int | None:
    """The pid of the process Ray restarted the worker in, or None when it is gone for good. Calls
    made while it restarts fail with ActorUnavailableError; they are repeated until it answers."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + WORKER_START_SECONDS
    while time.monotonic() < deadline:
        try:
            return ray.get(worker.handle.pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:
            time.sleep(POLL_SECONDS)
        except (RayActorError, GetTimeoutError):
            return None
    return None


def _outcome(reference, worker: _Worker, task: PortraitTask, reporter: BatchReporter) -> tuple[PortraitResult, bool]:
    """The result of one try, and whether its worker is still there. A worker that died (killed,
    out of memory) gives a retryable failure; Ray restarts the actor, whose new pid is awaited."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        result = ray.get(reference)
    except RayTaskError as error:  # the worker's own code failed outside the run (a bug): try again
        result = PortraitResult(
            task.input, task.run_dir, "failed", f"the worker failed: {error}", retryable=True, pid=worker.pid
        )
    except RayActorError as error:
        result = PortraitResult(
            task.input,
            task.run_dir,
            "failed",
            f"the worker process (pid {worker.pid}) died while running it ({type(error).__name__})",
            retryable=True,
            pid=worker.pid,
            finished_at=_now(),
        )
        worker.pid = _restarted_pid(worker)
        if worker.pid is None:
            reporter.note(f"worker {worker.index} was lost and could not be restarted")
            return result, False
    result.attempts = task.attempt
    return result, True


def _start_workers(
    recipe: BatchRecipe, kind: str, dtype: str, cluster: ClusterSettings, resources: dict[str, float], portraits: int
) -> list[_Worker]:
    """The started workers (each has answered with its pid)."""
    import ray

    count = _worker_count(kind, cluster, resources, portraits)
    actor = ray.remote(PortraitWorker).options(
        num_cpus=cluster.cpus_per_task,
        num_gpus=cluster.gpus_per_task if kind == "cuda" else 0,
        max_restarts=-1,  # a dead worker is replaced; the tries of its portrait are bounded by retries
        max_task_retries=0,  # its portrait goes back to our queue instead
    )
    environment, threads = _forwarded_environment(), max(1, int(cluster.cpus_per_task))
    workers = [_Worker(index, actor.remote(recipe, kind, dtype, environment, threads)) for index in range(count)]
    try:
        pids = ray.get([worker.handle.pid.remote() for worker in workers], timeout=WORKER_START_SECONDS)
    except ray.exceptions.GetTimeoutError:
        raise Dp360Error(
            f"The Ray workers did not start within {WORKER_START_SECONDS:.0f} s; check the cluster with `ray status`."
        ) from None
    for worker, pid in zip(workers, pids):
        worker.pid = pid
    return workers


def _dispatch(tasks: list[PortraitTask], workers: list[_Worker], retries: int, finish, reporter) -> None:
    """Keep every worker busy with one portrait until each has ended; on KeyboardInterrupt record
    the running ones as interrupted and raise it."""
    import ray

    pending, idle = deque(tasks), deque(workers)
    running: dict[Any, tuple[_Worker, PortraitTask]] = {}
    try:
        while pending or running:
            while pending and idle:
                worker, task = idle.popleft(), pending.popleft()
                task.attempt += 1
                running[worker.handle.run.remote(task)] = (worker, task)
                reporter.portrait_started(task, worker.index, worker.pid)
            if not running:
                break  # every worker was lost
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for reference in ready:
                worker, task = running.pop(reference)
                result, alive = _outcome(reference, worker, task, reporter)
                if result.status == "failed" and result.retryable and task.attempt <= retries:
                    reporter.portrait_retried(result)
                    pending.append(task)
                else:
                    finish(result)
                if alive:
                    idle.append(worker)
        for task in pending:
            finish(
                PortraitResult(
                    task.input, task.run_dir, "failed", "no worker was left to run it", attempts=task.attempt
                )
            )
    except KeyboardInterrupt:
        # A running actor method cannot be interrupted: the caller kills the workers (as a crash would
        # end them); each run keeps its finished stages and a rerun resumes it.
        for reference in running:
            ray.cancel(reference)
        for _, task in running.values():
            finish(
                PortraitResult(
                    task.input,
                    task.run_dir,
                    "interrupted",
                    "interrupted; rerun the batch to resume it",
                    attempts=task.attempt,
                    finished_at=_now(),
                )
            )
        raise


def run_batch(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    recipe: BatchRecipe,
    cluster: ClusterSettings | None = None,
    reporter: BatchReporter | None = None,
) -> BatchSummary:
    """Run `recipe` on every portrait of `inputs` into `out_dir/<name>/`, on Ray workers.

    Every setting, the inputs and the folder are checked before anything starts. Uses the Ray
    cluster this process is connected to, else the one at `cluster.address`, else starts one here
    (and stops it at the end). Each portrait's line goes to batch.jsonl as it ends. On
    KeyboardInterrupt the workers are killed and their portraits recorded as interrupted, then it
    is raised; a re-run resumes them (their runs take over the locks the killed workers held)."""
    import ray

    cluster = cluster or ClusterSettings()
    reporter = reporter or LogBatchReporter()
    cluster.check()
    recipe.check()
    portraits = collect_inputs(inputs)
    folder = BatchFolder(out_dir)
    folder.check()
    joined = ray.is_initialized() or bool(cluster.address)
    if not joined:  # this machine's device kind is known before Ray starts
        recipe.check_device(_kind(recipe, cluster, None))
    results: list[PortraitResult] = []

    def finish(result: PortraitResult) -> None:
        results.append(result)
        folder.record(result)
        reporter.portrait_finished(result)

    clock = time.perf_counter()
    started_ray = _connect(cluster)
    try:
        resources = ray.cluster_resources()
        kind = _kind(recipe, cluster, resources)
        dtype = recipe.check_device(kind)
        run_dirs = folder.open(portraits, "views" if recipe.promised == ("views",) else "reconstruct")
        workers: list[_Worker] = []
        try:
            if not joined:  # one node, one cache: fetch before the workers start, with the driver's progress bars
                recipe.fetch_weights(kind, dtype, folder.out_dir, reporter.note)
            workers = _start_workers(recipe, kind, dtype, cluster, resources, len(portraits))
            startup = time.perf_counter() - clock
            reporter.batch_started(len(portraits), len(workers), kind)
            tasks = [PortraitTask(str(path), str(run_dirs[str(path)])) for path in portraits]
            _dispatch(tasks, workers, cluster.retries, finish, reporter)
            return BatchSummary(folder.out_dir, kind, len(workers), results, time.perf_counter() - clock, startup)
        finally:
            for worker in workers:
                with contextlib.suppress(Exception):
                    ray.kill(worker.handle, no_restart=True)
            folder.close({status: sum(result.status == status for result in results) for status in STATUSES})
    finally:
        if started_ray:
            ray.shutdown()
