"""How long the views take on this CPU, told before a run that would quietly take hours: the
denoising networks' FLOPs counted on the meta device (no weights, no memory) over a quick
measurement of this CPU's matrix-multiply speed. The figure is a lower bound: it counts only the
UNet passes and the camera ControlNet of every view and step, at the best speed this CPU reaches."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from .errors import Dp360Error

# `--device auto` without any GPU: views estimated to take longer than this need `--device cpu`.
CPU_VIEWS_LIMIT_S = 600.0


@functools.lru_cache(maxsize=4)
def denoising_flops(family_name: str) -> tuple[float, float]:
    """(UNet, ControlNet) FLOPs of one forward pass for one view of the model family."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .diffusion.models.components import build_component
    from .diffusion.models.configs import FAMILIES

    family = FAMILIES[family_name]
    side = family.image_size // 8  # the VAE's latent grid
    with torch.device("meta"):
        unet = build_component(family, "unet")
        controlnet = build_component(family, "controlnet")
        latents = torch.zeros(1, family.unet["in_channels"], side, side)
        timestep = torch.tensor([500])
        text = torch.zeros(1, 77, family.unet["cross_attention_dim"])
        camera = torch.zeros(1, 3, family.image_size, family.image_size)
        with FlopCounterMode(display=False) as counted:
            unet(latents, timestep, encoder_hidden_states=text)
        unet_flops = counted.get_total_flops()
        with FlopCounterMode(display=False) as counted:
            controlnet(latents, timestep, encoder_hidden_states=text, controlnet_cond=camera)
        return float(unet_flops), float(counted.get_total_flops())


def cpu_flops_per_second(seconds: float = 0.25) -> float:
    """This CPU's float32 matrix-multiply speed with torch's threads (the best case for a UNet)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * 1024**3 * count / elapsed


def views_seconds(family_name: str, views: int, steps: int, guidance: float) -> tuple[float, float, float]:
    """(seconds at least, FLOPs counted, FLOP/s measured) for the views on this CPU: every view and
    step runs the UNet and the ControlNet, and the UNet once more without conditions when guided."""
    unet, controlnet = denoising_flops(family_name)
    flops = views * steps * (unet * (2 if guidance > 1 else 1) + controlnet)
    speed = cpu_flops_per_second()
    return flops / speed, flops, speed


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} hours"
    return f"{max(1, round(seconds / 60))} minutes"


def bundle_family(main_bundle: Path, downloads: bool) -> str | None:
    """The family the views will run: the converted bundle's, else the official (sd15) one when
    dp360 will fetch it; None when the views stage will not run for want of it."""
    from .diffusion.models.bundle import BUNDLE_FILE

    manifest = Path(main_bundle) / BUNDLE_FILE
    if manifest.is_file():
        try:
            family = json.loads(manifest.read_text()).get("family")
        except (OSError, ValueError, AttributeError):
            return None  # the bundle's own check names what is wrong with it
        return family if isinstance(family, str) else None
    return "sd15" if downloads else None


def check_cpu_views(
    requested: str, device: str, main_bundle: Path, downloads: bool, views: int, steps: int, guidance: float
) -> None:
    """With `--device auto` on a machine without any GPU, views that take longer than
    CPU_VIEWS_LIMIT_S are refused with the estimate; `--device cpu` goes ahead."""
    from .diffusion.models.configs import FAMILIES

    if (requested or "auto").strip().lower() != "auto" or device != "cpu":
        return
    family = bundle_family(main_bundle, downloads)
    if family not in FAMILIES:
        return
    seconds, flops, speed = views_seconds(family, views, steps, guidance)
    if seconds <= CPU_VIEWS_LIMIT_S:
        return
    raise Dp360Error(
        f"This machine has no GPU, and the {views} views would take at least {_duration(seconds)} on its CPU "
        f"({flops / 1e15:.2f} PFLOP of denoising; this CPU multiplies matrices at {speed / 1e9:.0f} GFLOP/s); "
        "pass --device cpu to run them there anyway, or run on a machine with a CUDA GPU."
    )
