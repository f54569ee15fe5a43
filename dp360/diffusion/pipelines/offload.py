"""Where the pipelines' networks live while they run: an explicit offload plan, a low-VRAM mode on
diffusers' group offloading, and opt-in torch.compile.

`--offload` (`PhaseOffload`): a pipeline call is a sequence of phases (embed the empty prompt,
VAE-encode, denoise, VAE-decode, idle). Each pipeline class declares, in `offload_plan`, which
components each phase runs; at every phase boundary the components the phase needs move to the
execution device and every other one moves to the offload device (CPU), the idle ones first so
that the device never holds both. The denoising networks (unet, temporal, reference_unet,
controlnet) are one phase and stay resident together for all steps: nothing crosses PCIe during
denoising. diffusers' `enable_model_cpu_offload` is not used: its hooks sit on each component's
`forward`, which the temporal modules never run (the UNet calls their submodules from its own
hooks), so they would stay on the CPU; and chained hooks would move the reference network and the
ControlNet to and fro at every step.

`--low-vram` (`enable_low_vram`): meant for 8-12 GB cards (its peak memory is for the GPU
benchmarks to measure). Weights live in CPU memory and diffusers' group offloading moves one block
at a time to the device while it runs (`LOW_VRAM_LAYOUT`), so the device holds the activations
plus one block. Every weight crosses PCIe at every use, so it is much slower than `--offload`.
Transfers are synchronous: diffusers' stream prefetching follows an execution order traced
through each component's `forward`, which the temporal modules never run. It needs a CUDA GPU
(`low_vram_problem` refuses the CPU and MPS: there is no separate device memory to save).

`--compile` (`enable_compile`): `nn.Module.compile` on the UNet (with the temporal modules that
its hooks call), the reference network and the ControlNet. The first step pays the compilation.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping

import torch
from torch import nn

PHASES = ("prompt", "encode", "denoise", "decode", "idle")

# Component -> how group offloading cuts it (`enable_low_vram`). UNet-like networks are cut at
# their top-level blocks: the reference attention and temporal hooks run inside those blocks.
# The ControlNet's conditioning embedding is its own block, since the pipelines call it directly
# (once per window), not through the ControlNet's forward. The VAE is entered through
# `encode`/`decode`, not `forward`: diffusers names its encoder, decoder and convolutions as
# blocks (`_group_offload_block_modules`). The text encoder is cut per layer.
LOW_VRAM_LAYOUT: dict[str, dict] = {
    "unet": {"offload_type": "block_level", "num_blocks_per_group": 1},
    "reference_unet": {"offload_type": "block_level", "num_blocks_per_group": 1},
    "controlnet": {
        "offload_type": "block_level",
        "num_blocks_per_group": 1,
        "block_modules": ["controlnet_cond_embedding"],
    },
    "temporal": {"offload_type": "block_level", "num_blocks_per_group": 1},
    "vae": {"offload_type": "block_level", "num_blocks_per_group": 1},
    "text_encoder": {"offload_type": "leaf_level"},
}

COMPILED = ("unet", "reference_unet", "controlnet")


def parameterised_components(pipeline) -> dict[str, nn.Module]:
    """The registered components of a pipeline that hold weights (the scheduler holds none)."""
    return {
        name: module
        for name, module in pipeline.components.items()
        if isinstance(module, nn.Module) and any(True for _ in module.parameters())
    }


def plan_gaps(pipeline) -> tuple[list[str], list[str]]:
    """(components with weights that no phase of the plan names and that are not excluded, names in
    the plan or the exclusions that are no component). Both empty for a complete plan."""
    plan: Mapping[str, tuple[str, ...]] = pipeline.offload_plan
    excluded: Mapping[str, str] = getattr(pipeline, "offload_excluded", {})
    planned = {name for names in plan.values() for name in names}
    components = parameterised_components(pipeline)
    unplanned = sorted(set(components) - planned - set(excluded))
    unknown = sorted((planned | set(excluded)) - set(pipeline.components))
    return unplanned, unknown


class PhaseOffload:
    """Moves a pipeline's components between the execution device and the offload device at
    phase boundaries, following the pipeline's `offload_plan`. `where` and `move` are the only
    places that touch devices (a test overrides them to record the moves)."""

    def __init__(self, pipeline, device: str | torch.device, offload_device: str | torch.device = "cpu"):
        unplanned, unknown = plan_gaps(pipeline)
        if unplanned or unknown:
            raise ValueError(
                f"{type(pipeline).__name__}.offload_plan does not fit its components: "
                f"unplanned {unplanned}, unknown {unknown}"
            )
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.plan = {phase: tuple(names) for phase, names in pipeline.offload_plan.items()}
        missing = [phase for phase in PHASES if phase not in self.plan]
        if missing:
            raise ValueError(f"{type(pipeline).__name__}.offload_plan has no phase {missing}")
        self.modules = {name: getattr(pipeline, name) for names in self.plan.values() for name in names}
        self.phase: str | None = None

    def where(self, name: str) -> torch.device:
        return next(self.modules[name].parameters()).device

    def move(self, name: str, device: torch.device) -> None:
        self.modules[name].to(device)

    def _same(self, a: torch.device, b: torch.device) -> bool:
        return a.type == b.type and (a.index or 0) == (b.index or 0)

    def enter(self, phase: str) -> None:
        """Make `phase`'s components resident on the device and every other one offloaded; the
        offloads come first, so that the device never holds both."""
        needed = set(self.plan[phase])
        for name in self.modules:
            if name not in needed and not self._same(self.where(name), self.offload_device):
                self.move(name, self.offload_device)
        for name in self.plan[phase]:
            if not self._same(self.where(name), self.device):
                self.move(name, self.device)
        self.phase = phase


def low_vram_problem(device: str) -> str | None:
    """Why `--low-vram` cannot run on `device`, in one sentence, or None."""
    kind = torch.device(device).type
    if kind != "cuda":
        return (
            f"--low-vram keeps the weights in CPU memory and moves them to the GPU block by block, "
            f"which saves nothing on {device}; drop it, or run on a CUDA GPU."
        )
    return None


def apply_low_vram(pipeline, device: str | torch.device) -> None:
    """Group offloading of every planned component onto `device` (weights kept in CPU memory)."""
    from diffusers.hooks import apply_group_offloading

    unplanned, unknown = plan_gaps(pipeline)
    components = parameterised_components(pipeline)
    layout_gaps = sorted(set(components) - set(LOW_VRAM_LAYOUT) - set(getattr(pipeline, "offload_excluded", {})))
    if unplanned or unknown or layout_gaps:
        raise ValueError(
            f"{type(pipeline).__name__} has components without a low-VRAM layout: {unplanned + layout_gaps}"
        )
    device = torch.device(device)
    use_stream = False  # streams prefetch in a traced order; the temporal modules are never traced
    for name, module in components.items():
        module.to("cpu")
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device=torch.device("cpu"),
            use_stream=use_stream,
            **LOW_VRAM_LAYOUT[name],
        )


def compile_problem(device: str) -> str | None:
    """Why `--compile` cannot work on `device` here, in one sentence, or None."""
    kind = torch.device(device).type
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        return f"--compile needs torch.compile, which torch {torch.__version__} does not have; drop --compile."
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return (
            "--compile on a CUDA GPU needs the 'triton' package, which is not installed; install it or drop --compile."
        )
    if kind == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile."
    if kind not in ("cuda", "cpu"):
        return f"--compile is supported on CUDA GPUs and the CPU, not on {device}; drop --compile."
    return None


def apply_compile(pipeline, backend: str = "inductor", mode: str | None = None) -> None:
    """Compile the networks that run at every step, in place (their weights, names and configs
    stay as they are). Shapes are static: a call compiles a few graphs (the reference pass at
    batch 2, the ControlNet, the UNet with and without banks, and with its bank projections
    computed or reused) and no step after the first compiles again; dynamic shapes would trace
    them symbolically, which takes far longer for no gain here."""
    import torch._dynamo

    # The UNet and the reference network share their forward's code, and the back-view model
    # adds its own batch-1 variants: more graphs per function than dynamo's default 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
            break
    for name in COMPILED:
        module = getattr(pipeline, name, None)
        if module is not None:
            module.compile(backend=backend, mode=mode, dynamic=False)
