"""The `dp360` command: argument parsing and presentation over the `dp360` library."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

import dp360
from dp360 import cache
from dp360 import weights as weight_files
from dp360.diffusion.models.configs import FAMILIES


def _show_flags_bare(command, ctx) -> None:
    """Typer's rich help prints a value placeholder (`<bool>`) after every flag, as if it took a
    value; an empty metavar shows flags (and --help) bare."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        _show_flags_bare(self, ctx)
        return super().format_help(ctx, formatter)


class Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        _show_flags_bare(self, ctx)
        return super().format_help(ctx, formatter)


app = typer.Typer(
    name="dp360",
    cls=Group,
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
    autocast = "autocast"


class FitPreset(str, Enum):  # dp360.nerf.common.FIT_PRESETS (not imported here: it loads torch)
    gpu = "gpu"
    cpu = "cpu"
    test = "test"


class FieldKind(str, Enum):  # dp360.nerf.stage.FIELDS (not imported here: it loads torch)
    nerfacto = "nerfacto"
    splatfacto = "splatfacto"


class MeshFormat(str, Enum):  # dp360.nerf.mesh.MESH_FORMATS (not imported here: it loads torch)
    glb = "glb"
    obj = "obj"
    ply = "ply"


class TextureSource(str, Enum):  # dp360.nerf.mesh.TEXTURE_SOURCES (not imported here: it loads torch)
    views = "views"
    field = "field"
    vertex = "vertex"


class VideoFormat(str, Enum):  # dp360.nerf.render.FORMATS (not imported here: it loads torch)
    mp4 = "mp4"
    gif = "gif"
    frames = "frames"


class CheckpointKind(str, Enum):
    main = "main"
    back = "back"
    panohead = "panohead"


# The files `dp360 weights download` knows and the model families a checkpoint may match, as the
# library lists them.
WeightName = Enum(
    "WeightName", {name: name for name in (*weight_files.OFFICIAL_FILES, *weight_files.EXTRA_FILES)}, type=str
)
Family = Enum("Family", {name: name for name in FAMILIES}, type=str)


OutOption = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="Output folder of the run (created; resumed if it holds a run).", show_default=False
    ),
]
DetectorOption = Annotated[
    Detector, typer.Option(help="Face detector: RetinaFace (facexlib) with an offline dlib fallback under 'auto'.")
]
DetectorWeightsOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Folder holding RetinaFace's detection_Resnet50_Final.pth (default: the dp360 cache).", show_default=False
    ),
]
NoCropOption = Annotated[
    bool,
    typer.Option(
        "--no-crop",
        help="The portrait is already aligned like PanoHead's crops (stylized or cartoon heads that detectors miss).",
    ),
]
ForceCropOption = Annotated[
    bool,
    typer.Option(
        "--force-crop",
        help="Crop the face even when the fitted head is outside PanoHead's cropping limits (size 0.7-1.3 x a "
        "frontal face's, yaw within 90, pitch within 80, roll within 50 degrees).",
    ),
]
AllowSmallOption = Annotated[
    bool,
    typer.Option(
        "--allow-small",
        help="Crop faces smaller than 64 px across their crop (enlarged 8x or more); under 256 px is allowed, with a note.",
    ),
]
YawOption = Annotated[
    Optional[float],
    typer.Option(
        help="Camera yaw in degrees instead of the estimate, -180 to 180 (0 frontal, > 0 the subject's left).",
        show_default=False,
    ),
]
PitchOption = Annotated[
    Optional[float],
    typer.Option(
        help="Camera elevation in degrees instead of the estimate, -89 to 89 (> 0 camera above the eyes).",
        show_default=False,
    ),
]
FaceIndexOption = Annotated[
    Optional[int],
    typer.Option(help="Which face to use when there are several (0 = largest), 0 to 1000.", show_default=False),
]


def _device_named(value: str) -> str:
    """--device '' (or blanks) names no device: refused rather than read as auto."""
    if isinstance(value, str) and not value.strip():
        raise typer.BadParameter("name a device: auto, cpu, cuda, cuda:N or mps (an empty name is none of them).")
    return value


DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", callback=_device_named)]
DTypeOption = Annotated[
    DType,
    typer.Option(
        help="Compute precision (auto: fp16 on CUDA, fp32 elsewhere; autocast: fp32 weights under CUDA's fp16 "
        "autocast, as the release runs)."
    ),
]
SeedOption = Annotated[int, typer.Option(help="Random seed of the run, 0 to 4294967295.")]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Redo stages even when their inputs and settings are unchanged; replace a run of another input in OUT.",
    ),
]
MaxPixelsOption = Annotated[
    Optional[int],
    typer.Option(
        "--max-pixels",
        help="Refuse input images larger than this many pixels, 1e6 to 1e9 (default 90 million).",
        show_default=False,
    ),
]
NoDownloadOption = Annotated[
    bool,
    typer.Option(
        "--no-download",
        help="Do not fetch missing weight files: stop before any stage and list them, with the commands that fetch "
        "them (as with HF_HUB_OFFLINE=1 or DP360_OFFLINE=1).",
    ),
]
KeepCheckpointsOption = Annotated[
    bool,
    typer.Option(
        "--keep-checkpoints",
        help="Keep the downloaded official checkpoints in the dp360 cache after converting them (about 20 GB).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json).")]
QuietNoJsonOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


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
            err_console.print(f"[yellow]note:[/] {escape(message)}", soft_wrap=True)


# What Ctrl-C (or SIGTERM) leaves behind, said after "interrupted:" (a run's stages by default).
INTERRUPTED_RUN = "finished stages are kept; rerun the same command to resume."
INTERRUPTED_DOWNLOAD = "what was fetched is kept; rerun the same command to resume the download."
INTERRUPTED_NOTHING_CHANGED = "nothing was changed."
INTERRUPTED_NOTHING_WRITTEN = "nothing was written (dp360 writes to a temporary name, then renames)."
INTERRUPTED_VIEWER = "the viewer stopped while it loaded the field, before it served; nothing was written."


@contextlib.contextmanager
def user_errors(interrupted: str = INTERRUPTED_RUN) -> Iterator[None]:
    """Turn dp360's user-facing errors into one line on stderr and a non-zero exit; `interrupted`
    says what an interruption leaves behind."""
    from dp360.errors import Dp360Error

    try:
        yield
    except Dp360Error as error:
        err_console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as interrupt:
        err_console.print(f"[red]interrupted[/]: {interrupted}", soft_wrap=True)
        raise typer.Exit(interrupt_exit_code(interrupt)) from None
    except Exception as error:
        from dp360.atomic import filesystem_error

        translated = filesystem_error(error)
        if translated is None:
            raise
        err_console.print(f"[red]error:[/] {escape(str(translated))}", soft_wrap=True)
        raise typer.Exit(translated.exit_code) from None


def interrupt_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process ended by it."""
    from dp360.errors import Terminated

    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def _raise_terminated(signum, frame) -> None:
    from dp360.errors import Terminated

    raise Terminated()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dp360 {dp360.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """dp360: 360-degree heads from one portrait."""


# The stages whose results a command promises; a run without them exits INCOMPLETE_EXIT.
PROMISED = {
    "prepare": ("prepare",),
    "views": ("views",),
    "reconstruct": ("render", "export"),
    "fit": ("render", "export"),
}
INCOMPLETE_EXIT = 3  # distinct from 2 (bad input or settings)


def _missing_promises(summary, command: str) -> list[str]:
    return [name for name in PROMISED[command] if summary.stages.get(name, {}).get("status") != "done"]


def _print_summary(summary, as_json: bool, quiet: bool, command: str) -> None:
    """The run's outputs; for a run without what `command` promises, every stage that did not run
    with its reason (which names the command that fixes it), and exit status 3."""
    missing = _missing_promises(summary, command)
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    elif not quiet:
        err_console.print(f"[bold]{summary.status}[/]: {summary.out_dir}")
        for rel in summary.outputs:
            err_console.print(f"  {rel}")
    if missing:
        for name, stage in summary.stages.items():
            if stage.get("status") == "not_available":
                err_console.print(f"[yellow]not run[/] {name}: {escape(stage.get('reason', ''))}", soft_wrap=True)
        err_console.print(
            f"[red]incomplete[/]: no {' or '.join(missing)} results in {summary.out_dir}; "
            "fix what is listed above and rerun the same command (finished stages are reused).",
            soft_wrap=True,
        )
        raise typer.Exit(INCOMPLETE_EXIT)


def _prepare_settings(detector, detector_weights, no_crop, yaw, pitch, face_index, force_crop=False, allow_small=False):
    from dp360.prepare import PrepareSettings

    return PrepareSettings(
        detector=detector.value,
        no_crop=no_crop,
        force_crop=force_crop,
        allow_small=allow_small,
        yaw=yaw,
        pitch=pitch,
        face_index=face_index,
        detector_weights=str(detector_weights) if detector_weights else None,
    )


def _generation_settings(steps, guidance, eta, view_count, back_camera, seed, no_3d_noise, invert_steps, pti_steps):
    """The views' and the PanoHead inversion's settings, as `views`, `reconstruct` and `batch` take them."""
    from dp360.diffusion.stage import ViewSettings
    from dp360.panohead.stage import NoiseSettings

    view_settings = ViewSettings(
        steps=steps,
        guidance=guidance,
        eta=eta,
        views=view_count,
        back_camera_index=back_camera,
        seed=seed,
        use_3d_noise=not no_3d_noise,
    )
    return view_settings, NoiseSettings(invert_steps=invert_steps, pti_steps=pti_steps, views=view_count, seed=seed)


def _check_cpu_views(device, run_device, run_dtype, view_settings, weights_dir, no_download) -> None:
    """`--device auto` on a machine without a GPU: views that would take hours need `--device cpu`."""
    from dp360.diffusion.stage import ViewModels
    from dp360.estimate import check_cpu_views
    from dp360.weights import offline

    main_bundle = ViewModels.locate(view_settings.views, run_dtype, weights_dir).main_bundle
    downloads = weights_dir is None and not no_download and not offline()  # dp360 fetches only into its cache
    check_cpu_views(
        device, run_device, main_bundle, downloads, view_settings.views, view_settings.steps, view_settings.guidance
    )


def _field_settings(
    fit_preset,
    fit_iterations,
    on_cuda,
    seed,
    frames,
    elevation,
    fps,
    resolution,
    mesh_resolution,
    mesh_faces,
    mesh_format,
    field_kind,
    texture=TextureSource.views,
    texture_size=2048,
):
    """The fit, turntable and mesh settings of `reconstruct`, `fit` and `batch`; `on_cuda` picks the default
    fit preset (gpu, else cpu) when only --fit-iterations is given."""
    from dp360.nerf.common import FitSettings
    from dp360.nerf.mesh import MeshSettings
    from dp360.nerf.render import TurntableSettings
    from dp360.nerf.stage import FieldStageSettings

    fit = None
    if fit_preset is not None or fit_iterations is not None:
        preset = fit_preset.value if fit_preset else ("gpu" if on_cuda() else "cpu")
        fit = FitSettings.preset(
            preset, **({"iterations": fit_iterations} if fit_iterations is not None else {}), seed=seed
        )
    return FieldStageSettings(
        fit,
        TurntableSettings(frames=frames, elevation=elevation, fps=fps, resolution=resolution),
        MeshSettings(resolution=mesh_resolution, faces=mesh_faces, texture=texture.value, texture_size=texture_size),
        tuple(chosen.value for chosen in mesh_format) if mesh_format else ("glb",),
        field_kind.value,
    )


@app.command(cls=Command)
def prepare(
    image: Annotated[Path, typer.Argument(help="Portrait image (PNG, JPEG, WebP, TIFF, ...).", show_default=False)],
    out: OutOption,
    detector: DetectorOption = Detector.auto,
    detector_weights: DetectorWeightsOption = None,
    no_crop: NoCropOption = False,
    force_crop: ForceCropOption = False,
    allow_small: AllowSmallOption = False,
    yaw: YawOption = None,
    pitch: PitchOption = None,
    face_index: FaceIndexOption = None,
    device: DeviceOption = "auto",
    force: ForceOption = False,
    max_pixels: MaxPixelsOption = None,
    no_download: NoDownloadOption = False,
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
        settings = _prepare_settings(
            detector, detector_weights, no_crop, yaw, pitch, face_index, force_crop, allow_small
        )
        options = RunOptions(device=device, force=force, max_pixels=max_pixels, download=not no_download)
        summary = prepare_run(image, out, settings, options, ConsoleReporter(quiet or json_output))
    _print_summary(summary, json_output, quiet, "prepare")


StepsOption = Annotated[int, typer.Option(help="DDIM steps, 1 to 999.")]
GuidanceOption = Annotated[
    float,
    typer.Option(help="Classifier-free guidance scale, 1 to 30 (the unconditional branch is the plain UNet)."),
]
EtaOption = Annotated[float, typer.Option(help="DDIM eta, 0 to 1.")]
ViewsOption = Annotated[
    int,
    typer.Option("--views", help="Number of views around the head, 8 to 128 (32 uses the official sphere32 images)."),
]
BackCameraOption = Annotated[
    Optional[int],
    typer.Option(
        help="Camera image used for the back view, 0 to views-1 (default: 18 of 32 as the final release, 202.5 degrees; an earlier release used 16).",
        show_default=False,
    ),
]
No3DNoiseOption = Annotated[
    bool, typer.Option("--no-3d-noise", help="Start every view from Gaussian noise instead of PanoHead renders.")
]
WeightsDirOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Folder with the converted bundles main-*/, back-*/ and panohead/ (default: the dp360 cache).",
        show_default=False,
    ),
]
CamerasOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Folder of camera-condition PNGs, one per view (default: sphere32 in the cache).", show_default=False
    ),
]
OffloadOption = Annotated[
    bool,
    typer.Option(
        "--offload",
        help="Keep idle networks in CPU memory (the text encoder and VAE while the denoising networks run, "
        "those together on the GPU; the back-view model after the back view). No effect on the CPU.",
    ),
]
LowVramOption = Annotated[
    bool,
    typer.Option(
        "--low-vram",
        help="For GPUs too small for --offload: weights stay in CPU memory and move to the GPU block by block "
        "as they run (diffusers group offloading); much slower than --offload. Needs a CUDA GPU; not with --offload "
        "or --compile.",
    ),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the UNet, reference network and ControlNet: the first step takes longer while they "
        "compile. Needs triton on a CUDA GPU or a C++ compiler on the CPU; not with --low-vram.",
    ),
]
InvertStepsOption = Annotated[
    int, typer.Option("--invert-steps", help="PanoHead W+ inversion steps (3D-aware noise), 0 to 10000.")
]
PtiStepsOption = Annotated[
    int, typer.Option("--pti-steps", help="PanoHead generator fine-tuning (PTI) steps after the inversion, 0 to 10000.")
]
FramesOption = Annotated[int, typer.Option("--frames", help="Turntable frames in one turn, 1 to 10000.")]
FpsOption = Annotated[int, typer.Option("--fps", help="Turntable frames per second, 1 to 240.")]
ResolutionOption = Annotated[
    int, typer.Option("--resolution", help="Turntable frame size in pixels (square), even, 16 to 4096.")
]
ElevationOption = Annotated[
    float, typer.Option("--elevation", help="Turntable camera elevation in degrees above eye level, -89 to 89.")
]
MeshResolutionOption = Annotated[
    int, typer.Option("--mesh-resolution", help="Marching-cubes grid per axis, 16 to 1024.")
]
MeshFacesOption = Annotated[
    int, typer.Option("--mesh-faces", help="Decimate the mesh to at most this many faces (at least 100).")
]
FitPresetOption = Annotated[
    Optional[FitPreset],
    typer.Option(
        "--fit-preset",
        help="Radiance-field settings (default: gpu on CUDA, else cpu; test: a quick rough fit).",
        show_default=False,
    ),
]
FitIterationsOption = Annotated[
    Optional[int],
    typer.Option(
        "--fit-iterations",
        help="Radiance-field training iterations, 1 to 1000000 (default: the preset's).",
        show_default=False,
    ),
]
FieldOption = Annotated[
    FieldKind,
    typer.Option(
        "--field",
        help="The field fitted to the views: nerfacto (density, meshable) or splatfacto (3D Gaussian splats, "
        "CUDA only; writes export/head.splat.ply instead of a mesh).",
    ),
]
TextureOption = Annotated[
    TextureSource,
    typer.Option(
        "--texture",
        help="The mesh's colours: a UV texture baked from the views (views), one of the field's colours (field), "
        "or the field's colours per vertex (vertex).",
    ),
]
TextureSizeOption = Annotated[
    int, typer.Option("--texture-size", help="Side of the square UV texture in pixels, 64 to 8192.")
]
MeshFormatsOption = Annotated[
    Optional[list[MeshFormat]],
    typer.Option("--mesh-format", help="Mesh file format; repeat for several (default: glb).", show_default=False),
]


@app.command(cls=Command)
def reconstruct(
    images: Annotated[
        list[Path],
        typer.Argument(help="One or more portraits; several go to OUT/<stem>/ one after another.", show_default=False),
    ],
    out: OutOption,
    detector: DetectorOption = Detector.auto,
    detector_weights: DetectorWeightsOption = None,
    no_crop: NoCropOption = False,
    force_crop: ForceCropOption = False,
    allow_small: AllowSmallOption = False,
    yaw: YawOption = None,
    pitch: PitchOption = None,
    face_index: FaceIndexOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    seed: SeedOption = 42,
    force: ForceOption = False,
    max_pixels: MaxPixelsOption = None,
    no_download: NoDownloadOption = False,
    keep_checkpoints: KeepCheckpointsOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    steps: StepsOption = 50,
    guidance: GuidanceOption = 3.0,
    eta: EtaOption = 0.5,
    view_count: ViewsOption = 32,
    back_camera: BackCameraOption = None,
    no_3d_noise: No3DNoiseOption = False,
    invert_steps: InvertStepsOption = 200,
    pti_steps: PtiStepsOption = 5,
    weights_dir: WeightsDirOption = None,
    cameras: CamerasOption = None,
    offload: OffloadOption = False,
    low_vram: LowVramOption = False,
    compile_models: CompileOption = False,
    fit_preset: FitPresetOption = None,
    fit_iterations: FitIterationsOption = None,
    field_kind: FieldOption = FieldKind.nerfacto,
    frames: FramesOption = 120,
    fps: FpsOption = 30,
    resolution: ResolutionOption = 512,
    elevation: ElevationOption = 0.0,
    mesh_resolution: MeshResolutionOption = 256,
    mesh_faces: MeshFacesOption = 200_000,
    mesh_format: MeshFormatsOption = None,
    texture: TextureOption = TextureSource.views,
    texture_size: TextureSizeOption = 2048,
) -> None:
    """Everything: prepare -> 3D-aware noise -> back view -> views -> NeRF -> turntable + mesh.

    Writes OUT/{input.png, prepared/, noise/, views/, nerf/, export/turntable.mp4,
    export/head.glb, run.json}; a rerun skips every stage whose inputs and settings are unchanged.
    """
    from dp360.diffusion.stage import ViewModels, check_memory_options
    from dp360.errors import Dp360Error
    from dp360.panohead.stage import NoiseModels
    from dp360.registry import pipeline_stages
    from dp360.run import RunOptions, check_run_settings
    from dp360.run import reconstruct as reconstruct_run

    settings = _prepare_settings(detector, detector_weights, no_crop, yaw, pitch, face_index, force_crop, allow_small)
    resolved_dtype = None if dtype is DType.auto else dtype.value
    options = RunOptions(
        device=device,
        dtype=resolved_dtype,
        seed=seed,
        force=force,
        progress=not (quiet or json_output),
        max_pixels=max_pixels,
        download=not no_download,
        keep_checkpoints=keep_checkpoints,
    )
    reporter = ConsoleReporter(quiet or json_output)
    view_settings, noise_settings = _generation_settings(
        steps, guidance, eta, view_count, back_camera, seed, no_3d_noise, invert_steps, pti_steps
    )
    with user_errors():
        from dp360.runtime import resolve_device

        field_settings = _field_settings(
            fit_preset,
            fit_iterations,
            lambda: resolve_device(device).startswith("cuda"),
            seed,
            frames,
            elevation,
            fps,
            resolution,
            mesh_resolution,
            mesh_faces,
            mesh_format,
            field_kind,
            texture,
            texture_size,
        )
        # Every setting is checked once, before the first portrait is touched.
        stages = tuple(stage.name for stage in pipeline_stages())
        run_device, run_dtype = check_run_settings(
            options, stages, settings, view_settings, noise_settings, field_settings
        )
        check_memory_options(offload, low_vram, compile_models, device)
        _check_cpu_views(device, run_device, run_dtype, view_settings, weights_dir, no_download)

    def run_one(image: Path, target: Path):
        models = ViewModels.locate(view_count, run_dtype, weights_dir, cameras, offload, low_vram, compile_models)
        return reconstruct_run(
            image,
            target,
            settings,
            options,
            reporter,
            view_settings,
            models,
            noise_settings,
            NoiseModels.locate(weights_dir),
            field_settings,
        )

    if len(images) == 1:
        with user_errors():
            summary = run_one(images[0], out)
        _print_summary(summary, json_output, quiet, "reconstruct")
        return
    stems = [image.stem for image in images]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        err_console.print(
            f"[red]error:[/] several inputs share the name {', '.join(duplicates)}; "
            "rename them so each gets its own OUT/<stem>/ folder."
        )
        raise typer.Exit(2)
    results, failures, incomplete = [], 0, []
    for position, image in enumerate(images):
        try:
            summary = run_one(image, out / image.stem)
            results.append(summary.as_dict())
            if _missing_promises(summary, "reconstruct"):
                incomplete.append(summary)
            if not (quiet or json_output):
                err_console.print(f"[bold]{summary.status}[/]: {image} -> {summary.out_dir}")
        except KeyboardInterrupt as interrupt:
            finished = [result.get("input") or result["out_dir"] for result in results]
            err_console.print(
                f"[red]interrupted[/] during {image}: {len(results)} of {len(images)} portraits had finished"
                + (f" ({', '.join(finished)})" if finished else "")
                + f", {len(images) - position - 1} not started; rerun the same command to resume "
                "(finished portraits and stages are reused).",
                soft_wrap=True,
            )
            raise typer.Exit(interrupt_exit_code(interrupt)) from None
        except Exception as error:
            from dp360.atomic import filesystem_error

            problem = error if isinstance(error, Dp360Error) else filesystem_error(error)
            if problem is None:
                raise
            failures += 1
            results.append({"input": str(image), "status": "failed", "error": str(problem)})
            err_console.print(f"[red]error:[/] {escape(str(image))}: {escape(str(problem))}", soft_wrap=True)
    if json_output:
        sys.stdout.write(json.dumps({"runs": results}, indent=2) + "\n")
    done = len(results) - failures - len(incomplete)
    if incomplete:
        reasons = {name: stage.get("reason", "") for run in incomplete for name, stage in run.stages.items()}
        for name, stage in incomplete[0].stages.items():
            if stage.get("status") == "not_available":
                err_console.print(f"[yellow]not run[/] {name}: {escape(reasons[name])}", soft_wrap=True)
    if failures or incomplete:
        err_console.print(
            f"[red]{done} done, {len(incomplete)} incomplete, {failures} failed[/] of {len(images)} portraits; "
            "fix what is listed above and rerun the same command (finished portraits and stages are reused).",
            soft_wrap=True,
        )
        raise typer.Exit(2 if failures else INCOMPLETE_EXIT)


@app.command(cls=Command)
def views(
    image: Annotated[Path, typer.Argument(help="Portrait image.", show_default=False)],
    out: OutOption,
    steps: StepsOption = 50,
    guidance: GuidanceOption = 3.0,
    eta: EtaOption = 0.5,
    view_count: ViewsOption = 32,
    back_camera: BackCameraOption = None,
    no_3d_noise: No3DNoiseOption = False,
    invert_steps: InvertStepsOption = 200,
    pti_steps: PtiStepsOption = 5,
    weights_dir: WeightsDirOption = None,
    cameras: CamerasOption = None,
    offload: OffloadOption = False,
    low_vram: LowVramOption = False,
    compile_models: CompileOption = False,
    detector: DetectorOption = Detector.auto,
    detector_weights: DetectorWeightsOption = None,
    no_crop: NoCropOption = False,
    force_crop: ForceCropOption = False,
    allow_small: AllowSmallOption = False,
    yaw: YawOption = None,
    pitch: PitchOption = None,
    face_index: FaceIndexOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    seed: SeedOption = 42,
    force: ForceOption = False,
    max_pixels: MaxPixelsOption = None,
    no_download: NoDownloadOption = False,
    keep_checkpoints: KeepCheckpointsOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Prepare the portrait, generate its back view, then the consistent views around the head.

    Writes OUT/views/: back_ref.png, 000.png ... (one per view), grid.png, orbit.mp4 and
    transforms.json (nerfstudio cameras of the orbit).
    """
    from dp360.diffusion.stage import ViewModels
    from dp360.panohead.stage import NoiseModels
    from dp360.run import RunOptions, check_run_settings
    from dp360.run import views as views_run

    with user_errors():
        settings = _prepare_settings(
            detector, detector_weights, no_crop, yaw, pitch, face_index, force_crop, allow_small
        )
        resolved_dtype = None if dtype is DType.auto else dtype.value
        view_settings, noise_settings = _generation_settings(
            steps, guidance, eta, view_count, back_camera, seed, no_3d_noise, invert_steps, pti_steps
        )
        options = RunOptions(
            device=device,
            dtype=resolved_dtype,
            seed=seed,
            force=force,
            progress=not (quiet or json_output),
            max_pixels=max_pixels,
            download=not no_download,
            keep_checkpoints=keep_checkpoints,
        )
        # the bundles of the precision the run computes in (fp16 on CUDA): checked settings first
        run_device, run_dtype = check_run_settings(
            options, ("prepare", "noise", "views"), settings, view_settings, noise_settings
        )
        _check_cpu_views(device, run_device, run_dtype, view_settings, weights_dir, no_download)
        models = ViewModels.locate(view_count, run_dtype, weights_dir, cameras, offload, low_vram, compile_models)
        summary = views_run(
            image,
            out,
            settings,
            options,
            ConsoleReporter(quiet or json_output),
            view_settings,
            models,
            noise_settings,
            NoiseModels.locate(weights_dir),
        )
    _print_summary(summary, json_output, quiet, "views")


@app.command(cls=Command)
def fit(
    views_dir: Annotated[
        Path,
        typer.Argument(
            help="Views in nerfstudio's layout: a folder with transforms.json and the images it lists (a run's "
            "views/, another method's views, a capture).",
            show_default=False,
        ),
    ],
    out: OutOption,
    fit_preset: FitPresetOption = None,
    fit_iterations: FitIterationsOption = None,
    field_kind: FieldOption = FieldKind.nerfacto,
    frames: FramesOption = 120,
    fps: FpsOption = 30,
    resolution: ResolutionOption = 512,
    elevation: ElevationOption = 0.0,
    mesh_resolution: MeshResolutionOption = 256,
    mesh_faces: MeshFacesOption = 200_000,
    mesh_format: MeshFormatsOption = None,
    texture: TextureOption = TextureSource.views,
    texture_size: TextureSizeOption = 2048,
    device: DeviceOption = "auto",
    seed: SeedOption = 42,
    force: ForceOption = False,
    max_pixels: MaxPixelsOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fit a radiance field to views made elsewhere, then turntable, mesh, consistency score and report.

    VIEWS_DIR is checked first (transforms.json, paths inside the folder, every image decoded, one
    size, at least 8 views, rigid poses, positive intrinsics); its views are then copied into
    OUT/views/ and run through the same stages as `dp360 reconstruct` from the fit on. Writes
    OUT/{views/, nerf/, export/turntable.mp4, export/head.glb, export/report.html, run.json}; a
    rerun skips every stage whose inputs and settings are unchanged (a changed image redoes the fit).
    """
    from dp360.run import RunOptions, fit_views
    from dp360.runtime import resolve_device

    with user_errors():
        field_settings = _field_settings(
            fit_preset,
            fit_iterations,
            lambda: resolve_device(device).startswith("cuda"),
            seed,
            frames,
            elevation,
            fps,
            resolution,
            mesh_resolution,
            mesh_faces,
            mesh_format,
            field_kind,
            texture,
            texture_size,
        )
        options = RunOptions(
            device=device, seed=seed, force=force, progress=not (quiet or json_output), max_pixels=max_pixels
        )
        summary = fit_views(views_dir, out, options, ConsoleReporter(quiet or json_output), field_settings)
    _print_summary(summary, json_output, quiet, "fit")


RunDirArgument = Annotated[
    Path,
    typer.Argument(
        help="A run folder written by `dp360 reconstruct` or `dp360 fit` (with nerf/ and views/).", show_default=False
    ),
]


def _check_run_dir(run_dir: Path) -> None:
    """`render` and `export` read a run folder: say so when there is none."""
    from dp360.errors import Dp360Error

    if not run_dir.is_dir():
        state = "is not a folder" if run_dir.exists() else "does not exist"
        raise Dp360Error(
            f"Run folder '{run_dir}' {state}; pass a folder written by `dp360 reconstruct` or `dp360 fit`."
        )


def _check_suffix_matches(out: Path, chosen: str, by_suffix: dict[str, str]) -> None:
    """Refuse an --out whose suffix names another format than the one that would be written there
    (PLY bytes in `m.obj`)."""
    from dp360.errors import Dp360Error

    named = by_suffix.get(out.suffix.lower())
    if (named is not None and named != chosen) or (chosen == "frames" and out.suffix.lower() in by_suffix):
        raise Dp360Error(
            f"'{out.name}' names a .{named} file but --format is {chosen}; make the two agree "
            f"(or leave out --format to write what the name says)."
        )


@app.command(cls=Command)
def render(
    run_dir: RunDirArgument,
    out: Annotated[
        Path, typer.Option("--out", help="Output file (.mp4 / .gif) or folder (frames).", show_default=False)
    ],
    output_format: Annotated[
        Optional[VideoFormat],
        typer.Option("--format", help="Video, GIF or PNG frames (default: from --out's suffix).", show_default=False),
    ] = None,
    frames: FramesOption = 120,
    elevation: ElevationOption = 0.0,
    fps: FpsOption = 30,
    resolution: ResolutionOption = 512,
    radius: Annotated[
        float, typer.Option("--radius", help="Camera distance from the head's centre, 0.6 to 100 (the views use 2.7).")
    ] = 2.7,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing output file of the same kind (never a folder that is not dp360 frames).",
        ),
    ] = False,
    device: DeviceOption = "auto",
    quiet: QuietNoJsonOption = False,
) -> None:
    """Render a turntable video (or GIF, or PNG frames) from a run's fitted radiance field."""
    from dp360.errors import Dp360Error
    from dp360.nerf.fit import load_field
    from dp360.nerf.render import TurntableSettings, check_turntable_target, render_turntable, write_frames
    from dp360.runtime import resolve_device

    with user_errors():
        chosen = (
            output_format.value
            if output_format
            else {".mp4": "mp4", ".gif": "gif"}.get(out.suffix.lower(), "frames" if not out.suffix else None)
        )
        if chosen is None:
            raise Dp360Error(
                f"Cannot tell the format from '{out.name}'; use a .mp4 or .gif name, a folder name, or --format."
            )
        _check_suffix_matches(out, chosen, {".mp4": "mp4", ".gif": "gif"})
        settings = TurntableSettings(frames=frames, elevation=elevation, fps=fps, resolution=resolution, radius=radius)
        settings.check()
        _check_run_dir(run_dir)
        check_turntable_target(out, chosen, overwrite)  # before the (slow) rendering
        field = load_field(Path(run_dir) / "nerf", resolve_device(device), Path(run_dir) / "views")
        images, speed = render_turntable(field, settings, progress=not quiet)
        write_frames(images, out, chosen, fps, overwrite)
    if not quiet:
        err_console.print(f"[green]✓[/] {out} ({len(images)} frames, {speed:.1f} frames/s)")


@app.command(cls=Command)
def export(
    run_dir: RunDirArgument,
    output_format: Annotated[
        Optional[MeshFormat],
        typer.Option("--format", help="Mesh file format (default: glb; a splat field: ply).", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output file (default: RUN_DIR/export/head.FORMAT, or head.splat.ply for a splat field).",
            show_default=False,
        ),
    ] = None,
    mesh_resolution: MeshResolutionOption = 256,
    mesh_faces: MeshFacesOption = 200_000,
    texture: TextureOption = TextureSource.views,
    texture_size: TextureSizeOption = 2048,
    mesh_density: Annotated[
        Optional[float],
        typer.Option(
            "--mesh-density",
            help="Mesh this iso-level of the density (default: the surface the views see, from the field's depth).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing mesh file given with --out.")
    ] = False,
    device: DeviceOption = "auto",
    quiet: QuietNoJsonOption = False,
) -> None:
    """Export a mesh (one connected head, UV-textured from the views) from a run's fitted radiance field.

    OBJ writes its MTL and PNG texture beside it; PLY holds the texture's colours per vertex.

    A splat field (`dp360 reconstruct PORTRAIT --out RUN_DIR --field splatfacto`) has no density
    to mesh: its Gaussians are written as a standard 3DGS PLY instead (positions, normals,
    f_dc/f_rest, opacity, scale, rotation), which splat viewers open; this needs no GPU.
    """
    from dp360.errors import Dp360Error
    from dp360.manifest import LOCK_NAME, RunLock, check_no_links
    from dp360.nerf.checkpoint import is_splat_fit
    from dp360.nerf.fit import load_field
    from dp360.nerf.mesh import MeshSettings, coloured_mesh, write_mesh
    from dp360.outputs import check_file_target
    from dp360.report import read_run
    from dp360.runtime import resolve_device

    with user_errors():
        by_suffix = {".glb": "glb", ".obj": "obj", ".ply": "ply"}
        suffix_format = by_suffix.get(out.suffix.lower()) if out is not None else None
        mesh_format = output_format.value if output_format else suffix_format or "glb"
        if out is not None:
            _check_suffix_matches(out, mesh_format, by_suffix)
        settings = MeshSettings(
            resolution=mesh_resolution,
            faces=mesh_faces,
            density=mesh_density,
            texture=texture.value,
            texture_size=texture_size,
        )
        settings.check()
        _check_run_dir(run_dir)
        splats = is_splat_fit(Path(run_dir) / "nerf")
        if splats and output_format not in (None, MeshFormat.ply):
            raise Dp360Error(
                f"'{run_dir}' holds a splat field, which has no density to mesh as {mesh_format}; export its "
                "Gaussians with --format ply, or refit with `dp360 reconstruct --field nerfacto --force` for a mesh."
            )
        default_name = "head.splat.ply" if splats else f"head.{mesh_format}"
        target = out or Path(run_dir) / "export" / default_name
        # The default target lies inside the run folder, which dp360 owns (its run.json shows it):
        # it may replace it, never through a link, under the run's lock so that no run writes there
        # at the same time.
        overwrite = overwrite or out is None
        inside = ((), ()) if out is not None else (("export",), (LOCK_NAME, f"export/{default_name}"))
        if out is None:
            RunLock(Path(run_dir)).check_free()
            read_run(run_dir)  # a folder dp360 did not make is the user's: nothing is written there
            check_no_links(run_dir, *inside)
        check_file_target(target, overwrite)  # before the (slow) extraction
        lock = RunLock(Path(run_dir))
        if out is None:
            lock.acquire()
            check_no_links(run_dir, *inside)  # again, under the lock
        try:
            if splats:
                from dp360.nerf.splat import splat_parameters_of_checkpoint, write_splat_ply

                parameters = splat_parameters_of_checkpoint(Path(run_dir) / "nerf")
                check_no_links(run_dir, *inside)
                write_splat_ply(parameters, target, overwrite)
                written = f"{len(parameters['means'])} splats"
            else:
                field = load_field(Path(run_dir) / "nerf", resolve_device(device), Path(run_dir) / "views")
                mesh = coloured_mesh(field, settings, Path(run_dir) / "views")
                check_no_links(run_dir, *inside)  # nothing on the way became a link meanwhile
                files = write_mesh(mesh, target, mesh_format, overwrite)
                written = f"{len(mesh.faces)} faces" + (
                    f"; with {', '.join(p.name for p in files[1:])}" if files[1:] else ""
                )
        finally:
            lock.release()
    if not quiet:
        err_console.print(f"[green]✓[/] {target} ({written})")


weights_app = typer.Typer(
    cls=Group, help="Download, list, verify and convert the official DiffPortrait360 weights.", no_args_is_help=True
)
app.add_typer(weights_app, name="weights")
WhatArgument = Annotated[
    Optional[list[WeightName]], typer.Argument(help="Which files (default: all).", show_default=False)
]
KindArgument = Annotated[CheckpointKind, typer.Argument(help="Which official checkpoint.", show_default=False)]
CacheDirOption = Annotated[
    Optional[str],
    typer.Option("--cache-dir", help="Hugging Face cache folder (default: HF_HOME's).", show_default=False),
]


def _console_note(message: str) -> None:
    err_console.print(message, soft_wrap=True, markup=False)


def _quiet_note(message: str) -> None:
    pass


@weights_app.command("download", cls=Command)
def weights_download(
    what: WhatArgument = None,
    dtype: Annotated[
        DType,
        typer.Option(
            help="Precision of the converted DiffPortrait360 bundles (auto: fp16 where CUDA is, as runs use there)."
        ),
    ] = DType.auto,
    keep_checkpoints: KeepCheckpointsOption = False,
    cache_dir: CacheDirOption = None,
    quiet: QuietNoJsonOption = False,
) -> None:
    """Fetch what runs need ahead of time, as `reconstruct` does on first use: download (resumable,
    hash-checked), convert the checkpoints into safetensors bundles, extract the camera images."""
    from dp360 import weights
    from dp360.runtime import resolve_device

    with user_errors(INTERRUPTED_DOWNLOAD):
        names = [name.value for name in what] if what else [name.value for name in WeightName]
        fp16 = dtype in (DType.fp16, DType.bf16) or (dtype is DType.auto and resolve_device("auto").startswith("cuda"))
        needs = [need for need in weights.default_needs(fp16=fp16) if need.name in names]
        present = [need for need in needs if need.present()]
        for need in present:
            if not quiet:
                err_console.print(f"[green]✓[/] {need.name}: present at {need.target}", soft_wrap=True)
        fetched = weights.ensure(
            needs,
            keep_checkpoints=keep_checkpoints,
            progress=not quiet,
            note=_quiet_note if quiet else _console_note,
            cache=cache_dir,
        )
        for need in needs:
            if need.name in fetched and not quiet:
                err_console.print(f"[green]✓[/] {need.name}: {need.target}", soft_wrap=True)


@weights_app.command("list", cls=Command)
def weights_list(cache_dir: CacheDirOption = None, json_output: JsonOption = False) -> None:
    """Show, for every weight file, whether runs will find it (converted or in place) and whether
    its raw download is on disk."""
    from dp360 import weights

    rows = []
    for fp16 in (False, True):
        for need in weights.default_needs(fp16=fp16):
            if fp16 and need.name not in ("main", "back"):
                continue
            raw = weights.cached_official(need.name, cache_dir) if need.file.installed else None
            rows.append(
                {
                    "name": need.name + (" (fp16)" if need.name in ("main", "back") and fp16 else ""),
                    "file": need.file.file_name,
                    "description": need.file.what,
                    "target": str(need.target),
                    "present": need.present(),
                    "raw_file": str(raw) if raw else None,
                }
            )
    if json_output:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    for row in rows:
        mark = "[green]present[/]" if row["present"] else "[yellow]missing[/]"
        kept = f" (raw file: {escape(row['raw_file'])})" if row["raw_file"] else ""
        err_console.print(f"{mark} {row['name']}: {escape(row['target'])}{kept}", soft_wrap=True)


@weights_app.command("verify", cls=Command)
def weights_verify(
    kind: KindArgument,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint file (default: the cached official file).", show_default=False)
    ] = None,
    family: Annotated[
        Family, typer.Option(help="Model family the checkpoint should match (sd15: the official one).")
    ] = Family.sd15,
    cache_dir: CacheDirOption = None,
) -> None:
    """Check that a checkpoint's keys and shapes match dp360's components exactly (no leftovers)."""
    import torch

    if kind is CheckpointKind.panohead:
        from dp360.panohead.store import check_panohead_pickle

        with user_errors(INTERRUPTED_NOTHING_CHANGED):
            path = _official_checkpoint(kind.value, checkpoint, cache_dir)
            network, _ = check_panohead_pickle(path)
            err_console.print(
                f"[green]✓[/] {path}: {len(network.state_dict)} tensors of {network.class_name} fill dp360's PanoHead generator exactly (read without running pickled code)"
            )
        return

    from dp360.diffusion.models.bundle import KIND_COMPONENTS, load_official_checkpoint
    from dp360.diffusion.models.components import build_components, component_config
    from dp360.diffusion.models.convert import convert_official

    with user_errors(INTERRUPTED_NOTHING_CHANGED):
        path = _official_checkpoint(kind.value, checkpoint, cache_dir)
        state = load_official_checkpoint(path)
        chosen = FAMILIES[family.value]
        with torch.device("meta"):
            components = build_components(chosen, KIND_COMPONENTS[kind.value])
        report = convert_official(
            state,
            {
                n: (component_config(chosen, n), {k: v.shape for k, v in m.state_dict().items()})
                for n, m in components.items()
            },
        )
        used = sum(len(s) for s in report.state_dicts.values())
        err_console.print(
            f"[green]✓[/] {path}: {used} tensors map onto {len(report.state_dicts)} components; {len(report.ignored)} schedule/obsolete buffers ignored"
        )


def _official_checkpoint(kind: str, checkpoint: Path | None, cache_dir: str | None) -> Path:
    """The checkpoint given, else the official file if it is on disk; never a download."""
    from dp360 import weights
    from dp360.errors import Dp360Error

    found = checkpoint or weights.cached_official(kind, cache_dir)
    if found is None:
        file_name = weights.WEIGHT_FILES[kind].file_name
        raise Dp360Error(
            f"{file_name} is not on this machine (not kept in {cache.downloads_dir()}, not in the Hugging Face "
            f"cache); pass it with --checkpoint FILE, or fetch and keep it with "
            f"`dp360 weights download {kind} --keep-checkpoints`."
        )
    return found


@weights_app.command("convert", cls=Command)
def weights_convert(
    kind: KindArgument,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint file (default: the cached official file).", show_default=False)
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Bundle folder (default: the dp360 cache).", show_default=False)
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store the weights in half precision (half the disk).")] = False,
    family: Annotated[
        Family, typer.Option(help="Model family of the checkpoint (sd15: the official one).")
    ] = Family.sd15,
    cache_dir: CacheDirOption = None,
) -> None:
    """Convert an official checkpoint into per-component diffusers folders in safetensors."""
    import torch

    from dp360.diffusion.models.bundle import convert_to_bundle

    with user_errors(INTERRUPTED_NOTHING_WRITTEN):
        path = _official_checkpoint(kind.value, checkpoint, cache_dir)
        if kind is CheckpointKind.panohead:
            from dp360.panohead.store import convert_panohead_pickle

            err_console.print(f"[green]✓[/] {convert_panohead_pickle(path, out)}")
            return
        target = out or cache.bundle_path(kind.value, fp16)
        convert_to_bundle(path, target, kind.value, family=family.value, dtype=torch.float16 if fp16 else torch.float32)
        err_console.print(f"[green]✓[/] {target}")


@app.command(cls=Command)
def doctor(
    json_output: JsonOption = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke", help="Also run prepare -> back view -> views end to end on tiny random models (CPU, < 1 minute)."
        ),
    ] = False,
) -> None:
    """Check this machine: torch/CUDA, GPU memory, packages, weight cache, disk, video encoding."""
    from rich.markup import escape

    from dp360.doctor import FAIL, run_checks, smoke_check

    checks = run_checks() + ([smoke_check()] if smoke else [])
    if json_output:
        sys.stdout.write(json.dumps([check.as_dict() for check in checks], indent=2) + "\n")
    else:
        colours = {"OK": "green", "WARN": "yellow", "FAIL": "red"}
        for check in checks:
            # Details hold paths and listings with brackets: printed literally, not as markup.
            line = (
                f"[{colours[check.status]}]{check.status:<4}[/] [bold]{escape(check.name)}[/]: {escape(check.detail)}"
            )
            if check.advice:
                line += f" [dim]-> {escape(check.advice)}[/]"
            err_console.print(line, soft_wrap=True)
    if any(check.status == FAIL for check in checks):
        raise typer.Exit(1)


@app.command(cls=Command)
def report(run_dir: RunDirArgument) -> None:
    """Rewrite RUN_DIR/export/report.html (as `reconstruct` writes it) and print its path.

    One page, no network needed: the input with its detection overlay, the crop, the back view,
    the views with their cameras, the turntable, the mesh from four sides, the stages' timings and
    settings, and the notes and warnings (a stage that did not run shows why).
    """
    from dp360.manifest import LOCK_NAME, RunLock, check_no_links
    from dp360.registry import stage_names_of
    from dp360.report import REPORT_FOLDER, REPORT_NAME, read_run, write_report

    with user_errors(INTERRUPTED_NOTHING_WRITTEN):
        _check_run_dir(run_dir)
        RunLock(Path(run_dir)).check_free()
        manifest = read_run(run_dir)  # a folder dp360 did not make is refused before the lock file is made there
        inside = ((REPORT_FOLDER,), (LOCK_NAME, f"{REPORT_FOLDER}/{REPORT_NAME}"))
        check_no_links(run_dir, *inside)  # never written through a link, whatever points where
        lock = RunLock(Path(run_dir))
        lock.acquire()  # no run writes into the folder while the page reads it
        try:
            check_no_links(run_dir, *inside)  # again, under the lock
            path = write_report(run_dir, stage_names=stage_names_of(manifest))
        finally:
            lock.release()
    typer.echo(str(path))


@app.command(cls=Command)
def view(
    run_dir: RunDirArgument,
    port: Annotated[int, typer.Option("--port", help="Port to serve on, 1 to 65535 (0 picks a free one).")] = 7007,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network)."),
    ] = "127.0.0.1",
    device: DeviceOption = "auto",
) -> None:
    """Open the interactive viewer (nerfstudio's viser viewer) on a run's fitted radiance field.

    Prints the URL on its own line on stdout and serves until Ctrl-C. On a remote GPU machine, keep
    the default host and forward the port: `ssh -L 7007:127.0.0.1:7007 MACHINE`.
    """
    from dp360.nerf.viewer import check_address, fitted_config, start_viewer
    from dp360.runtime import resolve_device

    with user_errors(INTERRUPTED_VIEWER):
        address = check_address(host, port)  # before the (slow) loading
        fitted_config(run_dir)
        running = start_viewer(run_dir, address, resolve_device(device))
    typer.echo(running.url)
    note = address.network_note()
    if note:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    err_console.print("Serving the viewer; press Ctrl-C to stop.")
    running.wait()
    # Stopped, with nothing left to write. After nerfstudio has rendered in its worker threads,
    # the interpreter's teardown sometimes aborts in native code ("terminate called without an
    # active exception", SIGABRT, about every other run): end the process here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


import cli.batch  # noqa: E402, F401  (registers `dp360 batch`; it imports the options above)
from cli.eval import eval_command  # noqa: E402 - its own module; it imports this one's helpers when run

app.command("eval", cls=Command)(eval_command)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C: the running stage is recorded as interrupted, temporaries go.
    signal.signal(signal.SIGTERM, _raise_terminated)
    app()


if __name__ == "__main__":
    main()
