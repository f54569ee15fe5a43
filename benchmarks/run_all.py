"""Run every benchmark and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # full size, on a CUDA GPU (the issue's targets)
    python benchmarks/run_all.py --quick    # reduced sizes on a CPU (~10 minutes): checks that
                                            # everything runs; its numbers are not the targets'

Each benchmark runs in its own process (one model set at a time; a crash or a timeout costs only
that benchmark), then `dp360 doctor --smoke` is timed. RESULTS.md gets the date, the device, the
versions (torch, CUDA, diffusers, transformers, nerfstudio), the git commit, a table of the
issue's targets against what was measured (judged only at the targets' settings), and each
benchmark's command and full output. It is rewritten after every benchmark, so an interrupted
session keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class Benchmark:
    name: str
    script: str
    full: list[str]
    quick: list[str]
    result: dict = field(default_factory=dict)


BENCHMARKS = [
    Benchmark(
        "prepare_speed",
        "prepare_speed.py",
        ["--detector", "dlib,retinaface", "--repeats", "5"],
        ["--detector", "dlib,retinaface", "--repeats", "3"],
    ),
    Benchmark("app_start", "app_start.py", ["--repeats", "4"], ["--repeats", "3"]),  # `dp360 app`'s first page
    Benchmark(
        "pose_accuracy",
        "pose_accuracy.py",
        ["--subjects", "12", "--yaw-step", "10", "--pitch-step", "10"],  # CPU only, about 20 s
        ["--subjects", "12", "--yaw-step", "10", "--pitch-step", "10"],
    ),
    Benchmark(
        "views_speed",
        "views_speed.py",
        [
            "--family",
            "sd15",
            "--size",
            "512",
            "--views",
            "32",
            "--steps",
            "50",
            "--dtype",
            "fp16,autocast",  # the release runs fp32 weights under fp16 autocast
            "--repeats",
            "3",
        ],
        # bf16: fp32 would need 11 GB for the weights; fp16 has no fast CPU kernels.
        ["--family", "sd15", "--size", "64", "--views", "8", "--steps", "1", "--dtype", "bf16", "--repeats", "3"]
        + ["--warmup-steps", "1"],
    ),
    Benchmark(
        "panohead_speed",
        "panohead_speed.py",
        ["--invert-steps", "200", "--pti-steps", "5", "--renders", "32", "--w-samples", "10000", "--repeats", "3"],
        ["--invert-steps", "2", "--pti-steps", "1", "--renders", "1", "--w-samples", "1000", "--repeats", "1"]
        + ["--warmup-steps", "1"],
    ),
    Benchmark(
        "nerf_quality",
        "nerf_quality.py",
        ["--size", "256"],  # the gpu preset on CUDA
        ["--size", "64", "--preset", "test", "--iterations", "150"],
    ),
    Benchmark(
        "reconstruct_e2e",
        "reconstruct_e2e.py",
        ["--repeats", "2"],  # every setting at its default: 512 px, 32 views, 50 steps, fp16
        ["--family", "sd15", "--size", "64", "--views", "8", "--steps", "1", "--dtype", "bf16"]
        + ["--invert-steps", "1", "--pti-steps", "1", "--panohead", "tiny", "--fit-preset", "test"]
        + [
            "--fit-iterations",
            "30",
            "--frames",
            "4",
            "--resolution",
            "64",
            "--mesh-resolution",
            "32",
            "--repeats",
            "1",
        ],
    ),
    Benchmark(
        "batch_throughput",
        "batch_throughput.py",
        ["--portraits", "16", "--repeats", "2"],  # one worker per GPU, tiny models
        ["--portraits", "6", "--repeats", "2", "--workers", "2"],  # 2 CPU workers against the sequential loop
    ),
    Benchmark(
        "reconstruct_e2e_low_vram",
        "reconstruct_e2e.py",
        ["--low-vram", "--repeats", "1"],
        [],  # --low-vram needs a GPU
    ),
]

TARGETS = (
    ("views: s/view, back view included (H100, 512 px, 50 steps, 32 views, fp16)", "<= 1.0 s"),
    ("peak GPU memory, default", "<= 12 GB"),
    ("peak GPU memory, --low-vram", "<= 8 GB"),
    ("whole `dp360 reconstruct`", "<= 3 min"),
    ("fit: held-out PSNR on the synthetic head at 256 px", ">= 30 dB"),
    ("`dp360 doctor --smoke` on a CPU", "<= 60 s"),
)


def git_state() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, str]:
    import torch

    sys.path.insert(0, str(HERE))
    import benchlib

    facts = {
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "CPU": benchlib.cpu_name(),
        "GPU": benchlib.device_description("cuda") if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        **{name: str(version) for name, version in benchlib.versions().items()},
        "git commit": git_state(),
    }
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if driver:
            facts["NVIDIA driver"] = driver
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def run(command: list[str], timeout: float | None, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as error:
        code = "timeout"
        stdout = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
    return {"returncode": code, "seconds": time.perf_counter() - start, "stdout": stdout, "stderr": stderr}


def dp360_command() -> list[str]:
    script = Path(sys.executable).with_name("dp360")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import main; main()"]


def display(command: list[str]) -> str:
    shown = []
    for part in command:
        path = Path(part)
        if part == sys.executable:
            part = "python"
        elif path.is_absolute() and path.is_relative_to(REPO):
            part = str(path.relative_to(REPO))
        shown.append(part)
    return shlex.join(shown)


def _fmt(value, unit: str, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def targets_table(benchmarks: dict[str, Benchmark], smoke: dict | None, quick: bool) -> list[str]:
    def data(name: str) -> dict:
        return benchmarks[name].result.get("json", {}) if name in benchmarks else {}

    views = data("views_speed")
    e2e, low = data("reconstruct_e2e"), data("reconstruct_e2e_low_vram")
    nerf = data("nerf_quality")
    fp16 = views.get("results", {}).get("dp360 fp16") or next(iter(views.get("results", {}).values()), {})

    def gb(gib):
        return None if gib is None else gib * 2**30 / 1e9

    rows = [
        (
            _fmt(fp16.get("seconds_per_view_with_back"), "s/view", 3)
            + (f" ({_fmt(fp16.get('seconds_per_view'), 's/view', 3)} without it)" if fp16 else ""),
            views.get("targets_judged", False),
            lambda: fp16["seconds_per_view_with_back"] <= 1.0,
        ),
        (
            f"views benchmark {_fmt(gb(fp16.get('peak_gib')), 'GB')}, reconstruct {_fmt(gb(e2e.get('peak_gib')), 'GB')}",
            e2e.get("targets_judged", False) and e2e.get("memory_mode") == "default",
            lambda: gb(e2e["peak_gib"]) <= 12.0,
        ),
        (
            f"reconstruct {_fmt(gb(low.get('peak_gib')), 'GB')}",
            low.get("targets_judged", False) and low.get("memory_mode") == "low-vram",
            lambda: gb(low["peak_gib"]) <= 8.0,
        ),
        (
            _fmt(e2e.get("whole_seconds"), "s", 1),
            e2e.get("targets_judged", False) and e2e.get("memory_mode") == "default",
            lambda: e2e["whole_seconds"] <= 180.0,
        ),
        (
            _fmt(nerf.get("psnr"), "dB")
            + (f" at {nerf['settings']['size']} px, preset {nerf['settings']['preset']}" if nerf else ""),
            nerf.get("target_judged", False),
            lambda: nerf["psnr"] >= 30.0,
        ),
        (
            (_fmt(smoke["seconds"], "s", 1) + " (torch's default threads)" if smoke else "-")
            + (
                f", {smoke['single_thread']['seconds']:.1f} s (one thread)"
                if smoke and smoke.get("single_thread")
                else ""
            ),
            bool(smoke) and smoke.get("returncode") == 0,
            lambda: smoke["seconds"] <= 60.0,
        ),
    ]
    lines = ["| target | required | measured here | verdict |", "|---|---|---|---|"]
    for (label, required), (measured, judged, check) in zip(TARGETS, rows):
        if judged:
            verdict = "met" if check() else "**NOT met**"
        else:
            verdict = "not judged: " + ("CPU quick run, other settings" if quick else "not measured at its settings")
        lines.append(f"| {label} | {required} | {measured} | {verdict} |")
    return lines


def check_lines(result: dict) -> str:
    """doctor's one line per check (its library warnings and progress bars left out), or all of
    its output when it failed."""
    text = result["stderr"] + result["stdout"]
    if result["returncode"] != 0:
        return text.rstrip()
    return "\n".join(line for line in text.splitlines() if line.split(" ", 1)[0] in ("OK", "WARN", "FAIL"))


def write_results(path: Path, args, facts, benchmarks, smoke, command_line: str, finished: bool) -> None:
    quick = args.quick
    lines = ["# dp360 benchmark results", ""]
    if quick:
        lines += [
            "> **CPU quick run.** Reduced sizes (64 x 64 px views, 8 views, 1-3 steps, a tiny or few-step PanoHead, "
            "a short test fit) on a CPU: these numbers only show that every benchmark runs end to end. They are "
            "**not** the GPU targets and must not be compared with them; run `python benchmarks/run_all.py` on "
            "a CUDA GPU for those.",
            "",
        ]
    else:
        lines += ["Full-size run (the issue's target settings where a benchmark's defaults are used).", ""]
    if not finished:
        lines += ["_Incomplete: the run was still going (or was interrupted) when this file was written._", ""]
    lines += [f"Command: `{command_line}`", ""]
    lines += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in facts.items()] + [""]
    lines += ["## Targets of the issue (for GPU runs)", ""]
    lines += targets_table(benchmarks, smoke, quick) + [""]
    lines += [
        "The targets are for one H100: 512 x 512, 50 steps, 32 views, fp16 at most 1.0 s per view; peak GPU memory "
        "at most 12 GB by default and 8 GB with `--low-vram`; the whole `dp360 reconstruct` in at most 3 minutes; "
        "fit PSNR >= 30 dB on the synthetic head at 256 px; and on a CPU `dp360 doctor --smoke` in at most 60 s. "
        "GB = 10^9 bytes; the benchmarks print GiB (2^30).",
        "",
    ]
    lines += ["## Benchmarks", ""]
    for benchmark in benchmarks.values():
        result = benchmark.result
        if not result:
            continue
        lines += [f"### {benchmark.name}", ""]
        lines += [f"`{result['command']}`", ""]
        if result.get("skipped"):
            lines += [f"Skipped: {result['skipped']}", ""]
            continue
        lines += [f"Exit status {result['returncode']}, {result['seconds']:.0f} s wall.", ""]
        lines += ["```", result["stdout"].rstrip() or "(no output)", "```", ""]
        if result["returncode"] != 0:
            tail = "\n".join(result["stderr"].rstrip().splitlines()[-25:])
            lines += ["Last lines of its error output:", "", "```", tail, "```", ""]
    if smoke:
        lines += ["### dp360 doctor --smoke", ""]
        for result in (smoke, smoke.get("single_thread")):
            if not result:
                continue
            lines += [f"`{result['command']}`", ""]
            lines += [f"Exit status {result['returncode']}, {result['seconds']:.1f} s wall (the whole command).", ""]
            lines += ["```", check_lines(result), "```", ""]
        if smoke["returncode"] != 0:
            lines += ["(A non-zero status means a check FAILed; see its line above.)", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes for a CPU (~10 minutes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (and/or 'smoke')")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (default 20 min quick, none full)"
    )
    parser.add_argument("--work-dir", default=None, help="for reconstruct_e2e's bundles (~10 GB at full size)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each benchmark (OMP_NUM_THREADS); default 1 with --quick, else torch's default",
    )
    args = parser.parse_args()
    if args.threads is None and args.quick:
        # On a shared or busy machine, a second OpenMP thread spin-waits for the first: a full-size
        # UNet pass measured 4-7x slower with 2 threads than with 1 beside one other busy process.
        args.threads = 1
    selected = set(args.only.split(",")) if args.only else None
    timeout = args.timeout or (1200 if args.quick else None)
    facts = machine()
    if args.threads:
        facts["CPU threads per benchmark"] = f"{args.threads} (OMP_NUM_THREADS)"
    facts["load average at start (1, 5, 15 min)"] = ", ".join(f"{load:.2f}" for load in os.getloadavg())
    command_line = display([sys.executable, *sys.argv])
    output = Path(args.output)
    benchmarks = {benchmark.name: benchmark for benchmark in BENCHMARKS}
    smoke = None
    with tempfile.TemporaryDirectory() as scratch:
        for benchmark in benchmarks.values():
            if selected is not None and benchmark.name not in selected:
                continue
            arguments = benchmark.quick if args.quick else benchmark.full
            json_path = Path(scratch) / f"{benchmark.name}.json"
            command = [sys.executable, str(HERE / benchmark.script), *arguments, "--device", args.device]
            if benchmark.script == "reconstruct_e2e.py" and args.work_dir:
                command += ["--work-dir", args.work_dir]
            shown = display(command)
            if args.quick and not arguments:
                full = display([sys.executable, str(HERE / benchmark.script), *benchmark.full])
                benchmark.result = {"command": full, "skipped": "needs a CUDA GPU (not run with --quick)"}
                continue
            print(f"[run_all] {shown}", flush=True)
            benchmark.result = {"command": shown, **run([*command, "--json", str(json_path)], timeout, args.threads)}
            if json_path.is_file():
                benchmark.result["json"] = json.loads(json_path.read_text())
            print(
                f"[run_all] {benchmark.name}: exit {benchmark.result['returncode']}, "
                f"{benchmark.result['seconds']:.0f} s",
                flush=True,
            )
            write_results(output, args, facts, benchmarks, smoke, command_line, finished=False)
        if selected is None or "smoke" in selected:
            # As a user runs it (torch's default threads), then with one thread: on a busy machine the
            # second OpenMP thread can cost several times the run (measured: 117 s against 17 s).
            command = [*dp360_command(), "doctor", "--smoke"]
            print(f"[run_all] {display(command)}", flush=True)
            smoke = {"command": display(command), **run(command, timeout, None)}
            print(f"[run_all] smoke: exit {smoke['returncode']}, {smoke['seconds']:.1f} s", flush=True)
            single = run(command, timeout, 1)
            smoke["single_thread"] = {"command": "OMP_NUM_THREADS=1 " + display(command), **single}
            print(f"[run_all] smoke, one thread: exit {single['returncode']}, {single['seconds']:.1f} s", flush=True)
    facts["load average at the end (1, 5, 15 min)"] = ", ".join(f"{load:.2f}" for load in os.getloadavg())
    write_results(output, args, facts, benchmarks, smoke, command_line, finished=True)
    print(f"[run_all] wrote {output}")
    failed = [b.name for b in benchmarks.values() if b.result and b.result.get("returncode") not in (0, None)]
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
