"""Official checkpoint file -> a bundle folder of diffusers components in safetensors -> pipelines.

Bundle layout: `<dir>/{unet,reference_unet,controlnet,vae,text_encoder[,temporal]}/` (each the
component's own `save_pretrained` folder), `<dir>/scheduler/`, and `<dir>/dp360_bundle.json`
({"kind": "main" | "back", "family": "sd15" | "tiny", "source": ..., "dtype": ...}).

Conversion builds the components on the meta device and assigns the checkpoint's tensors, so a
2.7 B-parameter checkpoint is never held twice; the few entries no checkpoint carries (sinusoidal
position tables, CLIP position ids, the reference network's unused output head) are computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import Dp360Error
from ..imaging import atomic_directory
from .components import BACK_COMPONENTS, MAIN_COMPONENTS, build_components, component_config
from .configs import FAMILIES, ModelFamily
from .convert import convert_official

BUNDLE_FILE = "dp360_bundle.json"
KIND_COMPONENTS = {"main": MAIN_COMPONENTS, "back": BACK_COMPONENTS}


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.th` state dict, read without executing pickled code and memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise Dp360Error(f"Checkpoint '{path}' does not exist; download it with `dp360 weights download`.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable file
        raise Dp360Error(f"Checkpoint '{path}' cannot be read as a state dict ({type(error).__name__}: {error}); re-download it.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise Dp360Error(f"Checkpoint '{path}' holds a {type(state).__name__}, not a state dict; is it the right file?")
    return state


def _materialize_computed(module: torch.nn.Module) -> None:
    """Fill what is still on the meta device after loading: values computed, never trained."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    for module_name, child in module.named_modules():
        for buffers, attribute in ((child._parameters, "parameter"), (child._buffers, "buffer")):
            for name, tensor in list(buffers.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if isinstance(child, SinusoidalPositionalEmbedding) and name == "pe":
                    value = SinusoidalPositionalEmbedding(tensor.shape[-1], tensor.shape[1]).pe
                elif name == "position_ids":
                    value = torch.arange(tensor.shape[-1]).expand(tensor.shape).clone()
                elif module_name.startswith("conv_norm_out") or module_name.startswith("conv_out"):
                    # The reference network's output head: evaluated but its result is never used.
                    value = torch.ones(tensor.shape) if (name == "weight" and module_name.startswith("conv_norm_out")) else torch.zeros(tensor.shape)
                else:
                    raise Dp360Error(f"{attribute} {module_name}.{name} was not filled by the checkpoint")
                buffers[name] = torch.nn.Parameter(value, requires_grad=False) if attribute == "parameter" else value


def convert_to_bundle(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    kind: str,
    family: ModelFamily | str = "sd15",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Convert an official checkpoint (`main`: model_state-340000.th, `back`: back_head-230000.th)
    into a bundle folder; nothing is left at `out_dir` if any step fails."""
    from diffusers import DDIMScheduler

    family = FAMILIES[family] if isinstance(family, str) else family
    names = KIND_COMPONENTS[kind]
    checkpoint = load_official_checkpoint(checkpoint_path)
    with torch.device("meta"):
        components = build_components(family, names)
    targets = {name: (component_config(family, name), {k: v.shape for k, v in module.state_dict().items()}) for name, module in components.items()}
    report = convert_official(checkpoint, targets)
    with atomic_directory(out_dir) as staging:
        for name, module in components.items():
            module.load_state_dict(report.state_dicts[name], strict=False, assign=True)
            _materialize_computed(module)
            module.to(dtype).save_pretrained(staging / name, safe_serialization=True)
        DDIMScheduler(**family.scheduler).save_pretrained(staging / "scheduler")
        manifest = {"kind": kind, "family": family.name, "source": str(checkpoint_path), "dtype": str(dtype).removeprefix("torch."), "ignored_keys": len(report.ignored)}
        (staging / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def load_bundle(bundle_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A `BackViewPipeline` or `Portrait360Pipeline` from a bundle folder."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline
    from .temporal import TemporalModules

    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / BUNDLE_FILE
    if not manifest_path.is_file():
        raise Dp360Error(f"'{bundle_dir}' is not a converted dp360 bundle (no {BUNDLE_FILE}); run `dp360 weights convert`.")
    manifest = json.loads(manifest_path.read_text())
    classes = {"unet": UNet2DConditionModel, "reference_unet": UNet2DConditionModel, "controlnet": ControlNetModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "temporal": TemporalModules}
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    components = {name: classes[name].from_pretrained(bundle_dir / name, **kwargs).eval() for name in KIND_COMPONENTS[manifest["kind"]]}
    scheduler = DDIMScheduler.from_pretrained(bundle_dir / "scheduler")
    pipeline_class = Portrait360Pipeline if manifest["kind"] == "main" else BackViewPipeline
    return pipeline_class(scheduler=scheduler, **components).to(device)
