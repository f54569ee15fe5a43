"""The `dp360` command: argument parsing and presentation over the `dp360` library."""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console

import dp360

app = typer.Typer(
    name="dp360",
    help=(
        "One portrait to 32 consistent 360-degree views of the whole head (DiffPortrait360), "
        "a radiance field, a turntable video and a mesh."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Human-readable output goes to stderr so that --json keeps stdout machine-readable.
err_console = Console(stderr=True, highlight=False)


class Detector(str, Enum):
    auto = "auto"
    retinaface = "retinaface"
    dlib = "dlib"


class DType(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder of the run (created; resumed if it holds a run).", show_default=False)]
DetectorOption = Annotated[Detector, typer.Option(help="Face detector: RetinaFace (facexlib) with an offline dlib fallback under 'auto'.")]
DetectorWeightsOption = Annotated[Optional[Path], typer.Option(help="Folder holding RetinaFace's detection_Resnet50_Final.pth (default: the dp360 cache).", show_default=False)]
NoCropOption = Annotated[bool, typer.Option("--no-crop", help="The portrait is already aligned like PanoHead's crops (stylized or cartoon heads that detectors miss).")]
YawOption = Annotated[Optional[float], typer.Option(help="Camera yaw in degrees instead of the estimate (0 frontal, > 0 the subject's left).", show_default=False)]
PitchOption = Annotated[Optional[float], typer.Option(help="Camera elevation in degrees instead of the estimate (> 0 camera above the eyes).", show_default=False)]
FaceIndexOption = Annotated[Optional[int], typer.Option(help="Which face to use when there are several (0 = largest).", show_default=False)]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DTypeOption = Annotated[DType, typer.Option(help="Compute precision (auto: fp16 on CUDA, fp32 elsewhere).")]
SeedOption = Annotated[int, typer.Option(help="Random seed of the run.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Redo stages even when their inputs and settings are unchanged.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json).")]


class ConsoleReporter:
    """Shows stage progress with rich on stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._status = None

    def stage_started(self, name: str, description: str) -> None:
        if not self.quiet:
            self._status = err_console.status(f"[bold]{name}[/]: {description} ...")
            self._status.start()

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        # A failure is reported once, by the error message itself.
        if not self.quiet and outcome != "failed":
            timing = f" in {seconds:.1f} s" if seconds else ""
            err_console.print(f"[green]✓[/] [bold]{name}[/]: {outcome}{timing}")

    def note(self, message: str) -> None:
        if not self.quiet:
            err_console.print(f"[yellow]note:[/] {message}", soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn dp360's user-facing errors into one line on stderr and a non-zero exit."""
    from dp360.errors import Dp360Error

    try:
        yield
    except Dp360Error as error:
        err_console.print(f"[red]error:[/] {error}", soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]: finished stages are kept; rerun the same command to resume.")
        raise typer.Exit(130) from None


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dp360 {dp360.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """dp360: 360-degree heads from one portrait."""


def _print_summary(summary, as_json: bool, quiet: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
        return
    if quiet:
        return
    err_console.print(f"[bold]{summary.status}[/]: {summary.out_dir}")
    for rel in summary.outputs:
        err_console.print(f"  {rel}")


def _prepare_settings(detector, detector_weights, no_crop, yaw, pitch, face_index):
    from dp360.prepare import PrepareSettings

    return PrepareSettings(
        detector=detector.value,
        no_crop=no_crop,
        yaw=yaw,
        pitch=pitch,
        face_index=face_index,
        detector_weights=str(detector_weights) if detector_weights else None,
    )


@app.command()
def prepare(
    image: Annotated[Path, typer.Argument(help="Portrait image (PNG, JPEG, WebP, TIFF, ...).", show_default=False)],
    out: OutOption,
    detector: DetectorOption = Detector.auto,
    detector_weights: DetectorWeightsOption = None,
    no_crop: NoCropOption = False,
    yaw: YawOption = None,
    pitch: PitchOption = None,
    face_index: FaceIndexOption = None,
    device: DeviceOption = "auto",
    force: ForceOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Detect the face, crop it like PanoHead's data and estimate its camera.

    Writes OUT/prepared/crop.png (512x512), dataset.json (PanoHead camera label), overlay.png
    (detection, landmarks, crop and pose drawn on the input) and face.json, plus OUT/input.png
    and OUT/run.json.
    """
    from dp360.run import RunOptions
    from dp360.run import prepare as prepare_run

    with user_errors():
        settings = _prepare_settings(detector, detector_weights, no_crop, yaw, pitch, face_index)
        summary = prepare_run(image, out, settings, RunOptions(device=device, force=force), ConsoleReporter(quiet or json_output))
    _print_summary(summary, json_output, quiet)


@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="One or more portraits; several go to OUT/<stem>/ one after another.", show_default=False)],
    out: OutOption,
    detector: DetectorOption = Detector.auto,
    detector_weights: DetectorWeightsOption = None,
    no_crop: NoCropOption = False,
    yaw: YawOption = None,
    pitch: PitchOption = None,
    face_index: FaceIndexOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    seed: SeedOption = 42,
    force: ForceOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Everything: prepare -> 3D-aware noise -> back view -> 32 views -> NeRF -> turntable + mesh.

    Stages this version does not have yet are listed and recorded in run.json as not available.
    """
    from dp360.errors import Dp360Error
    from dp360.run import RunOptions
    from dp360.run import reconstruct as reconstruct_run

    settings = _prepare_settings(detector, detector_weights, no_crop, yaw, pitch, face_index)
    options = RunOptions(device=device, dtype=None if dtype is DType.auto else dtype.value, seed=seed, force=force)
    reporter = ConsoleReporter(quiet or json_output)
    if len(images) == 1:
        with user_errors():
            summary = reconstruct_run(images[0], out, settings, options, reporter)
        _print_summary(summary, json_output, quiet)
        return
    stems = [image.stem for image in images]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        err_console.print(f"[red]error:[/] several inputs share the name {', '.join(duplicates)}; rename them so each gets its own OUT/<stem>/ folder.")
        raise typer.Exit(2)
    results, failures = [], 0
    for image in images:
        try:
            summary = reconstruct_run(image, out / image.stem, settings, options, reporter)
            results.append(summary.as_dict())
            if not (quiet or json_output):
                err_console.print(f"[bold]{summary.status}[/]: {image} -> {summary.out_dir}")
        except Dp360Error as error:
            failures += 1
            results.append({"input": str(image), "status": "failed", "error": str(error)})
            err_console.print(f"[red]error:[/] {image}: {error}", soft_wrap=True)
    if json_output:
        sys.stdout.write(json.dumps({"runs": results}, indent=2) + "\n")
    if failures:
        err_console.print(f"[red]{failures} of {len(images)} portraits failed[/]; the others are complete.")
        raise typer.Exit(2)


@app.command()
def doctor(json_output: JsonOption = False) -> None:
    """Check this machine: torch/CUDA, GPU memory, packages, weight cache, disk, video encoding."""
    from dp360.doctor import FAIL, run_checks

    checks = run_checks()
    if json_output:
        sys.stdout.write(json.dumps([check.as_dict() for check in checks], indent=2) + "\n")
    else:
        colours = {"OK": "green", "WARN": "yellow", "FAIL": "red"}
        for check in checks:
            line = f"[{colours[check.status]}]{check.status:<4}[/] [bold]{check.name}[/]: {check.detail}"
            if check.advice:
                line += f" [dim]-> {check.advice}[/]"
            err_console.print(line, soft_wrap=True)
    if any(check.status == FAIL for check in checks):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
