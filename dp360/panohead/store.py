"""The PanoHead generator in the weights cache: pickle -> safetensors + JSON config, and back.

Converted folder (`<cache>/bundles/panohead/`): `generator.safetensors` (the state dict with the
released names), `panohead.json` ({"format": "dp360-panohead", "dp360_version", "class_name",
"init_kwargs", "source", "source_sha256"}). Only a folder with that format name is replaced by a
conversion; loading reads older conversions (without it) too.
Loading builds the network from the recorded kwargs on the meta device and assigns the tensors
strictly, so the file is never held twice in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_directory, file_sha256
from ..cache import panohead_dir
from ..errors import Dp360Error
from ..outputs import check_output_folder
from ..safety import MAX_CONFIG_BYTES, one_line, read_json_object, read_plain_file, safetensors_header, shape_problems
from ..weights import Installer
from .generator import PanoHeadConfig, PanoHeadGenerator
from .persistence import PickledNetwork, read_network_pickle

WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "panohead.json"
# Registered on the generator by the training loop after construction; a pickle re-saved from
# rebuilt modules lacks it. It is never used for rendering.
OPTIONAL_KEYS = ("dataset_label_std",)
# panohead.json's "format": only dp360 writes it, so a conversion replaces only such a folder.
PANOHEAD_FORMAT = "dp360-panohead"


# The released generator holds 55 M values; a configuration asking for far more is not PanoHead
# (and its tensors, stride tricks in a pickle included, would be materialised at that size).
MAX_GENERATOR_VALUES = 500_000_000
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_state_dict(
    generator: PanoHeadGenerator, state_dict: dict[str, torch.Tensor], source: str = "The PanoHead weights"
) -> None:
    """Raise with the offenders unless every parameter and buffer is filled by a tensor of the
    right shape and nothing is left over."""
    expected = {key: value.shape for key, value in generator.state_dict().items()}
    problems = shape_problems(expected, {key: value.shape for key, value in state_dict.items()}, OPTIONAL_KEYS)
    if problems:
        raise Dp360Error(f"{source} does not match the network built from its own configuration ({problems}).")


def _build_on_meta(config: PanoHeadConfig, source: str, advice: str) -> PanoHeadGenerator:
    try:
        with torch.device("meta"):
            generator = PanoHeadGenerator(config)
    except Exception as error:  # noqa: BLE001 - the bounded config still asks for something unbuildable
        raise Dp360Error(
            f"{source} describes a generator dp360 cannot build ({type(error).__name__}: {one_line(error)}); {advice}."
        ) from None
    values = sum(tensor.numel() for tensor in generator.state_dict().values())
    if values > MAX_GENERATOR_VALUES:
        raise Dp360Error(
            f"{source} describes a generator of {values / 1e6:.0f} M values, more than dp360's limit of "
            f"{MAX_GENERATOR_VALUES / 1e6:.0f} M; {advice}."
        )
    return generator


def _panohead_refusal(folder: Path) -> str | None:
    """None when `folder` is a generator dp360 converted (which a conversion may replace), else
    why not: it must hold exactly the two plain files (no links) and a config carrying dp360's
    format name. A look-alike (the right names and shapes, but not written by dp360) is the user's."""
    not_ours = "already holds files that are not a converted dp360 PanoHead generator"
    try:
        entries = {entry.name: entry for entry in os.scandir(folder)}
        if set(entries) != {CONFIG_FILE, WEIGHTS_FILE} or not all(
            entry.is_file(follow_symlinks=False) for entry in entries.values()
        ):
            return not_ours
        config = json.loads(read_plain_file(folder / CONFIG_FILE, MAX_CONFIG_BYTES))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return not_ours
    if not isinstance(config, dict) or config.get("format") != PANOHEAD_FORMAT:
        return not_ours
    return None


def _identity() -> dict[str, str]:
    from .. import __version__

    return {"format": PANOHEAD_FORMAT, "dp360_version": __version__}


def check_panohead_pickle(pickle_path: str | Path) -> tuple[PickledNetwork, PanoHeadGenerator]:
    """Read the released pickle without running its code, and check that its tensors fill the
    generator its own (bounded) configuration describes, built on the meta device."""
    network = read_network_pickle(pickle_path)
    source = f"The pickle '{pickle_path}'"
    advice = "download the released file again with `dp360 weights download panohead`"
    config = PanoHeadConfig.from_init_kwargs(network.init_kwargs, source, advice)
    generator = _build_on_meta(config, source, advice)
    check_state_dict(generator, network.state_dict, source)
    return network, generator


def convert_panohead_pickle(pickle_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read the released pickle safely and write the converted folder (atomically). `out_dir` may
    be new, empty or a converted generator (replaced), never a folder holding anything else."""
    pickle_path = Path(pickle_path)
    if not pickle_path.is_file():
        raise Dp360Error(f"PanoHead pickle '{pickle_path}' does not exist; run `dp360 weights download panohead`.")
    out_dir = Path(out_dir) if out_dir is not None else panohead_dir()

    def check_out() -> Path:
        return check_output_folder(out_dir, [pickle_path], _panohead_refusal)

    out = check_out()
    network, generator = check_panohead_pickle(pickle_path)
    state = {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in network.state_dict.items()}
    for key in OPTIONAL_KEYS:
        state.setdefault(key, torch.zeros(generator.state_dict()[key].shape))
    from safetensors.torch import save_file

    with atomic_directory(out) as staging:
        save_file(state, str(staging / WEIGHTS_FILE))
        payload = {
            **_identity(),
            "class_name": network.class_name,
            "init_kwargs": generator.config.init_kwargs(),
            "source": pickle_path.name,
            "source_sha256": file_sha256(pickle_path),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
        check_out()  # again: the user may have put files there while we converted
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
                    **_identity(),
                    "class_name": "training.triplane.TriPlaneGenerator",
                    "init_kwargs": generator.config.init_kwargs(),
                    "source": source,
                },
                indent=2,
            )
        )
    return out_dir


def _checked_folder(folder: Path, advice: str) -> PanoHeadGenerator:
    """The generator (on the meta device) that the converted folder describes, after checking its
    config and that the weights file's header matches it, without reading the tensors."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    payload = read_json_object(config_path, advice)
    if "init_kwargs" not in payload:
        raise Dp360Error(f"'{config_path}' has no init_kwargs; {advice}.")
    init_kwargs = payload["init_kwargs"]
    config = PanoHeadConfig.from_init_kwargs(init_kwargs, f"'{config_path}'", advice)
    generator = _build_on_meta(config, f"'{config_path}'", advice)
    header = safetensors_header(weights_path, advice)
    odd = sorted({dtype for _, dtype in header.values()} - set(FLOAT_DTYPES))
    if odd:
        raise Dp360Error(f"'{weights_path}' holds {', '.join(odd)} tensors, not floating-point weights; {advice}.")
    expected = {key: value.shape for key, value in generator.state_dict().items()}
    problems = shape_problems(expected, {key: shape for key, (shape, _) in header.items()}, OPTIONAL_KEYS)
    if problems:
        raise Dp360Error(f"'{weights_path}' does not match '{config_path}' ({problems}); {advice}.")
    return generator


def _missing_message(folder: Path) -> str:
    return (
        f"The converted PanoHead generator is not at {folder}; run `dp360 weights download panohead` (300 MB, "
        "non-commercial licence; converted into dp360's cache), or `dp360 weights convert panohead --checkpoint FILE "
        f"--out {folder}`, or pass --no-3d-noise."
    )


def load_generator(folder: str | Path | None = None, device: str | torch.device = "cpu") -> PanoHeadGenerator:
    """The converted generator, in eval mode, float32 (StyleGAN ops run in fp32 with optional
    fp16 super-resolution blocks on CUDA, as released)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else panohead_dir()
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise Dp360Error(_missing_message(folder))
    advice = "convert the PanoHead pickle again with `dp360 weights convert panohead`"
    generator = _checked_folder(folder, advice)
    try:
        state = {key: value.float() for key, value in load_file(str(folder / WEIGHTS_FILE), device=str(device)).items()}
    except Exception as error:  # noqa: BLE001 - the file changed or broke after its header was checked
        raise Dp360Error(f"'{folder / WEIGHTS_FILE}' cannot be read ({one_line(error)}); {advice}.") from None
    for key in OPTIONAL_KEYS:
        state.setdefault(key, torch.zeros(generator.state_dict()[key].shape, device=device))
    generator.load_state_dict(state, strict=True, assign=True)
    return generator.to(device).eval().requires_grad_(False)


def check_present_generator(folder: str | Path) -> None:
    """Refuse, with the sentence naming the file, a converted generator that is there but damaged:
    a run asked for 3D-aware noise must not quietly fall back to plain noise (a missing generator is
    not damage: the noise stage is then reported as not available)."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        _checked_folder(
            folder,
            "convert the PanoHead pickle again with `dp360 weights convert panohead`, or pass --no-3d-noise "
            "to start the views from plain noise",
        )


def panohead_problem(folder: str | Path | None = None) -> str | None:
    """Why the converted generator cannot be used (missing, or a damaged file), or None."""
    folder = Path(folder) if folder is not None else panohead_dir()
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return _missing_message(folder)
    try:
        _checked_folder(folder, "convert the PanoHead pickle again with `dp360 weights convert panohead`")
    except Dp360Error as error:
        return str(error)
    return None


def _install_generator(raw: Path, target: Path) -> None:
    convert_panohead_pickle(raw, target)
    problem = panohead_problem(target)
    if problem:
        raise Dp360Error(problem)


# How `dp360.weights` makes the converted generator from the released pickle, and recognises it.
PANOHEAD_INSTALLER = Installer(
    present=lambda target: (target / CONFIG_FILE).is_file() and (target / WEIGHTS_FILE).is_file(),
    install=_install_generator,
)
