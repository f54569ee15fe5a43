"""Portraits per hour: `dp360 batch` on N Ray workers against the sequential `reconstruct` loop.

    python benchmarks/batch_throughput.py [--portraits 6] [--workers N] [--repeats 2]
        [--until reconstruct|views] [--device auto] [--weights-dir DIR --cameras DIR] [--json PATH]

Both run in this one process on the same inputs (copies of the bundled portrait) and the same
settings: the sequential loop is what `dp360 reconstruct a.png b.png ...` does (one portrait after
another, the models loaded again for each, torch using every core); the batch is
`dp360.batch.run_batch` with `--workers` Ray actors (default: one per GPU, else 2), each holding
cores / workers CPU threads, timed from the call to the last portrait (worker start-up
included; the local Ray cluster is started once, before). Without `--weights-dir` the models
are the tiny ones of the tests (seeded random weights, converted by the real converters) at tiny
settings; the images are meaningless, the seconds are the point. Both variants first run untimed
once (imports, caches, page cache); then `--repeats` rounds, the order rotated each round, each
into fresh folders. Prints each variant's median wall time, portraits per hour, model loads, and
the ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import benchlib

ASTRONAUT = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"
TINY_VIEWS = 8


def write_tiny_weights(folder: Path, cache: Path) -> tuple[Path, Path]:
    """A --weights-dir of tiny bundles and PanoHead, their camera images, and a random perceptual
    backbone in dp360's cache `cache`."""
    from dp360.diffusion.models.tiny import write_tiny_bundles
    from dp360.panohead.perceptual import VGG16_FILE, write_random_backbone
    from dp360.panohead.tiny import write_tiny_panohead

    bundles = write_tiny_bundles(folder / "bundles", view_count=TINY_VIEWS)
    weights = folder / "weights"
    weights.mkdir()
    for kind in ("main", "back"):
        (weights / f"{kind}-fp32").symlink_to(bundles[kind], target_is_directory=True)
    (weights / "panohead").symlink_to(write_tiny_panohead(folder / "panohead"), target_is_directory=True)
    write_random_backbone(cache / "perceptual" / VGG16_FILE)
    return weights, bundles["cameras"]


def settings(args, tiny: bool) -> dict:
    """The recipe's settings: tiny ones for the tiny models, the defaults for real weights."""
    from dp360.diffusion.stage import ViewSettings
    from dp360.nerf.common import FitSettings
    from dp360.nerf.mesh import MeshSettings
    from dp360.nerf.render import TurntableSettings
    from dp360.nerf.stage import FieldStageSettings
    from dp360.panohead.stage import NoiseSettings
    from dp360.prepare import PrepareSettings
    from dp360.run import RunOptions

    common = dict(
        options=RunOptions(device=args.device, progress=False),
        prepare=PrepareSettings(detector="dlib"),
        weights_dir=args.weights_dir,
        camera_dir=args.cameras,
    )
    if not tiny:
        return common
    return dict(
        common,
        views=ViewSettings(steps=2, views=TINY_VIEWS),
        noise=NoiseSettings(invert_steps=2, pti_steps=1, views=TINY_VIEWS),
        field=FieldStageSettings(
            FitSettings.preset("test", iterations=8),
            TurntableSettings(frames=4, resolution=32),
            MeshSettings(resolution=32, faces=2000),
        ),
    )


def stage_seconds(out: Path) -> dict[str, float]:
    """Mean seconds of each stage over the run folders under `out`, as their run.json records them."""
    import json

    spans: dict[str, list[float]] = {}
    for manifest in sorted(out.glob("*/run.json")):
        for name, record in json.loads(manifest.read_text())["stages"].items():
            if "seconds" in record:
                spans.setdefault(name, []).append(record["seconds"])
    return {name: round(sum(values) / len(values), 2) for name, values in spans.items()}


def sequential(images: list[Path], out: Path, recipe) -> dict:
    """`dp360 reconstruct a.png b.png ...`: one portrait after another, models located (and so
    loaded) afresh for each, as the command's loop does."""
    from dp360.diffusion.stage import ViewModels
    from dp360.panohead.stage import NoiseModels
    from dp360.pipeline.stage import ModelCache
    from dp360.run import run_pipeline
    from dp360.runtime import resolve_device, resolve_dtype

    dtype = resolve_dtype(recipe.options.dtype, resolve_device(recipe.options.device))
    loads = 0
    statuses = []
    for image in images:
        models = ViewModels.locate(recipe.views.views, dtype, recipe.weights_dir, recipe.camera_dir)
        noise_models = NoiseModels.locate(recipe.weights_dir)
        model_cache = ModelCache()  # each portrait loads its own, as the command's loop does
        summary = run_pipeline(
            image,
            out / image.stem,
            recipe.prepare,
            recipe.options,
            stages=recipe.stages,
            view_settings=recipe.views,
            models=models,
            require=recipe.require,
            noise_settings=recipe.noise,
            noise_models=noise_models,
            field_settings=recipe.field,
            model_cache=model_cache,
        )
        statuses.append(summary.status)
        loads += sum(model_cache.loads.values())
    return {"statuses": statuses, "model_loads": loads, "stage_seconds": stage_seconds(out)}


def batch(images: list[Path], out: Path, recipe, workers: int, cpus_per_task: float) -> dict:
    from dp360.batch import ClusterSettings, run_batch

    summary = run_batch(images, out, recipe, ClusterSettings(workers=workers, cpus_per_task=cpus_per_task))
    per_worker = {result.pid: sum(result.loads.values()) for result in summary.results}
    return {
        "statuses": [result.status for result in summary.results],
        "model_loads": sum(per_worker.values()),
        "startup_seconds": summary.startup_seconds,  # until every Ray actor had started and answered
        "stage_seconds": stage_seconds(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portraits", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None, help="default: one per GPU, else 2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--until", choices=("reconstruct", "views"), default="reconstruct")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--weights-dir", type=Path, default=None, help="converted bundles (default: tiny ones)")
    parser.add_argument("--cameras", type=Path, default=None, help="camera images for --weights-dir")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    import ray
    import torch

    from dp360.batch import BatchRecipe

    logging.getLogger("dp360").setLevel(logging.ERROR)  # the runs' notes (a small face, ...) are not the point

    gpus = torch.cuda.device_count() if args.device != "cpu" and torch.cuda.is_available() else 0
    workers = args.workers or gpus or 2
    cores = os.cpu_count() or 1
    cpus_per_task = 1.0 if gpus else max(1.0, float(cores // workers))
    torch.set_num_threads(cores)  # the sequential loop uses every core, as `dp360 reconstruct` does
    print(
        benchlib.device_description("cuda" if gpus else "cpu"),
        f"| {cores} cores | {workers} workers | load average {os.getloadavg()[0]:.1f} before",
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = args.weights_dir is None
        if tiny:
            os.environ["DP360_CACHE"] = str(root / "cache")
            os.environ["DP360_OFFLINE"] = "1"  # everything is local: nothing to fetch
            args.weights_dir, args.cameras = write_tiny_weights(root, root / "cache")
        until = BatchRecipe.until_views if args.until == "views" else BatchRecipe.reconstruct
        recipe = until(**settings(args, tiny))
        images = [Path(shutil.copy(ASTRONAUT, root / f"p{index:03d}.png")) for index in range(args.portraits)]
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        variants = {
            "sequential": lambda out, chosen: sequential(chosen, out, recipe),
            f"batch x{workers}": lambda out, chosen: batch(chosen, out, recipe, workers, cpus_per_task),
        }
        for name, run in variants.items():  # untimed: imports, caches, worker processes
            run(root / f"warmup-{name}", images[: max(1, min(workers, len(images)))])
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name in benchlib.rotated(list(variants), repeat):
                start = time.perf_counter()
                details = variants[name](root / f"run-{repeat}-{name}", images)
                runs[name].append({"seconds": time.perf_counter() - start, **details})
        ray.shutdown()
    results = {}
    for name, repeats in runs.items():
        spans = [run["seconds"] for run in repeats]
        median = benchlib.median(spans)
        results[name] = {
            "median_seconds": median,
            "portraits_per_hour": args.portraits * 3600 / median,
            "runs": repeats,
        }
        print(
            f"{name}: {results[name]['portraits_per_hour']:.0f} portraits/h (median {median:.1f} s for "
            f"{args.portraits} portraits over {args.repeats} runs: {benchlib.spread(spans, digits=1)}), "
            f"{repeats[-1]['model_loads']} model loads, statuses {sorted({s for run in repeats for s in run['statuses']})}"
        )
        print(f"  mean seconds per stage: {repeats[-1]['stage_seconds']}")
    batch_name = f"batch x{workers}"
    print(f"load average {os.getloadavg()[0]:.1f} after (the machine's other work shares its cores)")
    ratio = results[batch_name]["portraits_per_hour"] / results["sequential"]["portraits_per_hour"]
    startup = benchlib.median(run["startup_seconds"] for run in runs[batch_name])
    steady = args.portraits * 3600 / (results[batch_name]["median_seconds"] - startup)
    results[batch_name].update(startup_seconds=startup, steady_portraits_per_hour=steady)
    print(f"ratio {batch_name} / sequential: {ratio:.2f}x, worker start-up included")
    print(
        f"without the {startup:.1f} s of worker start-up (paid once per batch): {steady:.0f} portraits/h, "
        f"{steady / results['sequential']['portraits_per_hour']:.2f}x"
    )
    benchlib.write_json(
        args.json,
        {
            "benchmark": "batch_throughput",
            "device": benchlib.device_description("cuda" if gpus else "cpu"),
            "settings": {**vars(args), "workers": workers, "cpus_per_task": cpus_per_task, "cores": cores},
            "results": results,
            "ratio": ratio,
        },
    )


if __name__ == "__main__":
    main()
