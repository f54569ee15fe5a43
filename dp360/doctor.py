"""`dp360 doctor`: checks of the machine, one line each, with what to do when one fails."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cache, runtime, weights

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    advice: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "advice": self.advice}


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", OK if ok else FAIL, sys.version.split()[0], "" if ok else "use Python 3.10 or newer")


def check_torch() -> Check:
    import torch

    detail = f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}"
    return Check("torch", OK, detail)


def check_gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        parts = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            parts.append(f"cuda:{index} {torch.cuda.get_device_name(index)}, {_gib(free)} free of {_gib(total)}")
        return Check("gpu", OK, "; ".join(parts))
    from .gpu import torch_gpu_problem

    problem = torch_gpu_problem()
    if problem:
        return Check(
            "gpu",
            FAIL,
            problem[0].upper() + problem[1:],
            "until then `--device auto` and `--device cuda` refuse to start; `--device cpu` runs on the CPU (slowly)",
        )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Check("gpu", OK, "Apple MPS")
    return Check(
        "gpu",
        WARN,
        "no GPU: only the CPU is available",
        "preparation works on CPU; the diffusion and NeRF stages need a CUDA GPU to finish in reasonable time",
    )


def check_splats() -> Check:
    """gsplat's CUDA kernels for `--field splatfacto`: compiled, compiles on first use, or cannot."""
    import torch

    from .gpu import CANNOT, splat_backend

    backend = splat_backend()
    detail = f"{backend.state}: {backend.why}"
    if backend.state == CANNOT:
        return Check("splats", WARN, detail, f"for `--field splatfacto`, {backend.fix}; nerfacto needs none of this")
    if not torch.cuda.is_available():
        return Check("splats", WARN, detail + "; but splats rasterise on a CUDA GPU, which torch cannot use here")
    return Check("splats", OK, detail)


def check_hash_grid() -> Check:
    """Which hash-grid backend nerfacto gets here, and what it costs."""
    import torch

    from .gpu import TCNN_INSTALL, hash_grid_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend, detail = hash_grid_backend(device)
    if device == "cuda" and backend == "torch":
        return Check("hash grid", WARN, f"{backend}: {detail}", f"`{TCNN_INSTALL}` (needs nvcc; see README)")
    return Check("hash grid", OK, f"{backend}: {detail}")


def check_imports() -> Check:
    modules = [
        "torchvision.ops",
        "diffusers",
        "transformers",
        "huggingface_hub",
        "safetensors",
        "nerfstudio",
        "facexlib",
        "dlib",
        "cv2",
        "trimesh",
        "imageio",
        "imageio_ffmpeg",
        "typer",
        "rich",
    ]
    failed = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure is what we report
            failed.append(f"{module} ({type(error).__name__}: {error})")
    versions = runtime.package_versions()
    detail = ", ".join(f"{name} {version}" for name, version in versions.items() if version and name != "dp360")
    if failed:
        return Check(
            "packages",
            FAIL,
            "cannot import " + "; ".join(failed),
            "reinstall dp360 with `pip install -e .` (see README)",
        )
    return Check("packages", OK, detail)


def check_opencv() -> Check:
    import cv2

    version = cv2.__version__
    if not version.startswith("4."):
        return Check("opencv", FAIL, f"cv2 {version}", "install opencv-python-headless==4.10.0.84 (nerfstudio's pin)")
    return Check("opencv", OK, f"cv2 {version}")


def check_face_detectors() -> Check:
    from .prepare.detectors import dlib_landmark_model_path

    retina = cache.facexlib_dir() / weights.RETINAFACE_FILES["resnet50"]
    try:
        dlib_path = dlib_landmark_model_path()
        dlib_ok = True
    except Exception as error:  # noqa: BLE001
        dlib_ok, dlib_path = False, error
    if retina.is_file() and dlib_ok:
        return Check("face detectors", OK, f"RetinaFace weights at {retina}; dlib 68-point model at {dlib_path}")
    if dlib_ok:  # the missing RetinaFace file has its own WARN line under "weights retinaface"
        return Check(
            "face detectors",
            OK,
            f"dlib 68-point model at {dlib_path}; RetinaFace weights not yet in {retina.parent} (fetched on first "
            "use; until then `--detector auto` uses dlib)",
        )
    return Check(
        "face detectors",
        FAIL,
        f"dlib detector unavailable: {dlib_path}",
        "pip install dlib-bin face-recognition-models",
    )


def check_cache() -> Check:
    root = cache.cache_dir()
    files = cache.describe_cache()
    total = sum(size for _, size in files)
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    listing = ", ".join(f"{path.relative_to(root)} ({_gib(size)})" for path, size in files[:8]) or "empty"
    if len(files) > 8:
        listing += f", and {len(files) - 8} more"
    return Check(
        "weight cache", OK, f"{root}: {len(files)} file(s), {_gib(total)} [{listing}]; Hugging Face cache {hf_home}"
    )


def _needs() -> list[weights.Need]:
    """What a default run on this machine fetches: fp16 bundles on CUDA, fp32 elsewhere."""
    import torch

    # not resolve_device: a GPU torch cannot use is check_gpu's FAIL, not an error of this check
    from .pipeline.registry import default_needs

    return default_needs(fp16=torch.cuda.is_available())


def check_weights() -> list[Check]:
    """One line per file the full pipeline needs: present, or its size and the command that fetches it."""
    checks = []
    for need in _needs():
        item = need.file
        name = f"weights {need.name}"
        what = f"{item.file_name}, {item.what}"
        if need.present():
            checks.append(Check(name, OK, f"{what}: present at {need.target}"))
        else:
            size = weights.size_text(item.size_gb)
            when = " (fetched on first use by `dp360 reconstruct` and `dp360 views`)"
            checks.append(Check(name, WARN, f"{what}: missing ({size}){when}", f"run `{need.command()}`"))
    return checks


def pending_bytes() -> int:
    """Disk space the missing weights need at the peak of their fetch (as `dp360 weights download`
    and a first run work it out: each raw file is removed once converted)."""
    return weights.estimated_disk_needed(_needs())


def check_disk() -> Check:
    root = cache.cache_dir()
    probe = next(parent for parent in (root, *root.parents) if parent.exists())
    free_cache = shutil.disk_usage(probe).free
    free_here = shutil.disk_usage(Path.cwd()).free
    pending = pending_bytes()
    detail = (
        f"{_gib(free_cache)} free at {probe}, {_gib(free_here)} free here; the missing weights need {_gib(pending)}"
    )
    if free_cache < pending:
        return Check(
            "disk",
            FAIL,
            detail,
            "free some space, or set DP360_CACHE and HF_HOME to a disk with room, before `dp360 weights download`",
        )
    return Check("disk", OK, detail)


def check_video() -> Check:
    import imageio_ffmpeg
    import numpy as np

    from .video import read_mp4, write_mp4

    try:
        with tempfile.TemporaryDirectory() as folder:
            frame = np.zeros((64, 64, 3), dtype=np.uint8)
            frame[16:48, 16:48] = 255
            path = write_mp4(Path(folder) / "probe.mp4", [frame] * 4, fps=4)
            meta, frames = read_mp4(path)
            if len(frames) != 4 or tuple(meta["size"]) != (64, 64):
                raise RuntimeError(f"decoded {len(frames)} frames of {meta['size']}")
        return Check(
            "video", OK, f"H.264 MP4 encode and decode work (ffmpeg from imageio-ffmpeg {imageio_ffmpeg.__version__})"
        )
    except Exception as error:  # noqa: BLE001
        return Check(
            "video",
            FAIL,
            f"H.264 encoding failed: {error}",
            "reinstall imageio-ffmpeg (`pip install -U imageio-ffmpeg`)",
        )


def check_nerfstudio_commands() -> Check:
    """nerfstudio's own commands on a run's field: the method is registered (the package's entry
    point), `ns-export` can import open3d (it loads the system library libusb-1.0 on Linux), and
    `ns-render` finds an `ffmpeg` on PATH (it asks for one even to write images)."""
    import ctypes
    from importlib.metadata import entry_points

    from .nerf.common import METHOD

    problems, advice = [], []
    if METHOD not in entry_points(group="nerfstudio.method_configs").names:
        problems.append(f"the method {METHOD} is not registered with nerfstudio")
        advice.append("reinstall dp360 (`pip install -e .`, or scripts/setup.sh)")
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libusb-1.0.so.0")
        except OSError:
            problems.append("ns-export cannot import open3d (the system library libusb-1.0 is missing)")
            advice.append("install it (Debian/Ubuntu: `apt-get install libusb-1.0-0`; scripts/setup.sh does this)")
    # setup.sh links one into the venv's bin folder, which is on PATH when the venv is active
    if shutil.which("ffmpeg") is None and shutil.which("ffmpeg", path=str(Path(sys.executable).parent)) is None:
        problems.append("ns-render finds no ffmpeg on PATH")
        advice.append(
            "install ffmpeg (Debian/Ubuntu: `apt-get install ffmpeg`), or link imageio-ffmpeg's binary onto PATH as "
            "`ffmpeg` (`python -c 'import imageio_ffmpeg as f; print(f.get_ffmpeg_exe())'` prints where it is)"
        )
    if problems:
        return Check("nerfstudio commands", WARN, "; ".join(problems), "; ".join(advice))
    return Check(
        "nerfstudio commands",
        OK,
        f"ns-train {METHOD}, ns-viewer, ns-render and ns-export work on a run (method registered, libusb-1.0 and "
        "ffmpeg found)",
    )


CHECKS: tuple[Callable[[], Check | list[Check]], ...] = (
    check_python,
    check_torch,
    check_gpu,
    check_splats,
    check_hash_grid,
    check_imports,
    check_opencv,
    check_face_detectors,
    check_cache,
    check_weights,
    check_disk,
    check_video,
    check_nerfstudio_commands,
)


def run_checks() -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            found = check()
            results.extend(found if isinstance(found, list) else [found])
        except Exception as error:  # noqa: BLE001 - a broken check is itself a finding
            results.append(
                Check(
                    check.__name__.removeprefix("check_"),
                    FAIL,
                    f"{type(error).__name__}: {error}",
                    "see the error; reinstall dp360 if a package is broken",
                )
            )
    return results


def smoke_check() -> Check:
    """prepare -> back view -> views end to end on tiny random models, through the real
    checkpoint conversion and loading code. Its images are meaningless."""
    import time

    from .diffusion.models.tiny import write_tiny_bundles
    from .diffusion.stage import ViewModels, ViewSettings
    from .panohead.perceptual import write_random_backbone
    from .panohead.stage import NoiseModels, NoiseSettings
    from .panohead.tiny import write_tiny_panohead
    from .prepare import PrepareSettings
    from .run import RunOptions
    from .run import views as views_run

    example = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            bundles = write_tiny_bundles(Path(folder) / "tiny", view_count=32)
            models = ViewModels(bundles["main"], bundles["back"], bundles["cameras"])
            noise_models = NoiseModels(
                write_tiny_panohead(Path(folder) / "tiny"), write_random_backbone(Path(folder) / "vgg16.pth")
            )
            summary = views_run(
                example,
                Path(folder) / "run",
                PrepareSettings(detector="dlib"),
                RunOptions(device="cpu", seed=0, progress=False),
                view_settings=ViewSettings(steps=2, views=32),
                models=models,
                noise_settings=NoiseSettings(invert_steps=2, pti_steps=1),
                noise_models=noise_models,
            )
            if summary.status != "done":
                raise RuntimeError(f"the run ended {summary.status}: {summary.stages}")
            written = sorted(rel for rel in summary.outputs if rel.startswith(("views/", "noise/")))
        seconds = time.perf_counter() - start
        return Check(
            "smoke",
            OK,
            f"prepare + PanoHead inversion + back view + 32 views on tiny random models in {seconds:.0f} s ({len(written)} files in noise/ and views/); the images are meaningless by design",
        )
    except Exception as error:  # noqa: BLE001
        return Check(
            "smoke", FAIL, f"{type(error).__name__}: {error}", "report this with the output of `dp360 doctor --json`"
        )
