"""`dp360 eval`, as a library call: candidates (runs, or other methods' views as captures) against
an optional ground-truth capture, each run's results written into its `eval/` folder, and an
optional comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Dp360Error
from .truth import Candidate, EvalSettings, Models

METRICS_FILE = "metrics.json"
PLOT_FILE = "metrics.png"


def open_candidates(paths: list[str | Path]) -> list[Candidate]:
    if not paths:
        raise Dp360Error("Give at least one run folder (or capture) to evaluate.")
    candidates = [Candidate.open(path) for path in paths]
    labels = [candidate.label for candidate in candidates]
    if len(set(labels)) < len(labels):  # same folder names in different places: tell them apart
        for candidate, path in zip(candidates, paths):
            candidate.label = str(path)
    return candidates


def evaluate_paths(
    paths: list[str | Path],
    truth: str | Path | None = None,
    settings: EvalSettings | None = None,
    table: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every check first (settings, folders, the table's target, the run locks), then per
    candidate: its metrics against `truth` and its consistency score (a run with a field);
    written as RUN/eval/metrics.json and metrics.png for runs, and as `table` (.md and .csv)."""
    from ..atomic import write_json_atomic
    from ..manifest import RunLock
    from .capture import read_capture
    from .compare import check_table_target, write_table
    from .consistency import FOLDER, consistency, recorded
    from .plot import plot_metrics
    from .truth import evaluate

    settings = settings or EvalSettings()
    settings.check()
    if table is not None:
        check_table_target(table, overwrite)
    candidates = open_candidates(list(paths))
    truth_capture = read_capture(truth) if truth is not None else None
    if truth_capture is not None:
        truth_capture.index_of(settings.reference)
    else:
        lacking = [candidate.label for candidate in candidates if not candidate.has_field]
        if lacking:
            raise Dp360Error(
                f"Without --truth only the consistency score can be measured, and it needs a fitted field, which "
                f"{', '.join(lacking)} lacks; pass --truth CAPTURE or a run made by `dp360 reconstruct`."
            )
    for candidate in candidates:
        if candidate.run_dir is not None:
            RunLock(candidate.run_dir).check_free()

    models = Models.load(settings)
    results = []
    for candidate in candidates:
        lock = RunLock(candidate.run_dir) if candidate.run_dir is not None else None
        if lock is not None:
            lock.acquire()  # no run rewrites the views or the field while they are measured
        try:
            result: dict[str, Any] = {
                "candidate": candidate.label,
                "path": str(candidate.run_dir or candidate.views.folder),
                "truth": None,
                "consistency": None,
            }
            if truth_capture is not None:
                result["truth"] = evaluate(candidate, truth_capture, settings, models, progress)
            if candidate.has_field and candidate.run_dir is not None:
                result["consistency"] = recorded(candidate.run_dir) or consistency(
                    candidate.run_dir, settings.device, None, models.lpips, models.identity, models.identity_reason
                )
            if candidate.run_dir is not None:
                folder = candidate.run_dir / FOLDER
                write_json_atomic(folder / METRICS_FILE, result)
                plot = plot_metrics(folder / PLOT_FILE, result["truth"], result["consistency"])
                result["files"] = [str(folder / METRICS_FILE)] + ([str(plot)] if plot else [])
        finally:
            if lock is not None:
                lock.release()
        results.append(result)
    if table is not None:
        write_table(table, results, str(truth_capture.folder) if truth_capture else None, overwrite)
    return results
