"""What a bit-for-bit reproducible radiance-field fit costs on a CPU.

    python benchmarks/fit_determinism.py [--size 64] [--preset cpu|test] [--iterations 100] [--repeats 3]

dp360 fits on a CPU with PyTorch's deterministic algorithms on (`dp360.nerf.common.deterministic_on`),
so that a seeded run reproduces its field, turntable and mesh exactly. This fits the same synthetic
head alternately with and without them, in one process, after a warm-up fit, and prints the seconds
per iteration of each and whether two deterministic fits gave identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import torch

from dp360.nerf import fit as fit_module
from dp360.nerf import synthetic
from dp360.nerf import train as train_module
from dp360.nerf.common import FitSettings


def _fit(views: Path, folder: Path, settings, deterministic: bool) -> tuple[float, dict]:
    original = train_module.deterministic_on
    if not deterministic:
        train_module.deterministic_on = lambda device: contextlib.nullcontext()
    try:
        folder.mkdir()
        summary = fit_module.fit_field(views, folder, settings, "cpu", progress=False)
    finally:
        train_module.deterministic_on = original
    (checkpoint,) = folder.rglob("step-*.ckpt")
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["pipeline"]
    return summary["fit_seconds"] / settings.iterations, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--preset", default="test")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = FitSettings.preset(args.preset, iterations=args.iterations)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        views = synthetic.write_views(root / "views", size=args.size)
        _fit(views, root / "warm-up", settings, True)
        times: dict[bool, list[float]] = {True: [], False: []}
        weights: dict[bool, list[dict]] = {True: [], False: []}
        for repeat in range(args.repeats):
            for deterministic in (True, False):
                seconds, state = _fit(views, root / f"{deterministic}-{repeat}", settings, deterministic)
                times[deterministic].append(seconds)
                weights[deterministic].append(state)

    def identical(states: list[dict]) -> bool:
        return all(torch.equal(states[0][key], other[key]) for other in states[1:] for key in states[0])

    print(
        f"cpu, {torch.get_num_threads()} threads, preset {args.preset}, {args.iterations} iterations, "
        f"{args.size} px views, {args.repeats} repeats"
    )
    for deterministic, label in ((True, "deterministic"), (False, "default")):
        median = statistics.median(times[deterministic])
        print(
            f"{label:>13}: {median * 1000:.1f} ms/iteration (median; "
            f"{', '.join(f'{t * 1000:.1f}' for t in times[deterministic])}); "
            f"identical weights across repeats: {identical(weights[deterministic])}"
        )
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"deterministic / default: {ratio:.2f}x")


if __name__ == "__main__":
    main()
