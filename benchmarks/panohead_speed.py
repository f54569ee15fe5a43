"""Seconds and peak memory of the PanoHead stage with a full-size generator (random weights).

    python benchmarks/panohead_speed.py [--invert-steps 200] [--pti-steps 5] [--renders 32]
        [--w-samples 10000] [--repeats 3] [--warmup-steps 2] [--device auto] [--json PATH]

The noise stage's work, as `dp360.panohead.inversion.invert` and `render_views` do it at 512 x 512:
the W statistics (`--w-samples` latents through the mapping network), the W+ steps (LPIPS-VGG16
+ pixel MSE, the reference's schedule), the copy of the generator that PTI tunes, the PTI steps,
and the orbit renders. The one-off parts (W statistics, PTI copy) are timed apart from the
per-step figures: the step times come from a global optimizer step hook (one timestamp per step,
the device synchronised), the one-off parts from timing wrappers around `w_statistics` and the
copy; per-step figures are medians over all steps of all repeats. A warm-up inversion
(`--warmup-steps` + 1 steps) and a warm-up render come first; then `--repeats` timed inversions, each followed by the
renders. Peak memory: `torch.cuda.max_memory_allocated`, reset before the inversion and before
the renders. Random weights and a random VGG backbone: only the timing is meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
import types
from pathlib import Path

import benchlib
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from dp360 import cameras
from dp360.panohead import inversion
from dp360.panohead.generator import PanoHeadGenerator, describe, released_config, tiny_config
from dp360.panohead.inversion import InversionSettings, invert, render_views
from dp360.panohead.perceptual import load_lpips, write_random_backbone
from dp360.runtime import resolve_device


class InversionClock:
    """Timestamps of the W statistics, each optimizer step and the PTI copy during `invert`."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list[tuple[str, float]] = []
        self.copy_gib: float | None = None

    def mark(self, name: str) -> None:
        benchlib.synchronize(self.device)
        self.marks.append((name, time.perf_counter()))

    @contextlib.contextmanager
    def installed(self):
        original_statistics, original_copy = inversion.w_statistics, inversion.copy

        def w_statistics(*args, **kwargs):
            self.mark("w_statistics start")
            result = original_statistics(*args, **kwargs)
            self.mark("w_statistics end")
            return result

        def deepcopy(value, *args, **kwargs):
            before = benchlib.allocated_gib(self.device)
            self.mark("copy start")
            result = copy.deepcopy(value, *args, **kwargs)
            self.mark("copy end")
            if before is not None:
                self.copy_gib = benchlib.allocated_gib(self.device) - before
            return result

        hook = register_optimizer_step_post_hook(lambda *_: self.mark("step"))
        inversion.w_statistics = w_statistics
        inversion.copy = types.SimpleNamespace(deepcopy=deepcopy)
        try:
            yield self
        finally:
            hook.remove()
            inversion.w_statistics, inversion.copy = original_statistics, original_copy

    def phases(self) -> dict:
        """W statistics seconds, W+ step seconds, copy seconds, PTI step seconds."""
        names = [name for name, _ in self.marks]
        if "w_statistics end" not in names or "copy end" not in names:
            raise SystemExit(
                "could not find the W statistics and the PTI copy inside invert(); benchmarks/panohead_speed.py "
                "must follow dp360.panohead.inversion"
            )
        times = {name: moment for name, moment in self.marks if name != "step"}
        steps_w = [moment for name, moment in self.marks if name == "step" and moment < times["copy start"]]
        steps_pti = [moment for name, moment in self.marks if name == "step" and moment > times["copy end"]]

        def durations(start: float, stamps: list[float]) -> list[float]:
            edges = [start, *stamps]
            return [b - a for a, b in zip(edges, edges[1:])]

        return {
            "w_statistics": times["w_statistics end"] - times["w_statistics start"],
            "w_steps": durations(times["w_statistics end"], steps_w),
            "copy": times["copy end"] - times["copy start"],
            "pti_steps": durations(times["copy end"], steps_pti),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invert-steps", type=int, default=200)
    parser.add_argument("--pti-steps", type=int, default=5)
    parser.add_argument("--renders", type=int, default=32)
    parser.add_argument("--w-samples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=2, help="W+ steps of the warm-up inversion (+ 1 PTI step)")
    parser.add_argument("--config", default="released", choices=["released", "tiny"], help="generator size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.invert_steps < 1 or args.pti_steps < 1 or args.renders < 1 or args.repeats < 1:
        parser.error("--invert-steps, --pti-steps, --renders and --repeats must be at least 1")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = released_config() if args.config == "released" else tiny_config()
    generator = PanoHeadGenerator(config).to(device).eval().requires_grad_(False)
    resolution = generator.config.img_resolution
    with tempfile.TemporaryDirectory() as folder:
        lpips = load_lpips(device, write_random_backbone(Path(folder) / "vgg16.pth"))
    target = torch.rand(1, 3, resolution, resolution) * 2 - 1
    camera = torch.from_numpy(cameras.orbit_labels(1))
    labels = torch.from_numpy(cameras.orbit_labels(args.renders))
    print(describe(generator), "on", benchlib.device_description(device))

    # Warm-up: kernels chosen, memory pools grown, LPIPS weights touched.
    warm = InversionSettings(invert_steps=args.warmup_steps, pti_steps=1, w_avg_samples=min(args.w_samples, 2048))
    result = invert(generator, target, camera, lpips, warm, progress=False)
    render_views(result.generator, result.ws, labels[: min(4, args.renders)])
    del result

    settings = InversionSettings(invert_steps=args.invert_steps, pti_steps=args.pti_steps, w_avg_samples=args.w_samples)
    runs = []
    for _ in range(args.repeats):
        clock = InversionClock(device)
        benchlib.reset_peak(device)
        with clock.installed(), benchlib.Stopwatch(device) as whole:
            result = invert(generator, target, camera, lpips, settings, progress=False)
        phases = clock.phases()
        inversion_peak = benchlib.peak_gib(device)
        benchlib.reset_peak(device)
        with benchlib.Stopwatch(device) as render_clock:
            render_views(result.generator, result.ws, labels)
        del result
        runs.append(
            {
                **phases,
                "inversion_seconds": whole.seconds,
                "render_seconds": render_clock.seconds,
                "copy_gib": clock.copy_gib,
                "inversion_peak_gib": inversion_peak,
                "render_peak_gib": benchlib.peak_gib(device),
            }
        )

    w_steps = [step for run in runs for step in run["w_steps"]]
    pti_steps = [step for run in runs for step in run["pti_steps"]]
    statistics_s = benchlib.median(run["w_statistics"] for run in runs)
    copy_s = benchlib.median(run["copy"] for run in runs)
    render_s = benchlib.median(run["render_seconds"] for run in runs)
    inversion_s = benchlib.median(run["inversion_seconds"] for run in runs)
    per_step = benchlib.median(w_steps)
    per_pti = benchlib.median(pti_steps)
    per_render = render_s / args.renders
    print(f"{args.repeats} repeats after a warm-up; medians")
    print(
        f"W statistics: {args.w_samples} samples in {statistics_s:.2f} s "
        f"({benchlib.spread([run['w_statistics'] for run in runs], digits=2)})"
    )
    print(
        f"W+ inversion: {args.invert_steps} steps, {per_step:.3f} s/step (median step; mean "
        f"{sum(w_steps) / len(w_steps):.3f}, slowest {max(w_steps):.3f})"
    )
    print(
        f"PTI generator copy: {copy_s:.3f} s"
        + (f", +{benchlib.median(run['copy_gib'] for run in runs):.2f} GiB" if benchlib.is_cuda(device) else "")
    )
    print(
        f"PTI: {args.pti_steps} steps, {per_pti:.3f} s/step (median step; mean {sum(pti_steps) / len(pti_steps):.3f}, "
        f"slowest {max(pti_steps):.3f})"
    )
    print(
        f"whole inversion: {inversion_s:.2f} s ({benchlib.spread([run['inversion_seconds'] for run in runs], digits=2)})"
    )
    print(
        f"renders: {args.renders} at {resolution} x {resolution} in {render_s:.2f} s ({per_render:.3f} s/render, "
        f"batch 4; {benchlib.spread([run['render_seconds'] for run in runs], digits=2)})"
    )
    # The stage renders the fitted view once more, then the orbit frames.
    stage = inversion_s + (args.renders + 1) * per_render
    print(f"noise stage estimate (inversion + {args.renders + 1} renders, without file writing): {stage:.1f} s")
    if benchlib.is_cuda(device):
        print(
            f"peak GPU memory: inversion {max(run['inversion_peak_gib'] for run in runs):.2f} GiB, renders "
            f"{max(run['render_peak_gib'] for run in runs):.2f} GiB"
        )
    benchlib.write_json(
        args.json,
        {
            "benchmark": "panohead_speed",
            "device": benchlib.device_description(device),
            "settings": vars(args),
            "w_statistics_seconds": statistics_s,
            "w_step_seconds": per_step,
            "copy_seconds": copy_s,
            "pti_step_seconds": per_pti,
            "inversion_seconds": inversion_s,
            "render_seconds": per_render,
            "stage_estimate_seconds": stage,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
