"""Seconds from starting `dp360 app` to its first page, as a user waits for it (the issue's target:
within 5 s on a CPU).

    python benchmarks/app_start.py [--repeats 3] [--json PATH]

Each repeat starts `dp360 app --port 0` in a fresh process (a new runs folder), reads the URL it
prints, and fetches the page until it answers 200; the process is then stopped with Ctrl-C. The
first repeat warms the disk cache; the median of the others is reported (with every repeat).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchlib

TARGET_SECONDS = 5.0


def once(folder: Path) -> float:
    dp360 = Path(sys.executable).parent / "dp360"
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(dp360), "app", "--port", "0", "--runs", str(folder / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"dp360 app printed no URL (got {url!r})")
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200 and b"<html" in answer.read(4096).lower():
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="accepted for run_all.py; the app starts with no model")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the first warms up)")
    seconds = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            seconds.append(once(Path(folder)))
        print(f"repeat {repeat + 1}: {seconds[-1]:.2f} s", flush=True)
    measured = benchlib.median(seconds[1:])
    verdict = "met" if measured <= TARGET_SECONDS else "NOT met"
    print(f"{benchlib.device_description('cpu')}")
    print(f"first page: median {measured:.2f} s after warm-up ({benchlib.spread(seconds[1:], digits=2)} s)")
    print(f"target first page within {TARGET_SECONDS:g} s: {verdict}")
    benchlib.write_json(
        args.json,
        {"benchmark": "app_start", "seconds": seconds, "median_seconds": measured, "target_seconds": TARGET_SECONDS},
    )


if __name__ == "__main__":
    main()
