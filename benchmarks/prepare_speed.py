"""Seconds per portrait of the prepare stage (detection, crop, pose, files) on this machine.

    python benchmarks/prepare_speed.py [--detector dlib|retinaface] [--repeats 5] [--size 512]

Prints one line per detector with the median of `--repeats` runs on the bundled portrait,
upscaled to `--size` px (detection itself runs on at most 1024 px).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from dp360.imaging import load_portrait
from dp360.prepare import PrepareSettings, prepare_portrait
from dp360.runtime import resolve_device

ASTRONAUT = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="dlib", choices=["dlib", "retinaface"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "portrait.png"
        Image.open(ASTRONAUT).convert("RGB").resize((args.size, args.size), Image.LANCZOS).save(source)
        image = load_portrait(source)
        settings = PrepareSettings(detector=args.detector)
        prepare_portrait(image, Path(folder) / "warmup", settings, device=device)  # loads the models
        seconds = []
        for index in range(args.repeats):
            start = time.perf_counter()
            prepare_portrait(image, Path(folder) / f"run{index}", settings, device=device)
            seconds.append(time.perf_counter() - start)
    print(
        f"prepare[{args.detector}] {args.size}px on {device}: median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
