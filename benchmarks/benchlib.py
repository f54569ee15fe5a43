"""What the benchmarks share: full-size random weights, clocks, per-component timing by forward
hooks, peak memory, and a one-line description of the machine.

Imported by the benchmark scripts as `benchlib` (their folder is first on `sys.path` when they
run as `python benchmarks/<name>.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dp360.diffusion.models.components import build_component
from dp360.diffusion.models.configs import FAMILIES, ModelFamily
from dp360.runtime import package_version

GIB = 2**30


# -- models ---------------------------------------------------------------------------------------


def family_at(name: str, size: int | None = None) -> ModelFamily:
    """The model family `name` at `size` pixels (the UNet's sample size is size / 8 latents)."""
    family = FAMILIES[name]
    if size is None or size == family.image_size:
        return family
    if size % 64:
        raise SystemExit(f"--size must be a multiple of 64 (the UNet down-samples 8 x 8 latents 3 times), got {size}")
    return dataclasses.replace(family, unet={**family.unet, "sample_size": size // 8}, image_size=size)


@torch.no_grad()
def random_module(
    family: ModelFamily, name: str, device: str, dtype: torch.dtype, generator: torch.Generator
) -> torch.nn.Module:
    """Component `name` with random weights in its own storage on `device` (so memory figures are
    real): built with parameters on the meta device, then each filled in place. Norm layers get
    ones / zeros, biases zeros, weight matrices N(0, 1/fan-in) (embeddings N(0, 0.02^2)); layers
    that training starts at zero (ControlNet zero convs, temporal output layers) are random too."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build_component(family, name)
    for child in module.modules():
        for key, parameter in list(child._parameters.items()):
            if parameter is None:
                continue
            value = torch.empty(parameter.shape, dtype=dtype, device=device)
            if isinstance(child, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                value.fill_(1.0 if key == "weight" else 0.0)
            elif parameter.ndim == 1:
                value.zero_()
            else:
                std = 0.02 if isinstance(child, torch.nn.Embedding) else 1 / math.sqrt(parameter[0].numel())
                value.normal_(0.0, std, generator=generator)
            child._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
        for key, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[key] = buffer.to(device, dtype) if buffer.is_floating_point() else buffer.to(device)
    return module.eval()


def random_components(
    family: ModelFamily, names: Iterable[str], device: str, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.nn.Module]:
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: random_module(family, name, device, dtype, generator) for name in names}


def same_weights_module(family: ModelFamily, name: str, source: torch.nn.Module) -> torch.nn.Module:
    """A new module object of component `name` whose parameters *are* those of `source` (the same
    Parameter objects: a later `.to(dtype)` of `source` converts both)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build_component(family, name)
    parameters = dict(source.named_parameters())
    for child_name, child in module.named_modules():
        for key, parameter in list(child._parameters.items()):
            if parameter is not None:
                child._parameters[key] = parameters[f"{child_name}.{key}" if child_name else key]
    buffers = dict(source.named_buffers())
    for child_name, child in module.named_modules():
        for key, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[key] = buffers[f"{child_name}.{key}" if child_name else key]
    return module.eval()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def quiet_libraries() -> None:
    """diffusers warns on every `.to(dtype)` of a model; transformers on meta construction."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


# -- clocks and memory ----------------------------------------------------------------------------


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if is_cuda(device) else None


def allocated_gib(device: str) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if is_cuda(device) else None


def cpu_peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Stopwatch:
    """Wall seconds of a block, with the device synchronised at both ends."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


class ComponentTimer:
    """Seconds spent in chosen modules, measured by forward pre/post hooks: CUDA events on a GPU
    (no synchronisation inside the run; read after it), perf_counter on a CPU (where every op is
    synchronous). A module running inside another is counted in both (temporal modules run
    inside the UNet)."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)
        self.device = device
        self.spans: dict[str, list] = defaultdict(list)
        self.handles: list = []
        self.active = False
        self._watched: set[int] = set()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def watch(self, module: torch.nn.Module, label: str | Callable[[tuple, dict], str]) -> None:
        """Time `module` under `label` (a name, or a function of the call's args and kwargs); a
        module already watched (shared by two pipelines) is not watched twice."""
        if id(module) in self._watched:
            return
        self._watched.add(id(module))
        open_spans: list[tuple[str, Any]] = []

        def before(_module, args, kwargs):
            if self.active:
                name = label(args, kwargs) if callable(label) else label
                open_spans.append((name, self._now()))

        def after(_module, _args, _output):
            if self.active and open_spans:
                name, start = open_spans.pop()
                self.spans[name].append((start, self._now()))

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(module.register_forward_hook(after))

    def start(self) -> None:
        self.spans.clear()
        self.active = True

    def stop(self) -> dict[str, float]:
        """Seconds per label since `start` (and the number of calls under `label + ' calls'`)."""
        self.active = False
        synchronize(self.device)
        totals: dict[str, float] = {}
        for name, spans in self.spans.items():
            if self.cuda:
                totals[name] = sum(start.elapsed_time(end) for start, end in spans) / 1000
            else:
                totals[name] = sum(end - start for start, end in spans)
            totals[f"{name} calls"] = len(spans)
        return totals

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._watched.clear()


def unet_label(args: tuple, kwargs: dict) -> str:
    """The guided step's conditional pass carries the ControlNet residuals; the unconditional
    one is the plain UNet."""
    return "unet cond" if kwargs.get("down_block_additional_residuals") is not None else "unet uncond"


def watch_pipeline(timer: ComponentTimer, pipeline) -> None:
    """Hooks on the components of a BackViewPipeline or Portrait360Pipeline."""
    timer.watch(pipeline.unet, unet_label)
    timer.watch(pipeline.reference_unet, "reference network")
    timer.watch(pipeline.controlnet, "controlnet")
    embedding = getattr(pipeline.controlnet, "controlnet_cond_embedding", None)
    if embedding is not None:  # inside the ControlNet, or called once per chunk beside it
        timer.watch(embedding, "camera embedding (in or beside controlnet)")
    timer.watch(pipeline.text_encoder, "text encoder")
    timer.watch(pipeline.vae.encoder, "vae encode")
    timer.watch(pipeline.vae.decoder, "vae decode")
    temporal = getattr(pipeline, "temporal", None)
    if temporal is not None:
        for module in list(temporal.down) + list(temporal.up):
            timer.watch(module, "temporal (inside unet)")


# -- reporting ------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = [value for value in values if value == value]  # drop NaN
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return ", ".join(f"{value * scale:.{digits}f}" for value in values)


def rotated(items: list, repeat: int) -> list:
    """The order of the compared variants in repeat `repeat`: rotated by one each time (A B C,
    B C A, C A B, ...), so that no variant always runs first or last."""
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str) -> str:
    if is_cuda(device):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str | None]:
    return {
        "torch": torch.__version__,
        "CUDA (torch build)": torch.version.cuda,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "nerfstudio": package_version("nerfstudio"),
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Machine-readable results for run_all.py (`--json PATH`)."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
