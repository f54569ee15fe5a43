"""The PanoHead generator in the weights cache: pickle -> safetensors + JSON config, and back.

Converted folder (`<cache>/bundles/panohead/`): `generator.safetensors` (the state dict with the
released names), `panohead.json` ({"class_name", "init_kwargs", "source", "source_sha256"}).
Loading builds the network from the recorded kwargs on the meta device and assigns the tensors
strictly, so the file is never held twice in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import Dp360Error
from ..imaging import atomic_directory, file_sha256
from .generator import PanoHeadConfig, PanoHeadGenerator
from .persistence import read_network_pickle

WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "panohead.json"
# Registered on the generator by the training loop after construction; a pickle re-saved from
# rebuilt modules lacks it. It is never used for rendering.
OPTIONAL_KEYS = ("dataset_label_std",)


def panohead_dir() -> Path:
    from ..weights import bundles_dir

    return bundles_dir() / "panohead"


def check_state_dict(generator: PanoHeadGenerator, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise with the offenders unless every parameter and buffer is filled by a tensor of the
    right shape and nothing is left over."""
    expected = generator.state_dict()
    missing = [key for key in expected if key not in state_dict and key not in OPTIONAL_KEYS]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise Dp360Error(
            "The PanoHead weights do not match the network built from their own configuration ("
            + "; ".join(problems)
            + ")."
        )


def convert_panohead_pickle(pickle_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read the released pickle safely and write the converted folder (atomically)."""
    pickle_path = Path(pickle_path)
    if not pickle_path.is_file():
        raise Dp360Error(f"PanoHead pickle '{pickle_path}' does not exist; run `dp360 weights download panohead`.")
    out_dir = Path(out_dir) if out_dir is not None else panohead_dir()
    network = read_network_pickle(pickle_path)
    try:
        config = PanoHeadConfig.from_init_kwargs(network.init_kwargs)
    except (ValueError, KeyError, TypeError) as error:
        raise Dp360Error(f"The PanoHead pickle's generator arguments are not supported: {error}.") from None
    with torch.device("meta"):
        generator = PanoHeadGenerator(config)
    check_state_dict(generator, network.state_dict)
    state = {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in network.state_dict.items()}
    for key in OPTIONAL_KEYS:
        state.setdefault(key, torch.zeros(generator.state_dict()[key].shape))
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as staging:
        save_file(state, str(staging / WEIGHTS_FILE))
        payload = {
            "class_name": network.class_name,
            "init_kwargs": config.init_kwargs(),
            "source": pickle_path.name,
            "source_sha256": file_sha256(pickle_path),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    return out_dir


def save_generator(generator: PanoHeadGenerator, out_dir: str | Path, source: str = "dp360") -> Path:
    """Write a generator (for example a tuned one) in the converted layout."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        save_file(
            {key: value.detach().float().contiguous().cpu() for key, value in generator.state_dict().items()},
            str(staging / WEIGHTS_FILE),
        )
        (staging / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "class_name": "training.triplane.TriPlaneGenerator",
                    "init_kwargs": generator.config.init_kwargs(),
                    "source": source,
                },
                indent=2,
            )
        )
    return out_dir


def load_generator(folder: str | Path | None = None, device: str | torch.device = "cpu") -> PanoHeadGenerator:
    """The converted generator, in eval mode, float32 (StyleGAN ops run in fp32 with optional
    fp16 super-resolution blocks on CUDA, as released)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else panohead_dir()
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise Dp360Error(
            f"The converted PanoHead generator is not at {folder}; run `dp360 weights download panohead` "
            "and `dp360 weights convert panohead` (300 MB, non-commercial licence), or pass --no-3d-noise."
        )
    payload = json.loads(config_path.read_text())
    config = PanoHeadConfig.from_init_kwargs(payload["init_kwargs"])
    with torch.device("meta"):
        generator = PanoHeadGenerator(config)
    state = load_file(str(weights_path), device=str(device))
    check_state_dict(generator, state)
    generator.load_state_dict(state, strict=True, assign=True)
    return generator.to(device).eval().requires_grad_(False)


def panohead_problem(folder: str | Path | None = None) -> str | None:
    folder = Path(folder) if folder is not None else panohead_dir()
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return None
    return (
        f"The converted PanoHead generator is not at {folder}; run `dp360 weights download panohead` and "
        "`dp360 weights convert panohead`, or pass --no-3d-noise."
    )
