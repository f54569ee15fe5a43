"""Seconds per view, time per component and peak memory of the back view + 360 views, with
full-size random weights.

    python benchmarks/views_speed.py [--family sd15|tiny] [--size 512] [--views 32] [--steps 50]
        [--dtype fp16,autocast] [--repeats 3] [--warmup-steps 2] [--call-arg KEY=VALUE] [--device auto]
        [--json PATH]

Variants compared: dp360's work pattern in each `--dtype` (fp16 weights, or `autocast`: fp32 weights
under CUDA's fp16 autocast, as the release runs; the pipeline's defaults: one
reference-network pass per step serves every chunk, no ControlNet in the unconditional pass, and
its other shortcuts), and the reference-faithful pattern (`share_reference_pass=False`: the
reference network at batch 8 for every chunk and step) in the first dtype
(`--no-reference-pattern` drops it). Each variant runs the back view
(BackViewPipeline, 1 frame) and then the views (Portrait360Pipeline), as the views stage does.

Method: the weights are built once (~2.7 B parameters, each in its own storage on the device) and
cast to the variant's dtype before it runs. Every variant first runs a warm-up with
`--warmup-steps` steps (same shapes: kernels chosen, memory pools grown), then `--repeats` timed
runs in an order rotated each repeat (A B C, B C A, C A B). Times: wall clock with the device
synchronised; per component by forward hooks (CUDA events on a GPU, perf_counter on a CPU),
medians over the repeats. Peak memory: `torch.cuda.max_memory_allocated`, reset before each phase
of each run. The back-view pipeline reuses the main bundle's modules (same shapes as the real
back bundle, whose weights are ~0.4 B parameters fewer); the stage frees the back model before
loading the main one, so the views phase is the peak that matters. Random weights: the images
mean nothing, the timings do.
"""

from __future__ import annotations

import argparse
import ast
import sys

import benchlib
import numpy as np
import torch

from dp360.diffusion.models.components import MAIN_COMPONENTS
from dp360.diffusion.models.configs import FAMILIES
from dp360.runtime import DTYPES, precision_context, resolve_device, torch_dtype

COMPONENTS = (
    "unet cond",
    "unet uncond",
    "temporal (inside unet)",
    "controlnet",
    "camera embedding (in or beside controlnet)",
    "reference network",
    "vae encode",
    "vae decode",
    "text encoder",
)
NESTED = ("temporal (inside unet)", "camera embedding (in or beside controlnet)")  # not added to the sum
# The targets (one H100, 512 x 512, 50 steps, 32 views, fp16).
TARGET_SECONDS_PER_VIEW = 1.0
TARGET_PEAK_GB = 12.0


def build_pipelines(family, device: str, dtype: torch.dtype, seed: int):
    from diffusers import DDIMScheduler

    from dp360.diffusion.pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline

    main = benchlib.random_components(family, MAIN_COMPONENTS, device, dtype, seed)
    back = {
        # A module object of its own: the main UNet carries the temporal hooks.
        "unet": benchlib.same_weights_module(family, "unet", main["unet"]),
        **{name: main[name] for name in ("reference_unet", "controlnet", "vae", "text_encoder")},
    }
    views = Portrait360Pipeline(scheduler=DDIMScheduler(**family.scheduler), **main)
    back_view = BackViewPipeline(scheduler=DDIMScheduler(**family.scheduler), **back)
    for pipeline in (views, back_view):
        pipeline.set_progress_bar_config(disable=True)
    return views, back_view, main


def cast(modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
    for module in modules.values():
        if module.dtype != dtype:
            module.to(dtype)


def run_once(
    views, back_view, inputs: dict, steps: int, shared: bool, device: str, timer, call_args: dict | None = None
) -> dict:
    """One back view then the views; seconds, peak memory and component seconds of each phase."""
    result: dict = {}
    benchlib.reset_peak(device)
    timer.start()
    with benchlib.Stopwatch(device) as clock:
        back_view(
            inputs["front"],
            inputs["cameras"][0],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    result["back_components"] = timer.stop()
    result["back_seconds"], result["back_peak_gib"] = clock.seconds, benchlib.peak_gib(device)
    benchlib.reset_peak(device)
    timer.start()
    with benchlib.Stopwatch(device) as clock:
        views(
            front_image=inputs["front"],
            back_image=inputs["back"],
            camera_images=inputs["cameras"],
            noise_frames=inputs["noise"],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            share_reference_pass=shared,
            **(call_args or {}),
        )
    result["views_components"] = timer.stop()
    result["views_seconds"], result["views_peak_gib"] = clock.seconds, benchlib.peak_gib(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the family's, 512 for sd15)")
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated from fp16,bf16,fp32,autocast (fp32 weights under fp16 autocast, as the release runs); "
        "default fp16,autocast on CUDA, bf16 on a CPU",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--no-reference-pattern", action="store_true", help="skip the reference-faithful variant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--call-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra argument of the Portrait360Pipeline call for every variant (e.g. chunks_per_call=2); repeatable",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    call_args = {}
    for item in args.call_arg:
        key, _, text = item.partition("=")
        try:
            call_args[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            call_args[key] = text
    if args.repeats < 1 or args.steps < 1 or args.warmup_steps < 1:
        parser.error("--repeats, --steps and --warmup-steps must be at least 1")
    device = resolve_device(args.device)
    dtype_names = (args.dtype or ("fp16,autocast" if benchlib.is_cuda(device) else "bf16")).split(",")
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
        if name == "autocast" and not benchlib.is_cuda(device):
            parser.error("autocast (fp32 weights under CUDA's fp16 autocast) needs a CUDA GPU")
    family = benchlib.family_at(args.family, args.size)
    size = family.image_size
    benchlib.quiet_libraries()

    variants = [{"label": f"dp360 {name}", "dtype": name, "shared": True} for name in dtype_names]
    if not args.no_reference_pattern:
        variants.append({"label": f"reference-faithful {dtype_names[0]}", "dtype": dtype_names[0], "shared": False})

    views, back_view, modules = build_pipelines(family, device, torch_dtype(dtype_names[0]), args.seed)
    weights = {name: benchlib.parameter_count(module) for name, module in modules.items()}
    timer = benchlib.ComponentTimer(device)
    benchlib.watch_pipeline(timer, views)
    benchlib.watch_pipeline(timer, back_view)
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noqa: E731
    inputs = {
        "front": image(),
        "back": image(),
        "cameras": [image() for _ in range(args.views)],
        "noise": [image() for _ in range(args.views)],
    }
    print(
        f"{benchlib.device_description(device)}; family {family.name}, {size} x {size}, {args.views} views, "
        f"{args.steps} steps, {args.repeats} repeats after a {args.warmup_steps}-step warm-up per variant"
        + (f"; pipeline arguments {call_args}" if call_args else "")
    )
    print(
        "weights: "
        + ", ".join(f"{name} {count / 1e6:.0f} M" for name, count in weights.items())
        + f" ({sum(weights.values()) / 1e9:.2f} B parameters)"
    )
    sys.stdout.flush()

    for variant in variants:  # warm-up
        cast(modules, torch_dtype(variant["dtype"]))
        with precision_context(variant["dtype"], device):
            run_once(views, back_view, inputs, args.warmup_steps, variant["shared"], device, timer, call_args)
    runs: dict[str, list[dict]] = {variant["label"]: [] for variant in variants}
    weights_gib: dict[str, float | None] = {}
    for repeat in range(args.repeats):
        for variant in benchlib.rotated(variants, repeat):
            cast(modules, torch_dtype(variant["dtype"]))
            weights_gib[variant["label"]] = benchlib.allocated_gib(device)
            with precision_context(variant["dtype"], device):
                runs[variant["label"]].append(
                    run_once(views, back_view, inputs, args.steps, variant["shared"], device, timer, call_args)
                )
    timer.remove()

    results = {}
    for variant in variants:
        label, records = variant["label"], runs[variant["label"]]
        views_s = [record["views_seconds"] for record in records]
        back_s = [record["back_seconds"] for record in records]
        total_s = [v + b for v, b in zip(views_s, back_s)]
        peaks = [
            max(record["back_peak_gib"], record["views_peak_gib"]) for record in records if record["views_peak_gib"]
        ]
        components = {
            phase: {
                name: benchlib.median(record[f"{phase}_components"].get(name, 0.0) for record in records)
                for name in COMPONENTS + tuple(f"{component} calls" for component in COMPONENTS)
            }
            for phase in ("back", "views")
        }
        results[label] = {
            "dtype": variant["dtype"],
            "shared_reference_pass": variant["shared"],
            "views_seconds": views_s,
            "back_seconds": back_s,
            "seconds_per_view": benchlib.median(views_s) / args.views,
            "seconds_per_view_with_back": benchlib.median(total_s) / args.views,
            "peak_gib": max(peaks) if peaks else None,
            "views_peak_gib": max((record["views_peak_gib"] or 0) for record in records) or None,
            "back_peak_gib": max((record["back_peak_gib"] or 0) for record in records) or None,
            "weights_gib": weights_gib.get(label),
            "components": components,
        }
        print(f"\n{label}:")
        print(
            f"  views: {results[label]['seconds_per_view']:.3f} s/view, median of {benchlib.spread(views_s, digits=2)} s "
            f"for {args.views} views ({benchlib.median(views_s) / args.steps:.3f} s/step)"
        )
        print(
            f"  back view: {benchlib.median(back_s):.2f} s ({benchlib.spread(back_s, digits=2)}); back + views: "
            f"{results[label]['seconds_per_view_with_back']:.3f} s/view"
        )
        if benchlib.is_cuda(device):
            print(
                f"  peak GPU memory: views phase {results[label]['views_peak_gib']:.2f} GiB, back phase "
                f"{results[label]['back_peak_gib']:.2f} GiB (weights resident: {results[label]['weights_gib']:.2f} GiB)"
            )
        for phase, total in (("views", benchlib.median(views_s)), ("back view", benchlib.median(back_s))):
            table = components["views" if phase == "views" else "back"]
            measured = sum(table[name] for name in COMPONENTS if name not in NESTED)
            parts = [
                f"{name} {table[name]:.2f} s ({table[name] / total:.0%}, {table[name + ' calls']:.0f} calls)"
                for name in COMPONENTS
                if table[f"{name} calls"]
            ]
            print(f"  {phase} per run: " + "; ".join(parts) + f"; rest {total - measured:.2f} s")

    print()
    first = f"dp360 {dtype_names[0]}"
    faithful = f"reference-faithful {dtype_names[0]}"
    if faithful in results:
        ratio = benchlib.median(results[faithful]["views_seconds"]) / benchlib.median(results[first]["views_seconds"])
        print(f"speed-up of dp360 over the reference work pattern ({dtype_names[0]}, views): {ratio:.2f}x")
    for other in dtype_names[1:]:
        ratio = benchlib.median(results[f"dp360 {other}"]["views_seconds"]) / benchlib.median(
            results[first]["views_seconds"]
        )
        print(f"{other} / {dtype_names[0]} time (dp360, views): {ratio:.2f}")

    target_settings = (
        benchlib.is_cuda(device)
        and args.family == "sd15"
        and size == 512
        and args.steps == 50
        and args.views == 32
        and "fp16" in dtype_names
    )
    verdicts = {}
    if "dp360 fp16" in results:
        measured = results["dp360 fp16"]
        verdicts = {
            "seconds_per_view_with_back": (measured["seconds_per_view_with_back"], TARGET_SECONDS_PER_VIEW),
            "peak_gb": ((measured["peak_gib"] or float("nan")) * benchlib.GIB / 1e9, TARGET_PEAK_GB),
        }
    if target_settings:
        for name, (value, limit) in verdicts.items():
            print(f"target {name} <= {limit}: {value:.3f} -> {'met' if value <= limit else 'NOT met'}")
    else:
        print(
            f"targets (H100, 512 px, 50 steps, 32 views, fp16: <= {TARGET_SECONDS_PER_VIEW} s/view, peak <= "
            f"{TARGET_PEAK_GB} GB) not judged: these settings or this device differ"
        )
    benchlib.write_json(
        args.json,
        {
            "benchmark": "views_speed",
            "device": benchlib.device_description(device),
            "settings": {**vars(args), "size": size, "dtypes": dtype_names},
            "parameters": weights,
            "results": results,
            "targets_judged": target_settings,
        },
    )


if __name__ == "__main__":
    main()
