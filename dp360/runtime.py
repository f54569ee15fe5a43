"""Device and dtype resolution, and the environment facts a run records."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from .errors import Dp360Error

DTYPES = ("fp16", "bf16", "fp32", "autocast")
AUTOCAST_NEEDS_CUDA = (
    "--dtype autocast runs float32 weights under CUDA's float16 autocast, so it needs a CUDA GPU, not {device}; "
    "use --dtype fp32 (or bf16) there."
)
# Distributions whose versions every run records (and `dp360 doctor` prints).
KEY_PACKAGES = (
    "dp360",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "nerfstudio",
    "facexlib",
    "dlib-bin",
    "opencv-python-headless",
    "numpy",
    "pillow",
    "trimesh",
    "imageio",
    "imageio-ffmpeg",
    "typer",
    "rich",
)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in KEY_PACKAGES}


def resolve_device(requested: str = "auto") -> str:
    """auto | cpu | cuda | cuda:N | mps -> a concrete torch device string, or a clear error."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        refuse_unusable_gpu("auto")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise Dp360Error("--device mps was asked for but this machine has no Apple GPU; use --device cpu or auto.")
        return "mps"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            refuse_unusable_gpu(requested)
            raise Dp360Error(
                f"--device {requested} was asked for but CUDA is not available here; use --device cpu or auto."
            )
        if ":" in requested:
            index_text = requested.split(":", 1)[1]
            if not index_text.isdigit() or int(index_text) >= torch.cuda.device_count():
                raise Dp360Error(
                    f"--device {requested} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)."
                )
        return requested
    raise Dp360Error(f"Unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps.")


def refuse_unusable_gpu(requested: str) -> None:
    """An NVIDIA GPU torch cannot use (an old driver, a CPU-only torch) is an error, not a silent
    fall-back to hours on the CPU; --device cpu is the way to go on without it."""
    from .gpu import torch_gpu_problem

    problem = torch_gpu_problem()
    if problem:
        raise Dp360Error(
            f"--device {requested}: {problem}; or pass --device cpu to run on the CPU (the views take hours there)."
        )


def torch_dtype(name: str):
    """fp16 | bf16 | fp32 | autocast -> the torch dtype of the weights (autocast: float32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "autocast": torch.float32}[name]


def precision_context(name: str, device: str):
    """The context the networks run in: for `autocast`, float32 weights under CUDA's float16 autocast
    (as the released inference runs); for the others, nothing (the weights' dtype is the compute's)."""
    import contextlib

    import torch

    if name != "autocast":
        return contextlib.nullcontext()
    if not device.startswith("cuda"):
        raise Dp360Error(AUTOCAST_NEEDS_CUDA.format(device=device))
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def resolve_dtype(requested: str | None, device: str) -> str:
    """fp16 | bf16 | fp32 | autocast; the default is fp16 on CUDA and fp32 elsewhere (CPU half is slow)."""
    if requested is None or requested == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if requested not in DTYPES:
        raise Dp360Error(f"Unknown dtype '{requested}'; use fp16, bf16, fp32 or autocast.")
    return requested


def environment(device: str, dtype: str) -> dict:
    import torch

    facts = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype,
        "torch_cuda": torch.version.cuda,
        "packages": package_versions(),
    }
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts
