"""The options of dp360's commands, each declared once (its flag, help, range and default) and shared
by every command that takes it, as groups (`with_options`), plus the settings objects built from
them. `reconstruct`, `views`, `fit`, `batch` (and the app) take the same groups, so a default or a
range changes in one place.

Enums mirror the library's choices without importing it (that would load torch at every start).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, NamedTuple, Optional

import typer

from dp360 import weights as weight_files
from dp360.diffusion.models.configs import FAMILIES


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


# -- groups: the options several commands share, each declared here once -------------------------


class Shared(NamedTuple):
    """One shared option: the command's parameter name, its Annotated type and its default."""

    name: str
    annotation: Any
    default: Any


OptionGroup = tuple[Shared, ...]

PREPARE_OPTIONS: OptionGroup = (
    Shared("detector", DetectorOption, Detector.auto),
    Shared("detector_weights", DetectorWeightsOption, None),
    Shared("no_crop", NoCropOption, False),
    Shared("force_crop", ForceCropOption, False),
    Shared("allow_small", AllowSmallOption, False),
    Shared("yaw", YawOption, None),
    Shared("pitch", PitchOption, None),
)
FACE_INDEX_OPTION: OptionGroup = (Shared("face_index", FaceIndexOption, None),)
GENERATION_OPTIONS: OptionGroup = (
    Shared("steps", StepsOption, 50),
    Shared("guidance", GuidanceOption, 3.0),
    Shared("eta", EtaOption, 0.5),
    Shared("view_count", ViewsOption, 32),
    Shared("back_camera", BackCameraOption, None),
    Shared("no_3d_noise", No3DNoiseOption, False),
    Shared("invert_steps", InvertStepsOption, 200),
    Shared("pti_steps", PtiStepsOption, 5),
)
MODEL_OPTIONS: OptionGroup = (
    Shared("weights_dir", WeightsDirOption, None),
    Shared("cameras", CamerasOption, None),
    Shared("offload", OffloadOption, False),
    Shared("low_vram", LowVramOption, False),
    Shared("compile_models", CompileOption, False),
)
FIT_OPTIONS: OptionGroup = (
    Shared("fit_preset", FitPresetOption, None),
    Shared("fit_iterations", FitIterationsOption, None),
    Shared("field_kind", FieldOption, FieldKind.nerfacto),
)
TURNTABLE_OPTIONS: OptionGroup = (
    Shared("frames", FramesOption, 120),
    Shared("fps", FpsOption, 30),
    Shared("resolution", ResolutionOption, 512),
    Shared("elevation", ElevationOption, 0.0),
)
MESH_OPTIONS: OptionGroup = (
    Shared("mesh_resolution", MeshResolutionOption, 256),
    Shared("mesh_faces", MeshFacesOption, 200_000),
    Shared("texture", TextureOption, TextureSource.views),
    Shared("texture_size", TextureSizeOption, 2048),
)
MESH_FORMATS_OPTION: OptionGroup = (Shared("mesh_format", MeshFormatsOption, None),)
DEVICE_OPTION: OptionGroup = (Shared("device", DeviceOption, "auto"),)
PRECISION_OPTION: OptionGroup = (Shared("dtype", DTypeOption, DType.auto),)
SEED_OPTION: OptionGroup = (Shared("seed", SeedOption, 42),)
FORCE_OPTION: OptionGroup = (Shared("force", ForceOption, False),)
MAX_PIXELS_OPTION: OptionGroup = (Shared("max_pixels", MaxPixelsOption, None),)
NO_DOWNLOAD_OPTION: OptionGroup = (Shared("no_download", NoDownloadOption, False),)
KEEP_CHECKPOINTS_OPTION: OptionGroup = (Shared("keep_checkpoints", KeepCheckpointsOption, False),)
OUTPUT_OPTIONS: OptionGroup = (Shared("json_output", JsonOption, False), Shared("quiet", QuietOption, False))

# What the commands that run the pipeline's stages take, group by group.
VIEW_GROUPS = (PREPARE_OPTIONS, GENERATION_OPTIONS, MODEL_OPTIONS)
FIELD_GROUPS = (FIT_OPTIONS, TURNTABLE_OPTIONS, MESH_OPTIONS, MESH_FORMATS_OPTION)
RUN_GROUPS = (PRECISION_OPTION, SEED_OPTION, MAX_PIXELS_OPTION, NO_DOWNLOAD_OPTION, KEEP_CHECKPOINTS_OPTION)


def defaults_of(*groups: OptionGroup, **changes: Any) -> SimpleNamespace:
    """The namespace a command taking `groups` receives when every option keeps its default (a
    library caller's, or a test's, way to build the same settings), with `changes` applied."""
    values = {option.name: option.default for group in groups for option in group}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"not options of these groups: {', '.join(sorted(unknown))}")
    return SimpleNamespace(**{**values, **changes})


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of `groups` after its own parameters; the command receives their
    values as one namespace, `options` (its own parameter of that name)."""
    shared = [option for group in groups for option in group]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function, eval_str=True)
        own = [parameter for parameter in signature.parameters.values() if parameter.name != "options"]
        clash = {parameter.name for parameter in own} & {option.name for option in shared}
        if clash or len({option.name for option in shared}) != len(shared):
            raise TypeError(f"{function.__name__}: options declared twice ({', '.join(sorted(clash)) or 'in groups'})")
        parameters = own + [
            inspect.Parameter(
                option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=option.annotation
            )
            for option in shared
        ]

        @functools.wraps(function)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {option.name: kwargs.pop(option.name, option.default) for option in shared}
            return function(*args, options=SimpleNamespace(**values), **kwargs)

        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        # typer reads the types from the annotations: the shared ones are objects, not strings
        command.__annotations__ = {
            parameter.name: parameter.annotation
            for parameter in parameters
            if parameter.annotation is not inspect.Parameter.empty
        }
        return command

    return decorate


# -- the library's settings, built from the options -------------------------------------------------


def prepare_settings(options: SimpleNamespace):
    """`dp360.prepare.PrepareSettings` from PREPARE_OPTIONS (and FACE_INDEX_OPTION when taken)."""
    from dp360.prepare import PrepareSettings

    return PrepareSettings(
        detector=options.detector.value,
        no_crop=options.no_crop,
        force_crop=options.force_crop,
        allow_small=options.allow_small,
        yaw=options.yaw,
        pitch=options.pitch,
        face_index=getattr(options, "face_index", None),
        detector_weights=str(options.detector_weights) if options.detector_weights else None,
    )


def generation_settings(options: SimpleNamespace):
    """The views' and the PanoHead inversion's settings from GENERATION_OPTIONS."""
    from dp360.diffusion.stage import ViewSettings
    from dp360.panohead.stage import NoiseSettings

    view_settings = ViewSettings(
        steps=options.steps,
        guidance=options.guidance,
        eta=options.eta,
        views=options.view_count,
        back_camera_index=options.back_camera,
        use_3d_noise=not options.no_3d_noise,
    )
    # the seed (--seed) and, for the inversion, the view count reach them through the run (portrait_config)
    noise_settings = NoiseSettings(invert_steps=options.invert_steps, pti_steps=options.pti_steps)
    return view_settings, noise_settings


def turntable_settings(options: SimpleNamespace, **extra: Any):
    from dp360.nerf.render import TurntableSettings

    return TurntableSettings(
        frames=options.frames, elevation=options.elevation, fps=options.fps, resolution=options.resolution, **extra
    )


def mesh_settings(options: SimpleNamespace, **extra: Any):
    from dp360.nerf.mesh import MeshSettings

    return MeshSettings(
        resolution=options.mesh_resolution,
        faces=options.mesh_faces,
        texture=options.texture.value,
        texture_size=options.texture_size,
        **extra,
    )


def field_settings(options: SimpleNamespace, on_cuda: Callable[[], bool]):
    """The fit, turntable and mesh settings from FIELD_GROUPS and the seed; `on_cuda` picks the
    default fit preset (gpu, else cpu) when only --fit-iterations is given."""
    from dp360.nerf.common import FitSettings
    from dp360.nerf.stage import FieldStageSettings

    fit = None
    if options.fit_preset is not None or options.fit_iterations is not None:
        preset = options.fit_preset.value if options.fit_preset else ("gpu" if on_cuda() else "cpu")
        iterations = {"iterations": options.fit_iterations} if options.fit_iterations is not None else {}
        fit = FitSettings.preset(preset, **iterations, seed=options.seed)
    return FieldStageSettings(
        fit,
        turntable_settings(options),
        mesh_settings(options),
        tuple(chosen.value for chosen in options.mesh_format) if options.mesh_format else ("glb",),
        options.field_kind.value,
    )


def run_options(options: SimpleNamespace, device: str | None = None, force: bool | None = None):
    """`dp360.run.RunOptions` from the run's options (those the command takes; the others keep
    RunOptions' defaults). `device` and `force`: a command's own (batch's differ)."""
    from dp360.run import RunOptions

    quiet = getattr(options, "quiet", False) or getattr(options, "json_output", False)
    dtype = getattr(options, "dtype", DType.auto)
    return RunOptions(
        device=device if device is not None else getattr(options, "device", "auto"),
        dtype=None if dtype is DType.auto else dtype.value,
        seed=getattr(options, "seed", 42),
        force=force if force is not None else getattr(options, "force", False),
        progress=not quiet,
        max_pixels=getattr(options, "max_pixels", None),
        download=not getattr(options, "no_download", False),
        keep_checkpoints=getattr(options, "keep_checkpoints", False),
    )


def check_cpu_views(options: SimpleNamespace, run_device: str, run_dtype: str, view_settings) -> None:
    """`--device auto` on a machine without a GPU: views that would take hours need `--device cpu`."""
    from dp360.diffusion.stage import ViewModels
    from dp360.estimate import check_cpu_views as check
    from dp360.weights import offline

    main_bundle = ViewModels.locate(view_settings.views, run_dtype, options.weights_dir).main_bundle
    # dp360 fetches only into its cache
    downloads = options.weights_dir is None and not options.no_download and not offline()
    check(
        options.device,
        run_device,
        main_bundle,
        downloads,
        view_settings.views,
        view_settings.steps,
        view_settings.guidance,
    )


def view_models(options: SimpleNamespace, run_dtype: str):
    """Where the views stage finds its models (`dp360.diffusion.stage.ViewModels`)."""
    from dp360.diffusion.stage import ViewModels

    return ViewModels.locate(
        options.view_count,
        run_dtype,
        options.weights_dir,
        options.cameras,
        options.offload,
        options.low_vram,
        options.compile_models,
    )


class ReconstructSettings(NamedTuple):
    """Everything `dp360.run.reconstruct` takes but the portrait and the folder, checked."""

    prepare: Any
    run: Any  # dp360.run.RunOptions
    views: Any
    noise: Any
    field: Any
    run_dtype: str


def reconstruct_settings(options: SimpleNamespace) -> ReconstructSettings:
    """The settings of a whole run from `reconstruct`'s options (the CLI's and the app's), every one
    checked before any portrait is touched: ranges, the memory options, and the CPU's time for the views."""
    from dp360.diffusion.stage import check_memory_options
    from dp360.run import check_portrait_settings
    from dp360.runtime import resolve_device

    prepare = prepare_settings(options)
    run = run_options(options)
    views, noise = generation_settings(options)
    field = field_settings(options, lambda: resolve_device(options.device).startswith("cuda"))
    run_device, run_dtype = check_portrait_settings(run, "reconstruct", prepare, views, noise, field)
    check_memory_options(options.offload, options.low_vram, options.compile_models, options.device)
    check_cpu_views(options, run_device, run_dtype, views)
    return ReconstructSettings(prepare, run, views, noise, field, run_dtype)
