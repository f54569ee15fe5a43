"""Seconds per portrait of the prepare stage (detection, crop, pose, files) on this machine.

    python benchmarks/prepare_speed.py [--detector dlib,retinaface] [--repeats 5] [--size 512]
        [--device auto] [--json PATH]

Runs on the bundled portrait, upscaled to `--size` px (detection itself runs on at most 1024 px).
Each detector first prepares it once untimed (models loaded, caches warm); then `--repeats`
rounds, the detectors alternating in an order rotated each round. A detector that cannot run
here (RetinaFace without its cached weights, offline) is reported and skipped. Prints the
median and minimum seconds per detector.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib
from PIL import Image

from dp360.imaging import load_portrait
from dp360.prepare import PrepareSettings, prepare_portrait
from dp360.runtime import resolve_device

ASTRONAUT = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="dlib", help="comma-separated: dlib, retinaface")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    detectors = [name.strip() for name in args.detector.split(",") if name.strip()]
    results: dict[str, dict] = {}
    print(benchlib.device_description(device))
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "portrait.png"
        Image.open(ASTRONAUT).convert("RGB").resize((args.size, args.size), Image.LANCZOS).save(source)
        image = load_portrait(source)
        available = []
        for name in detectors:  # warm-up: loads the models
            try:
                prepare_portrait(image, Path(folder) / f"warmup-{name}", PrepareSettings(detector=name), device=device)
                available.append(name)
            except Exception as error:  # noqa: BLE001 - a detector that cannot run here is reported
                print(f"prepare[{name}]: not available here ({type(error).__name__}: {error})")
                results[name] = {"error": f"{type(error).__name__}: {error}"}
        seconds: dict[str, list[float]] = {name: [] for name in available}
        for repeat in range(args.repeats):
            for name in benchlib.rotated(available, repeat) if available else []:
                start = time.perf_counter()
                prepare_portrait(
                    image, Path(folder) / f"run-{name}-{repeat}", PrepareSettings(detector=name), device=device
                )
                seconds[name].append(time.perf_counter() - start)
    for name in available:
        median = benchlib.median(seconds[name])
        results[name] = {"median_seconds": median, "min_seconds": min(seconds[name]), "seconds": seconds[name]}
        print(
            f"prepare[{name}] {args.size}px on {device}: median {median:.3f} s, min {min(seconds[name]):.3f} s "
            f"over {args.repeats} runs ({benchlib.spread(seconds[name])})"
        )
    benchlib.write_json(
        args.json,
        {
            "benchmark": "prepare_speed",
            "device": benchlib.device_description(device),
            "settings": vars(args),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
