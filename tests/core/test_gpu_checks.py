"""Issue 22: a GPU torch cannot use, gsplat's toolchain and nerfacto's hash-grid backend are told
before any work, and the first run's sizes come from one registry. Stand-in `nvidia-smi`, `nvcc`,
`c++` and `ninja` scripts on PATH play the machine; torch's CUDA facts are set per test."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import torch

from dp360 import gpu
from dp360.errors import Dp360Error

from ..conftest import REPO

H100 = "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB"


def _base(distribution: str) -> str:
    return importlib.metadata.version(distribution).split("+")[0]


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine with nothing on PATH but a folder of stand-ins, no NVIDIA kernel module or device
    files, torch built for CUDA 13.2 that sees no GPU, and no CUDA toolkit."""
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    for name in ("CUDA_HOME", "CUDA_PATH", "CXX", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-extensions"))
    monkeypatch.setattr(gpu, "PROC_VERSION", tmp_path / "proc-nvidia-version")
    monkeypatch.setattr(gpu, "DEV_DIR", tmp_path / "dev")
    monkeypatch.setattr(gpu, "DEFAULT_CUDA_HOME", tmp_path / "no-cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class Machine:
        bin = tools

        def tool(self, name: str, script: str, folder=None):
            path = (folder or tools) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#!/bin/sh\n" + script + "\n")
            path.chmod(0o755)
            return path

        def nvidia_smi(self, line: str = H100):
            return self.tool("nvidia-smi", f'echo "{line}"')

        def nvcc(self, release: str, folder=None):
            return self.tool(
                "nvcc",
                f'echo "nvcc: NVIDIA (R) Cuda compiler driver"; echo "Cuda compilation tools, release {release}, '
                f'V{release}.88"',
                folder,
            )

        def build_tools(self):
            self.tool("c++", "exit 0")
            self.tool("ninja", "echo 1.11.1")

    return Machine()


# -- the GPU and its driver --------------------------------------------------------------------------


def test_nvidia_smi_names_the_gpu_and_driver(machine):
    assert gpu.find_nvidia_gpus() == []
    machine.nvidia_smi()
    (found,) = gpu.find_nvidia_gpus()
    assert (found.name, found.driver, found.memory) == ("NVIDIA H100 80GB HBM3", "550.54.15", "81559 MiB")


def test_kernel_module_and_device_files_show_a_gpu_without_nvidia_smi(machine, tmp_path):
    gpu.PROC_VERSION.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
        "GCC version:  gcc version 12.3.0\n"
    )
    # nvidia-smi that fails (as on a driver/library mismatch) does not hide the kernel module's version
    machine.tool("nvidia-smi", 'echo "Failed to initialize NVML: Driver/library version mismatch"; exit 18')
    (found,) = gpu.find_nvidia_gpus()
    assert found.driver == "550.54.15" and found.source == str(gpu.PROC_VERSION)
    gpu.PROC_VERSION.unlink()
    gpu.DEV_DIR.mkdir()
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (gpu.DEV_DIR / name).write_text("")
    (found,) = gpu.find_nvidia_gpus()
    assert found.driver is None and found.source.endswith("nvidia0")


def test_old_driver_refuses_auto_and_cuda_with_the_gpu_the_versions_and_both_fixes(machine):
    from dp360.runtime import resolve_device

    machine.nvidia_smi()
    command = (
        f"pip install torch=={_base('torch')} torchvision=={_base('torchvision')} "
        "--index-url https://download.pytorch.org/whl/cu128"
    )
    for requested in ("auto", "cuda", "cuda:0"):
        with pytest.raises(Dp360Error) as raised:
            resolve_device(requested)
        message = str(raised.value)
        for fact in (
            f"--device {requested}",
            "NVIDIA H100 80GB HBM3",
            "driver 550.54.15",
            "supports CUDA 12.4",
            "built for CUDA 13.2",
            "needs driver 580 or newer",
            "update the NVIDIA driver to 580 or newer",
            command,
            "--device cpu",
        ):
            assert fact in message, (fact, message)
        assert "\n" not in message and message.endswith(".")
    assert resolve_device("cpu") == "cpu"


def test_without_any_gpu_auto_is_the_cpu(machine):
    from dp360.runtime import resolve_device

    assert resolve_device("auto") == "cpu"
    with pytest.raises(Dp360Error, match="CUDA is not available here"):
        resolve_device("cuda")


def test_other_reasons_torch_cannot_use_the_gpu(machine, monkeypatch):
    machine.nvidia_smi("NVIDIA H100 80GB HBM3, 470.82.01, 81559 MiB")
    problem = gpu.torch_gpu_problem()
    # CUDA 11 builds are not among the pinned torch's: updating the driver is the one fix
    assert "update the NVIDIA driver to 580" in problem and "pip install" not in problem
    machine.nvidia_smi("NVIDIA H100 80GB HBM3, 580.95.05, 81559 MiB")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problem = gpu.torch_gpu_problem()
    assert "driver 580.95.05" in problem and "CUDA_VISIBLE_DEVICES=''" in problem and "update" not in problem
    monkeypatch.setattr(torch.version, "cuda", None)
    problem = gpu.torch_gpu_problem()
    assert "CPU-only build" in problem and "--index-url https://download.pytorch.org/whl/cu130" in problem
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.torch_gpu_problem() is None


def test_cli_refuses_before_writing_anything_and_cpu_still_runs(machine, cli, tmp_path, astronaut_path):
    machine.nvidia_smi()
    for command in ("reconstruct", "views", "prepare"):
        out = tmp_path / f"out-{command}"
        code, stdout, stderr = cli(command, astronaut_path, "--out", out, "--detector", "dlib")
        text = " ".join(stderr.split())
        assert code == 2 and text.startswith("error: --device auto:") and "driver 550.54.15" in text, stderr
        assert "Traceback" not in stdout + stderr and not out.exists()
    out = tmp_path / "on-cpu"
    code, stdout, stderr = cli("prepare", astronaut_path, "--out", out, "--detector", "dlib", "--device", "cpu")
    assert code == 0, stderr
    assert (out / "prepared" / "crop.png").is_file()


def test_batch_refuses_a_gpu_torch_cannot_use(machine):
    from dp360.batch import BatchRecipe, ClusterSettings, _kind
    from dp360.run import RunOptions

    machine.nvidia_smi()
    recipe = BatchRecipe.reconstruct(options=RunOptions(device="auto"))
    with pytest.raises(Dp360Error, match="driver 550.54.15"):
        _kind(recipe, ClusterSettings(), None)
    assert _kind(BatchRecipe.reconstruct(options=RunOptions(device="cpu")), ClusterSettings(), None) == "cpu"


def test_doctor_fails_with_the_same_facts(machine):
    from dp360 import doctor

    assert doctor.check_gpu().status == "WARN"  # no GPU at all
    machine.nvidia_smi()
    check = doctor.check_gpu()
    assert check.status == "FAIL" and "--device cpu" in check.advice
    assert check.detail.lower() == gpu.torch_gpu_problem().lower()
    assert "driver 550.54.15" in check.detail and "whl/cu128" in check.detail
    # the weight lines do not trip over the unusable GPU
    assert all(line.status != "FAIL" for line in doctor.check_weights())


# -- gsplat's CUDA kernels -------------------------------------------------------------------------


def test_splat_backend_cannot_without_nvcc_and_says_how_to_get_it(machine, tmp_path, monkeypatch):
    backend = gpu.splat_backend()
    assert backend.state == gpu.CANNOT and "nvcc" in backend.why and "CUDA 13.x toolkit" in backend.fix
    # a toolkit off PATH: gsplat only looks on PATH
    home = tmp_path / "cuda-13.0"
    machine.nvcc("13.0", home / "bin")
    monkeypatch.setenv("CUDA_HOME", str(home))
    backend = gpu.splat_backend()
    assert backend.state == gpu.CANNOT and "not on PATH" in backend.why and f"{home / 'bin'}:$PATH" in backend.fix


def test_splat_backend_needs_the_same_cuda_major_a_compiler_and_ninja(machine, tmp_path, monkeypatch):
    machine.nvcc("12.4")
    backend = gpu.splat_backend()
    assert backend.state == gpu.CANNOT and "CUDA 12.4" in backend.why and "13.2" in backend.why
    machine.nvcc("13.0")
    backend = gpu.splat_backend()
    assert backend.state == gpu.CANNOT and "C++ compiler" in backend.why and "g++" in backend.fix
    machine.tool("c++", "exit 0")
    backend = gpu.splat_backend()
    assert backend.state == gpu.CANNOT and "ninja" in backend.why
    machine.tool("ninja", "echo 1.11.1")
    backend = gpu.splat_backend()
    assert backend.state == gpu.COMPILES and "nvcc 13.0" in backend.why, backend
    # CUDA_HOME's nvcc is the one torch builds with
    machine.nvcc("12.8", tmp_path / "old-cuda" / "bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "old-cuda"))
    assert gpu.splat_backend().state == gpu.CANNOT
    monkeypatch.delenv("CUDA_HOME")
    library = tmp_path / "torch-extensions" / "gsplat_cuda" / "gsplat_cuda.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    assert gpu.splat_backend().state == gpu.COMPILED


def test_splatfacto_is_refused_before_the_first_stage_without_a_toolchain(machine, monkeypatch):
    from dp360.nerf.stage import FieldStageSettings

    splats = FieldStageSettings(field="splatfacto")
    with pytest.raises(Dp360Error) as raised:
        splats.check("cuda")
    message = str(raised.value)
    assert message.startswith("--field splatfacto cannot run here:") and "--field nerfacto" in message
    assert "install the CUDA 13.x toolkit" in message and message.endswith(".")
    # the device refusal stays first on a machine without CUDA
    with pytest.raises(Dp360Error, match="needs a CUDA GPU .* the device is cpu"):
        splats.check("cpu")
    splats.check("cuda", toolchain=False)  # a remote worker checks its own
    FieldStageSettings(field="nerfacto").check("cuda")
    machine.nvcc("13.0")
    machine.build_tools()
    splats.check("cuda")


def test_cli_splatfacto_without_nvcc_stops_before_writing(machine, cli, tmp_path, astronaut_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for args in (
        ("reconstruct", astronaut_path, "--detector", "dlib"),
        ("fit", tmp_path / "views"),
        ("batch", astronaut_path, "--detector", "dlib"),
    ):
        out = tmp_path / f"out-{args[0]}"
        code, stdout, stderr = cli(*args, "--out", out, "--field", "splatfacto", "--device", "cuda")
        text = " ".join(stderr.split())
        assert code == 2 and text.startswith("error: --field splatfacto cannot run here:"), stderr
        assert not out.exists()


def test_batch_checks_the_splat_toolchain_of_its_own_gpu(machine, monkeypatch):
    from dp360.batch import BatchRecipe
    from dp360.nerf.stage import FieldStageSettings
    from dp360.run import RunOptions

    recipe = BatchRecipe.reconstruct(options=RunOptions(device="cuda"), field=FieldStageSettings(field="splatfacto"))
    recipe.check_device("cuda")  # the GPUs are remote: their workers check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Dp360Error, match="--field splatfacto cannot run here"):
        recipe.check_device("cuda")


def test_gsplat_has_no_rasteriser_without_its_kernels():
    """The reason the refusal offers no CPU fallback: gsplat's PyTorch rasterisation still calls
    a CUDA kernel (`rasterize_to_indices_in_range`). If a gsplat upgrade changes this, revisit."""
    import inspect

    import gsplat.cuda._torch_impl as torch_impl

    source = inspect.getsource(torch_impl._rasterize_to_pixels)
    assert "rasterize_to_indices_in_range" in source


# -- nerfacto's hash grid --------------------------------------------------------------------------


def _fake_tinycudann(folder, body: str):
    package = folder / "tinycudann"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(body)
    return folder


def test_hash_grid_backend_and_its_cost(machine, tmp_path, monkeypatch):
    from dp360 import doctor
    from dp360.nerf.method import _has_tcnn

    backend, detail = gpu.hash_grid_backend("cuda")
    assert backend == "torch" and "4-6x slower" in detail and gpu.TCNN_INSTALL in detail
    assert gpu.hash_grid_backend("cpu")[0] == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check = doctor.check_hash_grid()
    assert check.status == "WARN" and gpu.TCNN_INSTALL in check.advice and "4-6x" in check.detail
    # a tinycudann that does not import is no tiny-cuda-nn (nerfstudio would fall back to torch)
    try:
        monkeypatch.syspath_prepend(str(_fake_tinycudann(tmp_path / "broken", "raise OSError('no GPU')")))
        assert gpu.hash_grid_backend("cuda")[0] == "torch" and not _has_tcnn()
        sys.modules.pop("tinycudann", None)
        monkeypatch.syspath_prepend(str(_fake_tinycudann(tmp_path / "working", "")))
        assert gpu.hash_grid_backend("cuda")[0] == "tiny-cuda-nn" and _has_tcnn()
        assert doctor.check_hash_grid().status == "OK"
    finally:
        sys.modules.pop("tinycudann", None)


def test_the_fit_tells_which_hash_grid_it_uses(machine, tmp_path, monkeypatch):
    from dp360.nerf import fit, stage
    from dp360.nerf.common import FitSettings

    monkeypatch.setattr(fit, "fit_field", lambda *args, **kwargs: {"method": "dp360-head"})
    notes = []
    summary = stage.build_fit(
        tmp_path, tmp_path / "nerf", FitSettings.preset("test"), "nerfacto", "cuda", False, notes.append
    )
    assert summary["hash_grid"] == "torch" and len(notes) == 1 and "4-6x slower" in notes[0]
    summary = stage.build_fit(
        tmp_path, tmp_path / "nerf", FitSettings.preset("test"), "nerfacto", "cpu", False, notes.append
    )
    assert summary["hash_grid"] == "torch" and len(notes) == 1  # nothing to choose on the CPU


# -- sizes -----------------------------------------------------------------------------------------


def test_registry_sizes_and_the_readme_and_doctor_figures_agree(tmp_path, monkeypatch):
    from dp360 import doctor, weights
    from dp360.pipeline.registry import default_needs

    assert weights.WEIGHT_FILES["panohead"].size_gb == 0.563
    assert weights.WEIGHT_FILES["data"].size_gb == 0.49
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Two commands") : readme.index("## What you get")]
    section = " ".join(section.split())
    needs_gpu, needs_cpu = default_needs(fp16=True), default_needs(fp16=False)
    required = [need for need in needs_gpu if not need.optional]
    assert f"about {weights.download_gb(required):.1f} GB of weights" in section
    assert f"about {weights.estimated_disk_needed(needs_gpu) / 1e9:.1f} GB free" in section
    assert f"{weights.estimated_disk_needed(needs_cpu) / 1e9:.1f} GB on a CPU" in section
    assert "driver of 580 or newer" in section and "`nvcc`" in section
    # doctor's figure is the fetch's own peak, from the same registry
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor.pending_bytes() == weights.estimated_disk_needed(needs_cpu) == int(29.2e9)
    bigger = {**weights.WEIGHT_FILES}
    bigger["main"] = weights.WeightFile(**{**bigger["main"].__dict__, "size_gb": 20.0})
    monkeypatch.setattr(weights, "WEIGHT_FILES", bigger)
    assert doctor.pending_bytes() == int(40e9)  # the 20 GB checkpoint beside its conversion is the peak now


def test_the_fetch_plan_uses_the_registry_sizes_when_the_server_names_none(monkeypatch):
    from dp360 import weights
    from dp360.pipeline.registry import default_needs

    needs = [need for need in default_needs() if need.name in ("panohead", "data")]
    plan = weights.FetchPlan(needs, {}, {name: object() for name in ("panohead", "data")}, {})
    # raw + converted of PanoHead (563 MB twice), then the zip and its images after it is removed
    assert plan.disk_needed(keep_checkpoints=False) == int(0.563e9) + int(0.49e9) * 2


# -- no GPU at all: the views' time on the CPU -----------------------------------------------------


def _bundle(folder, family: str):
    from dp360.diffusion.models.bundle import BUNDLE_FILE

    folder.mkdir(parents=True)
    (folder / BUNDLE_FILE).write_text(json.dumps({"kind": "main", "family": family}))
    return folder


def test_the_denoising_flops_are_counted_on_the_real_architecture():
    from dp360.estimate import denoising_flops

    unet, controlnet = denoising_flops("sd15")
    # SD1.5's UNet at 512 px is about 0.8 TFLOP a pass; its ControlNet is the encoder half of it
    assert 7e11 < unet < 9e11 and 0.2 * unet < controlnet < 0.5 * unet
    assert sum(denoising_flops("tiny")) < 1e-3 * unet


def test_auto_without_a_gpu_refuses_views_that_take_hours_and_says_how_long(machine, cli, tmp_path, astronaut_path):
    weights = tmp_path / "weights"
    _bundle(weights / "main-fp32", "sd15")
    for command in ("views", "reconstruct"):
        out = tmp_path / f"out-{command}"
        code, stdout, stderr = cli(
            command, astronaut_path, "--out", out, "--weights-dir", weights, "--detector", "dlib"
        )
        text = " ".join(stderr.split())
        assert code == 2 and text.startswith("error: This machine has no GPU, and the 32 views would take at least")
        assert "PFLOP" in text and "pass --device cpu" in text and text.endswith("."), stderr
        assert not out.exists()
    # fewer views and steps: a shorter estimate, in the same words
    code, _, stderr = cli("views", astronaut_path, "--out", tmp_path / "o", "--weights-dir", weights, "--views", "8")
    assert code == 2 and "the 8 views would take" in " ".join(stderr.split())


def test_the_cpu_estimate_leaves_cpu_gpu_tiny_and_absent_models_alone(machine, tmp_path):
    from dp360.estimate import CPU_VIEWS_LIMIT_S, check_cpu_views, views_seconds

    official = _bundle(tmp_path / "sd15", "sd15")
    tiny = _bundle(tmp_path / "tiny", "tiny")
    check_cpu_views("cpu", "cpu", official, True, 32, 50, 3.0)  # asked for: it goes ahead
    check_cpu_views("auto", "cuda", official, True, 32, 50, 3.0)
    check_cpu_views("auto", "cpu", tiny, True, 32, 50, 3.0)
    check_cpu_views("auto", "cpu", tmp_path / "missing", False, 32, 50, 3.0)  # will not run: not fetched
    with pytest.raises(Dp360Error, match="32 views would take at least"):
        check_cpu_views("auto", "cpu", tmp_path / "missing", True, 32, 50, 3.0)  # the official ones, once fetched
    seconds, flops, speed = views_seconds("sd15", 32, 50, 3.0)
    assert seconds > CPU_VIEWS_LIMIT_S and seconds == pytest.approx(flops / speed, rel=0.5)
    # no guidance: one UNet pass fewer per view and step
    assert views_seconds("sd15", 32, 50, 1.0)[1] < 0.7 * flops


# -- --dtype autocast ------------------------------------------------------------------------------


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_float32_weights_in_float16_on_cuda_only(device):
    from dp360.runtime import precision_context, torch_dtype

    layer = torch.nn.Linear(8, 8).to(device, torch_dtype("autocast"))
    assert layer.weight.dtype == torch.float32
    inputs = torch.randn(2, 8, device=device)
    if device == "cpu":
        with pytest.raises(Dp360Error, match="--dtype autocast .* needs a CUDA GPU, not cpu"):
            precision_context("autocast", device)
    else:
        with torch.no_grad(), precision_context("autocast", device):
            assert layer(inputs).dtype == torch.float16
    for name in ("fp32", "bf16", "fp16"):  # the weights' dtype is the compute's: no context
        with torch.no_grad(), precision_context(name, device):
            assert layer(inputs).dtype == torch.float32


def test_autocast_uses_the_float32_bundles(tmp_path):
    from dp360.diffusion.stage import ViewModels

    for precision in ("fp16", "fp32"):
        for kind in ("main", "back"):
            (tmp_path / f"{kind}-{precision}").mkdir()
    assert ViewModels.locate(32, "autocast", tmp_path).main_bundle == tmp_path / "main-fp32"
    assert ViewModels.locate(32, "fp16", tmp_path).main_bundle == tmp_path / "main-fp16"
