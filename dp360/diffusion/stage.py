"""The back-view and views stages: from the prepared crop to `views/` (back_ref.png,
000.png ..., grid.png, orbit.mp4, transforms.json with the orbit cameras)."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .. import cache, cameras, layout
from ..atomic import atomic_directory, file_sha256, write_json_atomic
from ..checks import check_float, check_int, check_seed
from ..errors import Dp360Error
from ..imaging import save_image_atomic
from ..pipeline.stage import ModelCache, Stage, StageContext, Unavailable
from ..video import write_mp4
from ..weights import Installer, Need

if TYPE_CHECKING:
    from ..panohead.stage import NoiseModels

log = logging.getLogger(__name__)

BACK_CAMERA_32 = 18
# Bounds of the settings, stated in --help. The view-consistency modules see windows of 8
# consecutive views, so 8 is the fewest; above 128 views a run takes hours for no gain.
MIN_VIEWS, MAX_VIEWS = 8, 128
# The DDPM schedule has 1000 steps; DDIM's "leading" timesteps start at steps_offset (1), so 1000
# steps would ask for timestep 1000, one past the table's end.
MAX_STEPS = 999
MAX_GUIDANCE = 30.0


@dataclass
class ViewSettings:
    steps: int = 50
    guidance: float = 3.0
    eta: float = 0.5
    views: int = 32
    # Camera image used for the back view; None = the final release's 0000018.png for 32 views
    # (202.5 degrees), and the view nearest that angle for other counts.
    back_camera_index: int | None = None
    seed: int = 42  # a run's is its RunOptions.seed (handed over by `portrait_config`)
    use_3d_noise: bool = True

    def key_dict(self) -> dict:
        return {**asdict(self), "back_camera_index": self.back_index()}

    def check(self) -> None:
        check_int("--views", self.views, MIN_VIEWS, MAX_VIEWS)
        check_int("--steps", self.steps, 1, MAX_STEPS)
        check_float("--guidance", self.guidance, 1.0, MAX_GUIDANCE)
        check_float("--eta", self.eta, 0.0, 1.0)
        check_seed(self.seed)
        if self.back_camera_index is not None:
            check_int("--back-camera", self.back_camera_index, 0, self.views - 1)

    def back_index(self) -> int:
        if self.back_camera_index is not None:
            return self.back_camera_index
        return round(BACK_CAMERA_32 * self.views / 32) % self.views


def camera_files(folder: str | Path, view_count: int) -> list[Path]:
    """The `*.png` files of a camera-condition folder, sorted by name; an entry of that name that is
    not a regular file (a folder, a pipe) is refused by name, never read."""
    folder = Path(folder)
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    for path in files:
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise Dp360Error(
                f"The camera-condition folder '{folder}' holds '{path.name}', which is {what}, not a PNG image; "
                f"move it out of that folder, or pass --cameras with a folder of {view_count} PNG images."
            )
    return files


def _camera_count_error(folder: Path, found: int, view_count: int) -> Dp360Error:
    if found == 0:
        return Dp360Error(
            f"The camera-condition folder '{folder}' holds no PNG camera images; pass --cameras with a folder of "
            f"{view_count} camera images, or leave --cameras out to use the official ones (`dp360 weights download "
            "data`) or PanoHead renders."
        )
    return Dp360Error(
        f"The camera-condition folder '{folder}' holds {found} PNG images but --views is {view_count}; "
        f"pass --cameras with a folder of {view_count} images, or --views {found}."
    )


def load_camera_images(folder: str | Path, view_count: int) -> list[Image.Image]:
    """The camera-condition images of a folder (sorted by name), exactly one per view."""
    folder = Path(folder)
    files = camera_files(folder, view_count)
    if len(files) != view_count:
        raise _camera_count_error(folder, len(files), view_count)
    return [Image.open(path).convert("RGB") for path in files]


def grid_image(images: list[Image.Image], columns: int = 8) -> np.ndarray:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * height, columns * width, 3), 255, np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = np.asarray(image)
    return canvas


class BackgroundWriter:
    """Writes output files on worker threads while the caller goes on (the next slice of views
    decodes while the last one is encoded as PNG). `join` waits for every write and raises the
    first error; used as a context manager it joins on success, and on an error waits for the
    writes under way before the error goes on."""

    def __init__(self, workers: int | None = None):
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dp360-write")
        self._futures: list[Future] = []

    def submit(self, function, *args) -> None:
        self._futures.append(self._pool.submit(function, *args))

    def join(self) -> None:
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._futures.clear()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.join()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


def check_memory_options(offload: bool, low_vram: bool, compile_models: bool, device: str | None = None) -> None:
    """Refuse, in one sentence, a combination of --offload / --low-vram / --compile that cannot
    work, and with `device` (auto, cpu, cuda...) one that cannot work there."""
    from .pipelines.offload import compile_problem, low_vram_problem

    if offload and low_vram:
        raise Dp360Error(
            "--offload and --low-vram are two ways to save GPU memory; pass one "
            "(--low-vram holds less on the GPU, --offload is faster)."
        )
    if low_vram and compile_models:
        raise Dp360Error(
            "--compile does not combine with --low-vram (the offload hooks move weights inside the compiled "
            "networks at every block); drop one of them."
        )
    if device is None or not (low_vram or compile_models):
        return
    from ..runtime import resolve_device

    resolved = resolve_device(device)
    problem = (low_vram_problem(resolved) if low_vram else None) or (
        compile_problem(resolved) if compile_models else None
    )
    if problem:
        raise Dp360Error(problem)


def generate_back_view(
    pipeline, front: Image.Image, camera_images: list[Image.Image], settings: ViewSettings
) -> Image.Image:
    index = settings.back_index()
    if not 0 <= index < len(camera_images):
        raise Dp360Error(f"--back-camera {index} is not one of the {len(camera_images)} camera images.")
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    return pipeline(
        front,
        camera_images[index],
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        eta=settings.eta,
        generator=generator,
    ).images[0]


def generate_views(
    pipeline,
    front: Image.Image,
    back: Image.Image,
    camera_images: list[Image.Image],
    noise_frames: list[Image.Image] | None,
    settings: ViewSettings,
    out_dir: Path,
    writer: BackgroundWriter | None = None,
) -> dict:
    """Run the 360 pipeline and write the views folder's files into `out_dir`: each decoded
    slice of views is written by `writer` while the next one decodes, the grid and the video
    after the last (a writer of our own, joined here, when none is given)."""
    if writer is None:
        with BackgroundWriter() as own:
            return generate_views(pipeline, front, back, camera_images, noise_frames, settings, out_dir, own)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)

    def write_slice(first: int, images: list[Image.Image]) -> None:
        for offset, image in enumerate(images):
            writer.submit(save_image_atomic, out_dir / f"{first + offset:03d}.png", np.asarray(image))

    output = pipeline(
        front,
        back,
        camera_images,
        noise_frames=noise_frames if settings.use_3d_noise else None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        eta=settings.eta,
        generator=generator,
        on_decoded=write_slice,
    )
    images = output.images
    names = [f"{index:03d}.png" for index in range(len(images))]
    frames = [np.asarray(image) for image in images]
    writer.submit(write_mp4, out_dir / layout.name_of(layout.ORBIT), frames, 10)
    writer.submit(save_image_atomic, out_dir / layout.name_of(layout.GRID), grid_image(images))
    size = images[0].size[0]
    orbit = cameras.dp360_orbit(len(images))
    views = [
        cameras.ViewCamera(name, cam2world, cameras.normalized_intrinsics()) for name, cam2world in zip(names, orbit)
    ]
    write_json_atomic(out_dir / "transforms.json", cameras.to_nerfstudio_transforms(views, size, size))
    return {
        "views": len(images),
        "chunks": output.chunks,
        "size": size,
        "3d_noise": noise_frames is not None and settings.use_3d_noise,
    }


@dataclass
class ViewModels:
    """Where the views stage finds its converted weights and camera-condition images."""

    main_bundle: Path
    back_bundle: Path
    camera_dir: Path  # as configured; a run without them there renders PanoHead's (`camera_dir_of`)
    offload: bool = False  # phase offload: idle networks wait in CPU memory (offload.py)
    low_vram: bool = False  # group offload: weights in CPU memory, moved block by block
    compile_models: bool = False  # torch.compile of the networks run at every step

    def __post_init__(self) -> None:
        check_memory_options(self.offload, self.low_vram, self.compile_models)

    def check_options(self, device: str) -> None:
        """Refuse memory and compile options that cannot work on `device`, in one sentence."""
        check_memory_options(self.offload, self.low_vram, self.compile_models, device)

    @classmethod
    def default(cls, view_count: int = 32) -> ViewModels:

        return cls(
            cache.bundle_path("main"),
            cache.bundle_path("back"),
            cache.cache_dir() / "sphere32" if view_count == 32 else cache.cache_dir() / f"cameras{view_count}",
        )

    @classmethod
    def locate(
        cls,
        view_count: int = 32,
        dtype: str | None = None,
        weights_dir: Path | None = None,
        camera_dir: Path | None = None,
        offload: bool = False,
        low_vram: bool = False,
        compile_models: bool = False,
    ) -> ViewModels:
        """Bundles from `weights_dir` (default: the dp360 cache), preferring the precision that
        matches `dtype` and falling back to the other one; cameras from `camera_dir` if given."""

        root = Path(weights_dir) if weights_dir is not None else cache.bundles_dir()
        # autocast runs float32 weights (under float16 autocast): the fp32 bundles first
        order = ("fp16", "fp32") if dtype in ("fp16", "bf16") else ("fp32", "fp16")

        def bundle(kind: str) -> Path:
            # a bundle of either precision that is there; else where the matching one will be made
            return next(
                (root / f"{kind}-{precision}" for precision in order if (root / f"{kind}-{precision}").is_dir()),
                root / f"{kind}-{order[0]}",
            )

        models = cls.default(view_count)
        models.main_bundle, models.back_bundle = bundle("main"), bundle("back")
        if camera_dir is not None:
            models.camera_dir = Path(camera_dir)
        check_memory_options(offload, low_vram, compile_models)
        models.offload, models.low_vram, models.compile_models = offload, low_vram, compile_models
        return models

    def problem(self, camera_dir: Path | None = None) -> str | None:
        """Why the views stage cannot run (with the camera images at `camera_dir`, by default the
        configured ones), in one sentence, or None."""
        from .models.bundle import BUNDLE_FILE

        camera_dir = Path(camera_dir if camera_dir is not None else self.camera_dir)

        for kind, label, folder in (
            ("main", "360-view model", self.main_bundle),
            ("back", "back-view model", self.back_bundle),
        ):
            if not (Path(folder) / BUNDLE_FILE).is_file():
                return (
                    f"The converted DiffPortrait360 {label} is not at {folder}; run `dp360 weights download {kind}` "
                    f"(about 10 GB, converted into dp360's cache), or convert a checkpoint you have there with "
                    f"`dp360 weights convert {kind} --checkpoint FILE --out {folder}`."
                )
        if not camera_dir.is_dir():
            return f"The camera-condition images are not at {camera_dir}; run `dp360 weights download data`, or pass --cameras."
        return None

    def hashes(self, camera_dir: Path | None = None) -> dict[str, str]:
        from .models.bundle import BUNDLE_FILE

        camera_dir = Path(camera_dir if camera_dir is not None else self.camera_dir)

        result = {
            "main_bundle": file_sha256(Path(self.main_bundle) / BUNDLE_FILE),
            "back_bundle": file_sha256(Path(self.back_bundle) / BUNDLE_FILE),
            # Hashing ~20 GB of weights at every run would take minutes: the weight files enter
            # the key by name, size and modification time, so a reconverted bundle redoes the views.
            "main_bundle_files": _folder_fingerprint(Path(self.main_bundle)),
            "back_bundle_files": _folder_fingerprint(Path(self.back_bundle)),
        }
        for path in sorted(camera_dir.glob("*.png")):
            if path.is_file():  # anything else is refused by name before a stage runs
                result[f"camera/{path.name}"] = file_sha256(path)
        return result

    def build_views(
        self,
        run_dir: Path,
        folder: Path,
        settings: ViewSettings,
        device: str,
        dtype: str,
        camera_dir: Path | None = None,
        noise_dir: Path | None = None,
        models: ModelCache | None = None,
    ) -> dict:
        """The views folder from the run's crop: camera images from `camera_dir` (by default the
        configured ones), PanoHead's frames from `noise_dir` (None: Gaussian noise), the pipelines
        from `models` (a cache that keeps them, or a fresh one that loads each once)."""
        from ..runtime import precision_context
        from ..runtime import torch_dtype as to_torch_dtype
        from .models.bundle import load_bundle

        torch_dtype = to_torch_dtype(dtype)
        models = models or ModelCache()
        front = Image.open(run_dir / layout.CROP).convert("RGB")
        camera_images = load_camera_images(camera_dir if camera_dir is not None else self.camera_dir, settings.views)
        noise_frames = None
        if noise_dir is not None and settings.use_3d_noise:
            noise_frames = load_camera_images(noise_dir, settings.views)

        self.check_options(device)

        def load(kind: str, bundle: Path):
            on_device = not (self.offload or self.low_vram)
            loaded = load_bundle(bundle, device=device if on_device else "cpu", dtype=torch_dtype, kind=kind)
            if self.offload:
                loaded.enable_phase_offload(device)
            elif self.low_vram:
                loaded.enable_low_vram(device)
            if self.compile_models:
                loaded.enable_compile()
            return loaded

        def pipeline(kind: str, bundle: Path):
            key = (str(bundle), device, str(torch_dtype), self.offload, self.low_vram, self.compile_models)
            return models.model(kind, key, lambda: load(kind, bundle))

        with BackgroundWriter() as writer, precision_context(dtype, device):
            back_pipeline = pipeline("back", self.back_bundle)
            back = generate_back_view(back_pipeline, front, camera_images, settings)
            # The back-view model is done: with --offload its call ended with every network in CPU
            # memory; either way (unless the cache keeps it) its memory is freed before the 360-view model loads.
            del back_pipeline
            writer.submit(save_image_atomic, folder / layout.name_of(layout.BACK_VIEW), np.asarray(back))
            summary = generate_views(
                pipeline("main", self.main_bundle), front, back, camera_images, noise_frames, settings, folder, writer
            )
        if noise_frames is None:
            summary["note"] = "no 3D-aware noise (the PanoHead stage is not available): Gaussian start"
        return summary


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class ViewStageConfig:
    """The views stage's config: its settings, where its models are, and the PanoHead generator
    that renders camera images for view counts without official ones (None: no renders)."""

    settings: ViewSettings
    models: ViewModels
    panohead: NoiseModels | None = None

    def check(self, device: str) -> None:
        self.settings.check()
        self.models.check_options(device)  # --low-vram or --compile that cannot work on this device


def camera_dir_of(context: StageContext[ViewStageConfig], render: bool = False) -> Path:
    """The camera images the views start from: the configured ones when they are there, else
    PanoHead's canonical head rendered at the orbit, once per model cache (and kept on disk) by
    the stage's `resolve` (`render`); before that, the configured folder."""
    from ..panohead.store import panohead_problem

    config, count = context.config, context.config.settings.views
    configured = Path(config.models.camera_dir)
    panohead = config.panohead
    if configured.is_dir() or panohead is None:
        return configured
    key = ("camera-images", str(panohead.generator_dir), count, context.device)
    rendered = context.models.known(key)
    if rendered is not None:
        return rendered
    if not render or panohead_problem(panohead.generator_dir) is not None:
        return configured
    return context.models.value(key, lambda: panohead.camera_images(count, context.device, context.models))


def _resolve(context: StageContext[ViewStageConfig]) -> None:
    """No official camera images for this view count: render PanoHead's canonical head now."""
    camera_dir_of(context, render=True)


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check(context: StageContext[ViewStageConfig]) -> Unavailable | None:
    models, count = context.config.models, context.config.settings.views
    models.check_options(context.device)  # before any stage: --low-vram or --compile that cannot work here
    camera_dir = camera_dir_of(context)
    if camera_dir.is_dir():
        found = len(camera_files(camera_dir, count))
        if found != count:  # a setting that cannot work: refused before any stage runs
            raise _camera_count_error(camera_dir, found, count)
    problem = models.problem(camera_dir)
    return Unavailable("not_available", problem) if problem else None


def _weights(context: StageContext[ViewStageConfig]) -> tuple[Need, ...]:
    """The two bundles and the sphere32 images where they are to be in dp360's cache (not those
    from --weights-dir or --cameras); for other view counts, PanoHead renders the camera images."""
    from .models.bundle import bundle_installer  # diffusers loads on first use only

    config = context.config
    models = config.models
    needs: list[Need] = []
    for kind, folder in (("main", Path(models.main_bundle)), ("back", Path(models.back_bundle))):
        if folder.parent == cache.bundles_dir() and folder.name in (f"{kind}-fp16", f"{kind}-fp32"):
            fp16 = folder.name.endswith("fp16")
            needs.append(Need(kind, folder, fp16=fp16, installer=bundle_installer(kind, fp16)))
    camera_dir = Path(models.camera_dir)
    if config.settings.views == 32 and camera_dir == cache.cache_dir() / "sphere32":
        needs.append(Need("data", camera_dir, installer=SPHERE32_INSTALLER))
    elif not camera_dir.is_dir() and config.panohead is not None:
        generator = config.panohead.generator_need()
        needs.extend([generator] if generator is not None else [])
    return tuple(needs)


def _noise_frames(context: StageContext[ViewStageConfig]) -> Path | None:
    """The PanoHead frames the views start from, when the noise stage produced them."""
    if context.config.settings.use_3d_noise and context.done("noise"):
        return context.run_dir / layout.NOISE_FRAMES
    return None


def _inputs(context: StageContext[ViewStageConfig]) -> dict[str, str]:
    frames = _noise_frames(context)
    noise = (
        {f"{layout.NOISE}/{path.name}": file_sha256(path) for path in sorted(frames.glob("*.png"))} if frames else {}
    )
    crop = file_sha256(context.run_dir / layout.CROP)
    return {"crop": crop, **context.config.models.hashes(camera_dir_of(context)), **noise}


def _build(context: StageContext[ViewStageConfig], folder: Path) -> dict:
    config = context.config
    return config.models.build_views(
        context.run_dir,
        folder,
        config.settings,
        context.device,
        context.dtype,
        camera_dir=camera_dir_of(context),
        noise_dir=_noise_frames(context),
        models=context.models,
    )


VIEWS_STAGE: Stage[ViewStageConfig] = Stage(
    name="views",
    folder=layout.VIEWS,
    description="back view (model F), then the consistent 360-degree views (DiffPortrait360)",
    config="views",
    settings=lambda context: {**context.config.settings.key_dict(), "dtype": context.dtype},
    inputs=_inputs,
    build=_build,
    check=_check,
    resolve=_resolve,
    needs=("prepare",),
    weights=_weights,
)


def extract_sphere32(archive: str | Path, destination: Path | None = None) -> Path:
    """The 32 `sphere32` camera images from the official inference-data zip into
    `<cache>/sphere32/` (atomically). The archive's internal layout is not documented, so the
    images are found by content: the folder named sphere32 holding 32 PNGs, else the only
    folder that holds exactly 32 PNGs."""
    import zipfile
    from collections import defaultdict

    destination = Path(destination) if destination is not None else cache.cache_dir() / "sphere32"
    try:
        with zipfile.ZipFile(archive) as bundle:
            folders: dict[str, list[str]] = defaultdict(list)
            for name in bundle.namelist():
                if name.lower().endswith(".png") and not name.startswith("__MACOSX"):
                    folders[name.rsplit("/", 1)[0] if "/" in name else ""].append(name)
            named = [folder for folder, files in folders.items() if "sphere32" in folder.lower() and len(files) == 32]
            candidates = named or [folder for folder, files in folders.items() if len(files) == 32]
            if len(candidates) != 1:
                raise Dp360Error(
                    f"{archive} has no single folder of 32 camera images ({len(candidates)} candidates); "
                    "extract the sphere32 PNGs by hand into "
                    + str(destination)
                    + " (runs also take a folder with --cameras)."
                )
            with atomic_directory(destination) as staging:
                for index, member in enumerate(sorted(folders[candidates[0]])):
                    (staging / f"{index:03d}.png").write_bytes(bundle.read(member))
    except zipfile.BadZipFile:
        raise Dp360Error(
            f"{archive} is not a zip archive; download it again with `dp360 weights download data`."
        ) from None
    return destination


# How `dp360.weights` makes the camera images from the official inference data, and recognises them.
SPHERE32_INSTALLER = Installer(
    present=lambda target: len(list(target.glob("*.png"))) == 32,
    install=lambda raw, target: extract_sphere32(raw, target),
)
