"""What this machine's NVIDIA GPU, driver and CUDA toolchain allow: whether torch can use the GPU
(and the fix when it cannot), whether gsplat's CUDA kernels load or can be compiled, and which
hash-grid backend nerfacto gets. `runtime.resolve_device`, the fit's settings check and
`dp360 doctor` all read these facts from here."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Where the kernel module and device files live (module-level so tests can point them elsewhere).
PROC_VERSION = Path("/proc/driver/nvidia/version")
DEV_DIR = Path("/dev")
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")  # torch's last guess for the toolkit

# Oldest Linux driver each CUDA major runs on through minor-version compatibility (NVIDIA's CUDA
# Toolkit release notes). torch's wheels carry their own CUDA runtime, so this floor decides.
CUDA_MAJOR_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
# The driver each CUDA release shipped with (its GA toolkit driver, same notes): the newest CUDA a
# driver supports natively, said in messages.
CUDA_RELEASE_DRIVER = {
    (11, 8): (520, 61, 5),
    (12, 0): (525, 60, 13),
    (12, 1): (530, 30, 2),
    (12, 2): (535, 54, 3),
    (12, 3): (545, 23, 6),
    (12, 4): (550, 54, 14),
    (12, 5): (555, 42, 2),
    (12, 6): (560, 28, 3),
    (12, 8): (570, 26, 0),
    (12, 9): (575, 51, 3),
    (13, 0): (580, 65, 6),
}
# CUDA builds PyTorch publishes per release (pytorch.org "previous versions"); a newer torch than
# listed is assumed to keep the newest listed set.
TORCH_CUDA_BUILDS = {
    (2, 6): ("11.8", "12.4", "12.6"),
    (2, 7): ("11.8", "12.6", "12.8"),
    (2, 8): ("12.6", "12.8", "12.9"),
    (2, 9): ("12.6", "12.8", "13.0"),
}
TORCH_INDEX = "https://download.pytorch.org/whl/"
TCNN_INSTALL = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
# nerfstudio's threads (PR #1936, issues #2158, #2759): its torch hash grid is about this much slower.
TORCH_HASH_GRID_COST = "about 4-6x slower per step than tiny-cuda-nn"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


# -- the GPU and its driver --------------------------------------------------------------------------


@dataclass(frozen=True)
class NvidiaGpu:
    name: str  # "an NVIDIA GPU" when only the kernel module or device file shows it
    driver: str | None  # None: present, version unreadable
    memory: str | None = None
    source: str = "nvidia-smi"

    def describe(self) -> str:
        memory = f" ({self.memory})" if self.memory else ""
        driver = f"driver {self.driver}" if self.driver else "a driver whose version could not be read"
        return f"{self.name}{memory} with {driver}"


def _from_nvidia_smi() -> list[NvidiaGpu]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        done = subprocess.run(
            [tool, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:  # e.g. "driver/library version mismatch": the next sources still see the card
        return []
    gpus = []
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) >= 2 and fields[0]:
            gpus.append(NvidiaGpu(fields[0], fields[1] or None, fields[2] if len(fields) > 2 else None))
    return gpus


def _from_kernel_module() -> list[NvidiaGpu]:
    try:
        text = PROC_VERSION.read_text(errors="replace")
    except OSError:
        return []
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    return [NvidiaGpu("an NVIDIA GPU", found.group(1) if found else None, source=str(PROC_VERSION))]


def _from_device_files() -> list[NvidiaGpu]:
    try:
        devices = sorted(path for path in DEV_DIR.glob("nvidia*") if re.fullmatch(r"nvidia\d+", path.name))
    except OSError:
        return []
    return [NvidiaGpu("an NVIDIA GPU", None, source=str(path)) for path in devices]


def find_nvidia_gpus() -> list[NvidiaGpu]:
    """The NVIDIA GPUs this machine shows, whether or not torch can use them."""
    return _from_nvidia_smi() or _from_kernel_module() or _from_device_files()


# -- torch's CUDA build against the driver ---------------------------------------------------------


def _base_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution).split("+", 1)[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_needed(cuda: str) -> tuple[int, ...] | None:
    """The oldest Linux driver a torch built for CUDA `cuda` runs on."""
    return CUDA_MAJOR_DRIVER.get(_version_tuple(cuda)[0])


def native_cuda(driver: str) -> str | None:
    """The newest CUDA release `driver` shipped with or after (what it supports natively)."""
    version = _version_tuple(driver)
    fits = [release for release, needed in CUDA_RELEASE_DRIVER.items() if version >= needed]
    return _dotted(max(fits)) if fits else None


def torch_build_for(driver: str) -> str | None:
    """The newest CUDA build of the installed torch release that `driver` runs, e.g. "12.8"."""
    torch_version = _version_tuple(_base_version("torch") or "0.0")[:2]
    known = [release for release in TORCH_CUDA_BUILDS if release <= torch_version]
    builds = TORCH_CUDA_BUILDS[max(known)] if known else ()
    version = _version_tuple(driver)
    usable = [cuda for cuda in builds if (driver_needed(cuda) or (999,)) <= version]
    return max(usable, key=_version_tuple) if usable else None


def torch_install_command(cuda: str) -> str:
    """pip command for the pinned torch (and its torchvision) built for CUDA `cuda`."""
    packages = [f"{name}=={version}" for name in ("torch", "torchvision") if (version := _base_version(name))]
    return f"pip install {' '.join(packages)} --index-url {TORCH_INDEX}cu{cuda.replace('.', '')}"


def unusable_gpu_problem(torch_cuda: str | None, cuda_available: bool) -> str | None:
    """A sentence (without 'use --device cpu') when an NVIDIA GPU is here that torch cannot use;
    None when torch can use it or there is none."""
    if cuda_available:
        return None
    gpus = find_nvidia_gpus()
    if not gpus:
        return None
    gpu = gpus[0]
    others = f" (and {len(gpus) - 1} more)" if len(gpus) > 1 else ""
    torch_version = _base_version("torch") or "?"
    here = f"this machine has {gpu.describe()}{others}"
    if torch_cuda is None:
        cuda = torch_build_for(gpu.driver) if gpu.driver else None
        fix = f"`{torch_install_command(cuda)}`" if cuda else "a CUDA build of torch (https://pytorch.org/get-started)"
        return f"{here}, but torch {torch_version} is a CPU-only build; install {fix}"
    needed = driver_needed(torch_cuda)
    if gpu.driver and needed and _version_tuple(gpu.driver) < needed:
        native = native_cuda(gpu.driver)
        native_text = f", which supports CUDA {native}" if native else ""
        fix = f"update the NVIDIA driver to {needed[0]} or newer"
        alternative = torch_build_for(gpu.driver)
        if alternative:
            fix += f", or install torch's CUDA {alternative} build: `{torch_install_command(alternative)}`"
        return (
            f"{here}{native_text}, but torch {torch_version} is built for CUDA {torch_cuda}, which needs driver "
            f"{needed[0]} or newer, so torch cannot use the GPU; {fix}"
        )
    if not gpu.driver:
        return (
            f"{here} ({gpu.source}), but torch {torch_version} (CUDA {torch_cuda}) cannot use it; check the "
            f"driver with `nvidia-smi` (torch's CUDA {torch_cuda} needs driver {needed[0] if needed else '?'} or newer)"
        )
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = f"CUDA_VISIBLE_DEVICES={hidden!r} hides it" if hidden is not None and hidden.strip() in ("", "-1") else ""
    return (
        f"{here}, but torch {torch_version} (CUDA {torch_cuda}) cannot use it"
        + (f": {why}" if why else " although the driver is new enough")
        + "; check `python -c 'import torch; torch.cuda.init()'` for the reason (a container without GPU access, "
        "or CUDA_VISIBLE_DEVICES)"
    )


def torch_gpu_problem() -> str | None:
    """`unusable_gpu_problem` for the imported torch."""
    import torch

    return unusable_gpu_problem(torch.version.cuda, torch.cuda.is_available())


# -- gsplat's CUDA kernels -------------------------------------------------------------------------

COMPILED, COMPILES, CANNOT = "compiled", "compiles", "cannot"


@dataclass(frozen=True)
class SplatBackend:
    state: str  # COMPILED, COMPILES or CANNOT
    why: str
    fix: str = ""


def _gsplat_dir() -> Path | None:
    import importlib.util

    # find_spec of the top-level package only: importing gsplat starts its JIT build
    spec = importlib.util.find_spec("gsplat")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _nvcc_release(nvcc: Path) -> tuple[int, int] | None:
    try:
        done = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", done.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _jit_library(torch_cuda: str) -> Path:
    """Where torch's JIT loader keeps gsplat's compiled kernels (torch.utils.cpp_extension's layout,
    worked out without creating the folder as torch's own helper does)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        import logging

        # importing it warns "No CUDA runtime is found" on a machine without a GPU: noise in doctor
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import get_default_build_root
        finally:
            quiet.setLevel(level)

        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_cu{torch_cuda.replace('.', '')}")
    return Path(root) / "gsplat_cuda" / "gsplat_cuda.so"


def splat_backend(torch_cuda: str | None = None) -> SplatBackend:
    """Whether gsplat's CUDA kernels are compiled, can be compiled on first use, or cannot be,
    following what gsplat 1.4's loader does: a prebuilt `gsplat.csrc`, else (only when `nvcc` is
    on PATH) torch's JIT build with CUDA_HOME's nvcc, the host C++ compiler and ninja."""
    if torch_cuda is None:
        import torch

        torch_cuda = torch.version.cuda
    package = _gsplat_dir()
    if package is None:
        return SplatBackend(CANNOT, "gsplat is not installed", "reinstall dp360 (`pip install -e .`)")
    if any(package.glob("csrc*.so")) or (package / "csrc" / "__init__.py").is_file():
        return SplatBackend(COMPILED, f"gsplat's prebuilt CUDA kernels are installed ({package / 'csrc'})")
    if torch_cuda is None:
        return SplatBackend(CANNOT, "torch is a CPU-only build", "install a CUDA build of torch")
    major = _version_tuple(torch_cuda)[0]
    toolkit_fix = (
        f"install the CUDA {major}.x toolkit (https://developer.nvidia.com/cuda-downloads; torch is built for CUDA "
        f"{torch_cuda}) and put its bin folder on PATH"
    )
    nvcc_on_path = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if nvcc_on_path is None:
        elsewhere = [Path(place) / "bin" / "nvcc" for place in (home, DEFAULT_CUDA_HOME) if place]
        found = next((path for path in elsewhere if path.is_file()), None)
        if found is not None:
            return SplatBackend(
                CANNOT,
                f"nvcc is at {found} but not on PATH, where gsplat looks for it",
                f"run `export PATH={found.parent}:$PATH` first",
            )
        return SplatBackend(
            CANNOT,
            f"gsplat {_base_version('gsplat') or ''} ships CUDA sources only and no CUDA compiler (nvcc) is on PATH "
            "to build them".replace("  ", " "),
            toolkit_fix,
        )
    # torch's JIT build runs CUDA_HOME's nvcc (else the one on PATH) and refuses another CUDA major
    home = home or os.path.dirname(os.path.dirname(nvcc_on_path))
    nvcc = Path(home) / "bin" / "nvcc"
    if not nvcc.is_file():
        return SplatBackend(CANNOT, f"CUDA_HOME={home} has no bin/nvcc", "point CUDA_HOME at the CUDA toolkit")
    release = _nvcc_release(nvcc)
    if release is None:
        return SplatBackend(CANNOT, f"`{nvcc} --version` names no CUDA release", toolkit_fix)
    if release[0] != major:
        return SplatBackend(
            CANNOT,
            f"nvcc at {nvcc} is CUDA {release[0]}.{release[1]} but torch is built for CUDA {torch_cuda} "
            "(torch builds extensions only with the same CUDA major version)",
            toolkit_fix + " ahead of the other one (and CUDA_HOME, if set)",
        )
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return SplatBackend(
            CANNOT,
            f"no C++ compiler ({compiler}) is on PATH for the host side of gsplat's build",
            "install one (Debian/Ubuntu: `apt-get install g++`)",
        )
    if shutil.which("ninja") is None:
        beside = Path(sys.executable).parent / "ninja"
        return SplatBackend(
            CANNOT,
            "ninja, which torch builds extensions with, is not on PATH",
            f"activate the virtual environment so {beside} is on PATH"
            if beside.is_file()
            else "`pip install ninja` into dp360's environment",
        )
    library = _jit_library(torch_cuda)
    tools = f"nvcc {release[0]}.{release[1]} at {nvcc}, {shutil.which(compiler)}"
    if library.is_file():
        return SplatBackend(COMPILED, f"gsplat's kernels were built earlier ({library}); {tools}")
    return SplatBackend(
        COMPILES,
        f"gsplat compiles its CUDA kernels on the first splat fit (a few minutes, once) with {tools}",
    )


def splat_problem(torch_cuda: str | None = None) -> str | None:
    """A sentence when `--field splatfacto` cannot run for want of gsplat's kernels, else None."""
    backend = splat_backend(torch_cuda)
    if backend.state != CANNOT:
        return None
    return (
        f"--field splatfacto cannot run here: {backend.why}, and gsplat has no rasteriser without its CUDA kernels; "
        f"{backend.fix}, or use --field nerfacto."
    )


# -- nerfacto's hash grid --------------------------------------------------------------------------


def tinycudann_works() -> bool:
    """`import tinycudann` succeeds (it needs a CUDA GPU and a build for it)."""
    import importlib.util

    if importlib.util.find_spec("tinycudann") is None:
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as good as none: nerfstudio falls back to torch
        return False
    return True


def hash_grid_backend(device: str) -> tuple[str, str]:
    """("tiny-cuda-nn" | "torch", what it means for the fit's speed) for nerfacto on `device`."""
    if device.startswith("cuda") and tinycudann_works():
        return "tiny-cuda-nn", "nerfacto's hash grid runs on tiny-cuda-nn's fused CUDA kernels"
    if device.startswith("cuda"):
        return "torch", (
            f"nerfacto's hash grid runs on nerfstudio's torch implementation, {TORCH_HASH_GRID_COST} "
            f"(tiny-cuda-nn is not installed; on this GPU machine: `{TCNN_INSTALL}`, which needs nvcc)"
        )
    return (
        "torch",
        f"nerfacto's hash grid runs on nerfstudio's torch implementation ({device}: tiny-cuda-nn is CUDA only)",
    )
