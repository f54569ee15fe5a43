"""`dp360 reconstruct` end to end with full-size random weights, timed stage by stage.

    python benchmarks/reconstruct_e2e.py [--family sd15|tiny] [--size 512] [--views 32] [--steps 50]
        [--invert-steps 200] [--pti-steps 5] [--panohead released|tiny] [--fit-preset gpu|cpu|test]
        [--fit-iterations N] [--frames 120] [--resolution 512] [--mesh-resolution 256]
        [--device auto] [--dtype fp16] [--offload | --low-vram] [--compile] [--repeats 2]
        [--work-dir DIR] [--keep] [--json PATH]

First writes random-weight models the way the official files come: the main and back-view
DiffPortrait360 checkpoints in the official key layout (`torch.save`), converted by dp360's own
converter into fp16 bundles; a PanoHead pickle in the released persistence layout, converted by
dp360's safe loader; a random VGG16 backbone for LPIPS; and synthetic camera-condition images
(not timed). Then runs `dp360.run.reconstruct` (the library function behind `dp360 reconstruct`)
on the bundled portrait `--repeats` times, each into a fresh folder, and prints each stage's
seconds as run.json records them, the GPU memory peak of each stage (reset at every stage start
by a reporter) and the whole run's wall time. The first run in the process pays CUDA
initialisation and kernel selection ("cold"); later runs are "warm". The bundles were just
written, so they load from the page cache, not from disk. The face detector is dlib (offline).
Random weights: the images are meaningless; the seconds and the memory are the point.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from dp360.diffusion.models.components import BACK_COMPONENTS, MAIN_COMPONENTS, component_config
from dp360.diffusion.models.configs import FAMILIES
from dp360.runtime import DTYPES, resolve_device, resolve_dtype

ASTRONAUT = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"
TARGET_SECONDS = 180.0
TARGET_PEAK_GB = {"default": 12.0, "low-vram": 8.0}


def write_bundles(folder: Path, family, view_count: int, device: str) -> dict[str, Path]:
    """Official-layout checkpoints with random weights -> dp360's converter -> fp16 bundles."""
    from PIL import Image

    from dp360.diffusion.models.bundle import convert_to_bundle
    from dp360.diffusion.models.convert import to_official_layout
    from dp360.diffusion.models.tiny import camera_condition_images

    paths: dict[str, Path] = {}
    # Random numbers are drawn on the GPU when there is one (seconds instead of a minute).
    for kind, names, seed in (("main", MAIN_COMPONENTS, 0), ("back", BACK_COMPONENTS, 1)):
        start = time.perf_counter()
        components = benchlib.random_components(family, names, device, torch.float16, seed)
        checkpoint = to_official_layout(
            {
                name: (component_config(family, name), {k: v.cpu() for k, v in module.state_dict().items()})
                for name, module in components.items()
            },
            schedule=torch.zeros(1000),
        )
        del components
        torch.save(checkpoint, folder / f"{kind}.th")
        del checkpoint
        gc.collect()
        if benchlib.is_cuda(device):
            torch.cuda.empty_cache()
        paths[kind] = convert_to_bundle(
            folder / f"{kind}.th", folder / f"{kind}-fp16", kind, family=family, dtype=torch.float16
        )
        (folder / f"{kind}.th").unlink()
        size = sum(path.stat().st_size for path in paths[kind].rglob("*") if path.is_file())
        print(f"wrote the {kind} bundle ({size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s")
        sys.stdout.flush()
    cameras = folder / "cameras"
    cameras.mkdir()
    for index, image in enumerate(camera_condition_images(view_count, family.image_size)):
        Image.fromarray(image).save(cameras / f"{index:03d}.png")
    paths["cameras"] = cameras
    return paths


def write_panohead(folder: Path, config_name: str) -> tuple[Path, Path]:
    from dp360.panohead.generator import PanoHeadGenerator, released_config, tiny_config
    from dp360.panohead.perceptual import write_random_backbone
    from dp360.panohead.persistence import write_network_pickle
    from dp360.panohead.store import convert_panohead_pickle

    torch.manual_seed(0)
    generator = PanoHeadGenerator(released_config() if config_name == "released" else tiny_config())
    pickle_path = write_network_pickle(folder / "panohead.pkl", generator, generator.config.init_kwargs())
    converted = convert_panohead_pickle(pickle_path, folder / "panohead")
    pickle_path.unlink()
    return converted, write_random_backbone(folder / "vgg16.pth")


class StageReporter:
    """The run's reporter: wall seconds and GPU memory peak of each stage."""

    def __init__(self, device: str):
        self.device = device
        self.stages: dict[str, dict] = {}
        self.notes: list[str] = []
        self._start = 0.0

    def stage_started(self, name: str, description: str) -> None:
        benchlib.reset_peak(self.device)
        self._start = time.perf_counter()

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        self.stages[name] = {
            "outcome": outcome,
            "wall_seconds": time.perf_counter() - self._start,
            "peak_gib": benchlib.peak_gib(self.device),
        }

    def note(self, message: str) -> None:
        self.notes.append(message)


def memory_mode(args) -> str:
    return "low-vram" if args.low_vram else ("offload" if args.offload else "default")


def run_once(args, out: Path, paths: dict, panohead: Path, backbone: Path, device: str, dtype: str) -> dict:
    from dp360.diffusion.stage import ViewModels, ViewSettings
    from dp360.nerf.common import FitSettings
    from dp360.nerf.mesh import MeshSettings
    from dp360.nerf.render import TurntableSettings
    from dp360.nerf.stage import FieldStageSettings
    from dp360.panohead.stage import NoiseModels, NoiseSettings
    from dp360.prepare import PrepareSettings
    from dp360.run import RunOptions, reconstruct

    options = {
        name: True
        for flag, name in ((args.offload, "offload"), (args.low_vram, "low_vram"), (args.compile, "compile_models"))
        if flag
    }
    try:
        models = ViewModels(paths["main"], paths["back"], paths["cameras"], **options)
    except TypeError as error:
        raise SystemExit(f"this dp360's ViewModels does not take {sorted(options)}: {error}") from None
    fit = None
    if args.fit_preset or args.fit_iterations:
        preset = args.fit_preset or ("gpu" if benchlib.is_cuda(device) else "cpu")
        fit = FitSettings.preset(preset, seed=0, **({"iterations": args.fit_iterations} if args.fit_iterations else {}))
    reporter = StageReporter(device)
    benchlib.reset_peak(device)
    with benchlib.Stopwatch(device) as clock:
        summary = reconstruct(
            ASTRONAUT,
            out,
            PrepareSettings(detector="dlib"),
            RunOptions(device=device, dtype=dtype, seed=0, progress=False),
            reporter,
            view_settings=ViewSettings(steps=args.steps, views=args.views),
            models=models,
            noise_settings=NoiseSettings(invert_steps=args.invert_steps, pti_steps=args.pti_steps),
            noise_models=NoiseModels(panohead, backbone),
            field_settings=FieldStageSettings(
                fit=fit,
                turntable=TurntableSettings(frames=args.frames, resolution=args.resolution),
                mesh=MeshSettings(resolution=args.mesh_resolution),
            ),
        )
    manifest = json.loads((out / "run.json").read_text())
    stages = {
        name: {
            "status": record.get("status"),
            "seconds": record.get("seconds"),
            **reporter.stages.get(name, {}),
        }
        for name, record in manifest["stages"].items()
    }
    return {
        "status": summary.status,
        "wall_seconds": clock.seconds,
        "stage_seconds": sum(stage["seconds"] or 0.0 for stage in stages.values()),
        "stages": stages,
        "notes": reporter.notes + [note for note in summary.notes if note not in reporter.notes],
        "peak_gib": benchlib.peak_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=None, help="view pixels (default: the family's, 512 for sd15)")
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--invert-steps", type=int, default=200)
    parser.add_argument("--pti-steps", type=int, default=5)
    parser.add_argument("--panohead", default="released", choices=["released", "tiny"])
    parser.add_argument("--fit-preset", default=None, help="gpu, cpu or test (default: gpu on CUDA, else cpu)")
    parser.add_argument("--fit-iterations", type=int, default=None)
    parser.add_argument("--frames", type=int, default=120, help="turntable frames")
    parser.add_argument("--resolution", type=int, default=512, help="turntable pixels")
    parser.add_argument("--mesh-resolution", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: fp16 on CUDA, fp32 elsewhere")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--offload", action="store_true", help="the views stage with --offload")
    memory.add_argument("--low-vram", action="store_true", help="the views stage with --low-vram")
    parser.add_argument("--compile", action="store_true", help="the views stage with --compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="where the bundles (~10 GB at full size) and runs go")
    parser.add_argument("--keep", action="store_true", help="keep the bundles and runs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    family = benchlib.family_at(args.family, args.size)
    benchlib.quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="dp360-e2e-", dir=args.work_dir))
    print(
        f"{benchlib.device_description(device)}; {dtype}; family {family.name} at {family.image_size} px, "
        f"{args.views} views, {args.steps} steps, PanoHead {args.panohead} ({args.invert_steps} + {args.pti_steps} "
        f"steps), fit preset {args.fit_preset or 'device default'}"
        + (f" ({args.fit_iterations} iterations)" if args.fit_iterations else "")
        + f", turntable {args.frames} x {args.resolution} px, mesh {args.mesh_resolution}^3, memory mode "
        f"{memory_mode(args)}{', compiled' if args.compile else ''}; work folder {work}"
    )
    sys.stdout.flush()
    try:
        start = time.perf_counter()
        paths = write_bundles(work, family, args.views, device)
        panohead, backbone = write_panohead(work, args.panohead)
        print(f"models written and converted in {time.perf_counter() - start:.0f} s (not part of the runs)")
        sys.stdout.flush()
        runs = []
        for repeat in range(args.repeats):
            result = run_once(args, work / f"run{repeat}", paths, panohead, backbone, device, dtype)
            runs.append(result)
            label = "cold (first in this process)" if repeat == 0 else "warm"
            print(f"\nrun {repeat + 1}, {label}: {result['status']}, {result['wall_seconds']:.1f} s wall")
            for name, stage in result["stages"].items():
                peak = f", peak GPU {stage['peak_gib']:.2f} GiB" if stage.get("peak_gib") is not None else ""
                seconds = f"{stage['seconds']:.1f} s" if stage.get("seconds") is not None else "-"
                print(f"  {name:>8}: {seconds:>8} ({stage['status']}){peak}")
            for note in result["notes"]:
                print(f"  note: {note}")
            sys.stdout.flush()
            if result["status"] != "done":
                raise SystemExit(f"the run ended {result['status']}; see the stages above")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    warm = runs[1:] or runs
    whole = benchlib.median(run["wall_seconds"] for run in warm)
    print(
        f"\nwhole reconstruct: {whole:.1f} s (median of the {'warm' if runs[1:] else 'only'} runs; all runs: "
        f"{benchlib.spread([run['wall_seconds'] for run in runs], digits=1)} s); process peak RSS "
        f"{benchlib.cpu_peak_rss_gib():.1f} GiB"
    )
    peak = max((run["peak_gib"] or 0.0) for run in runs) if benchlib.is_cuda(device) else None
    views_peak = (
        max((run["stages"].get("views", {}).get("peak_gib") or 0.0) for run in runs)
        if benchlib.is_cuda(device)
        else None
    )
    if peak is not None:
        print(f"peak GPU memory: whole run {peak:.2f} GiB, views stage {views_peak:.2f} GiB")
    judged = (
        benchlib.is_cuda(device)
        and args.family == "sd15"
        and family.image_size == 512
        and (args.views, args.steps, args.invert_steps, args.pti_steps) == (32, 50, 200, 5)
        and args.panohead == "released"
        and dtype == "fp16"
        and not args.fit_preset
        and not args.fit_iterations
    )
    mode = memory_mode(args)
    if judged:
        if mode == "default":
            verdict = "met" if whole <= TARGET_SECONDS else "NOT met"
            print(f"target whole reconstruct <= {TARGET_SECONDS:.0f} s: {whole:.1f} s -> {verdict}")
        if mode in TARGET_PEAK_GB:
            limit = TARGET_PEAK_GB[mode]
            value = peak * benchlib.GIB / 1e9
            print(
                f"target peak GPU memory ({mode}) <= {limit} GB: {value:.2f} GB -> {'met' if value <= limit else 'NOT met'}"
            )
    else:
        print(
            f"targets (H100, 512 px, defaults, fp16: <= {TARGET_SECONDS:.0f} s; peak <= 12 GB, <= 8 GB with --low-vram) "
            "not judged: these settings or this device differ"
        )
    benchlib.write_json(
        args.json,
        {
            "benchmark": "reconstruct_e2e",
            "device": benchlib.device_description(device),
            "settings": {**vars(args), "dtype": dtype, "size": family.image_size},
            "memory_mode": mode,
            "whole_seconds": whole,
            "peak_gib": peak,
            "views_peak_gib": views_peak,
            "runs": runs,
            "targets_judged": judged,
        },
    )


if __name__ == "__main__":
    main()
