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
import os
from pathlib import Path

import torch

from ... import __version__
from ...atomic import atomic_directory
from ...errors import Dp360Error
from ...outputs import check_output_folder
from ...safety import (
    ConfigError,
    check_bounds,
    load_tensors,
    one_line,
    read_json_object,
    read_plain_file,
    safetensors_header,
    shape_problems,
)
from ...weights import Installer
from .components import BACK_COMPONENTS, MAIN_COMPONENTS, build_components, component_config
from .configs import FAMILIES, FORWARD_COEFFICIENTS, ModelFamily
from .convert import SCHEDULE_BUFFERS, ConversionError, convert_official

BUNDLE_FILE = "dp360_bundle.json"
BUNDLE_FORMAT = "dp360-bundle"  # the manifest's "format": only dp360 writes it
KIND_COMPONENTS = {"main": MAIN_COMPONENTS, "back": BACK_COMPONENTS}
SCHEDULER_DIR, SCHEDULER_FILE = "scheduler", "scheduler_config.json"
# The checkpoint's own DDPM buffers at their stored dtype (float16 in the release): its DDIM sampler
# derives every coefficient from them, so dp360 does too when they are present.
RELEASE_SCHEDULE_FILE = "release_schedule.safetensors"
WEIGHT_FILES = {"text_encoder": "model.safetensors"}  # the others: diffusion_pytorch_model.safetensors

# Bounds on every component config.json (diffusers and transformers keys), checked before a module
# is built; comfortably above SD1.5 and its CLIP ViT-L text encoder (values in comments).
COMPONENT_BOUNDS = {
    # module counts: a hostile value here makes construction hang
    "layers_per_block": (1, 16),  # 2
    "transformer_layers_per_block": (1, 16),  # 1
    "num_hidden_layers": (1, 64),  # 12
    "block_out_channels": (1, 8192),  # 320..1280, at most MAX_LIST_ITEMS blocks
    "conditioning_embedding_out_channels": (1, 8192),  # 16..256
    # widths and sizes
    "in_channels": (1, 8192),  # 4
    "out_channels": (1, 8192),  # 4
    "latent_channels": (1, 8192),  # 4
    "conditioning_channels": (1, 8192),  # 3
    "cross_attention_dim": (1, 8192),  # 768
    "hidden_size": (1, 8192),  # 768
    "intermediate_size": (1, 32768),  # 3072
    "projection_dim": (1, 8192),  # 768
    "encoder_hid_dim": (1, 8192),  # null
    "time_embedding_dim": (1, 8192),  # null
    "time_cond_proj_dim": (1, 8192),  # null
    "projection_class_embeddings_input_dim": (1, 8192),  # null
    "addition_time_embed_dim": (1, 8192),  # null
    "num_class_embeds": (1, 100_000),  # null
    "norm_num_groups": (1, 8192),  # 32
    "attention_head_dim": (1, 8192),  # 8 (diffusers' legacy name for the head count)
    "num_attention_heads": (1, 256),  # 8, 12
    "addition_embed_type_num_heads": (1, 256),  # 64
    "conv_in_kernel": (1, 15),  # 3
    "conv_out_kernel": (1, 15),  # 3
    "sample_size": (1, 2048),  # 64 (UNet latents), 512 (VAE)
    "max_seq_length": (1, 1024),  # 24 temporal positions
    "max_position_embeddings": (1, 4096),  # 77
    "vocab_size": (1, 262_144),  # 49408
}

# The scheduler config (diffusers' DDIMScheduler keys), checked before the scheduler is built: a value
# that is not finite or outside these ranges gives NaN latents (all-black views) or an index error
# mid-run. dp360 writes SD1.5's schedule (values in comments).
SCHEDULER_BOUNDS = {
    # a table of this many betas is allocated; every --steps value (up to 1000) must fit in it
    "num_train_timesteps": (1000, 10_000),  # 1000
    "steps_offset": (0, 1),  # 1 (more pushes the first "leading" timestep past the table's end)
    "clip_sample_range": (1e-3, 1e3),  # 1.0
    "sample_max_value": (1e-3, 1e3),  # 1.0
    "dynamic_thresholding_ratio": (1e-3, 1.0),  # 0.995
}
SCHEDULER_CHOICES = {
    "beta_schedule": ("scaled_linear", "linear", "squaredcos_cap_v2"),  # scaled_linear
    "timestep_spacing": ("leading", "trailing", "linspace"),  # leading
    "prediction_type": ("epsilon",),  # dp360's networks predict the noise
}
SCHEDULER_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr")


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.th` state dict, read without executing pickled code (memory-mapped when possible)."""
    path = Path(path)
    if not path.is_file():
        raise Dp360Error(f"Checkpoint '{path}' does not exist; download it with `dp360 weights download`.")
    advice = "re-download the official file with `dp360 weights download`"
    state = load_tensors(path, advice)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise Dp360Error(f"Checkpoint '{path}' holds a {type(state).__name__}, not a state dict; {advice}.")
    # Only tensors can fill a component; other entries (a step counter) are not weights.
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def _stored_dtype(module: torch.nn.Module, key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating-point tensor `key` of `module` is stored in: `dtype`, or float32 under the
    modules its class keeps in float32 (`_keep_in_fp32_modules`, matched as diffusers' loader does)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    return torch.float32 if any(part in key.split(".") for part in keep) else dtype


def _in_dtype(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with its floating-point tensors in the dtype they are stored in. A module assigned these
    is built in that dtype: casting it afterwards with `ModelMixin.to(dtype)` makes diffusers warn
    about float32 modules once per component (it warns at every cast, even with none to keep)."""
    return {
        key: value.to(_stored_dtype(module, key, dtype)) if value.is_floating_point() else value
        for key, value in state.items()
    }


def _materialize_computed(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Fill what is still on the meta device after loading: values computed, never trained (the
    floating-point ones in the dtype they are stored in)."""
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
                    value = (
                        torch.ones(tensor.shape)
                        if (name == "weight" and module_name.startswith("conv_norm_out"))
                        else torch.zeros(tensor.shape)
                    )
                else:
                    raise Dp360Error(f"{attribute} {module_name}.{name} was not filled by the checkpoint")
                if value.is_floating_point():
                    value = value.to(_stored_dtype(module, f"{module_name}.{name}", dtype))
                buffers[name] = torch.nn.Parameter(value, requires_grad=False) if attribute == "parameter" else value


def _bundle_refusal(folder: Path, kind: str) -> str | None:
    """None when `folder` is a dp360 bundle of `kind` (which a conversion may replace), else what
    it holds instead. It must hold exactly the files its dp360_bundle.json lists as written by
    dp360 (no links, nothing else): anything else is the user's."""
    not_ours = f"already holds files that are not a dp360 {kind} bundle"
    manifest_path = folder / BUNDLE_FILE
    try:
        manifest = json.loads(read_plain_file(manifest_path, 1 << 20))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return not_ours
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        return not_ours
    listed = manifest.get("files")
    if not (isinstance(listed, list) and all(isinstance(name, str) for name in listed)):
        return not_ours
    found_files = set()
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            return not_ours
        if path.is_file() and path != manifest_path:
            found_files.add(path.relative_to(folder).as_posix())
    if not found_files <= set(listed):
        return not_ours
    found = manifest.get("kind")
    if found != kind:
        return f"holds a dp360 {found} bundle, not a {kind} one" if found in KIND_COMPONENTS else not_ours
    return None


def convert_to_bundle(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    kind: str,
    family: ModelFamily | str = "sd15",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Convert an official checkpoint (`main`: model_state-340000.th, `back`: back_head-230000.th)
    into a bundle folder; nothing is left at `out_dir` if any step fails. `out_dir` may be new, empty
    or a bundle of the same kind (replaced atomically), never a folder holding anything else."""
    from diffusers import DDIMScheduler

    if kind not in KIND_COMPONENTS:
        raise Dp360Error(f"Unknown bundle kind '{kind}'; use main or back.")
    if isinstance(family, str):
        if family not in (*FAMILIES, "auto"):
            raise Dp360Error(f"Unknown model family '{family}'; use {' or '.join(FAMILIES)}.")
        family = FAMILIES.get(family, family)
    names = KIND_COMPONENTS[kind]
    if not Path(checkpoint_path).is_file():
        raise Dp360Error(f"Checkpoint '{checkpoint_path}' does not exist; download it with `dp360 weights download`.")

    def check_out() -> Path:
        return check_output_folder(out_dir, [checkpoint_path], lambda folder: _bundle_refusal(folder, kind))

    out = check_out()  # before the checkpoint is read: conversion takes minutes at full size
    checkpoint = load_official_checkpoint(checkpoint_path)
    # "auto": the family whose shapes the checkpoint fills (the released files are sd15, tried first)
    candidates = list(FAMILIES.values()) if family == "auto" else [family]
    first_error: ConversionError | None = None
    for candidate in candidates:
        with torch.device("meta"):
            components = build_components(candidate, names)
        targets = {
            name: (component_config(candidate, name), {k: v.shape for k, v in module.state_dict().items()})
            for name, module in components.items()
        }
        try:
            report = convert_official(checkpoint, targets)
        except ConversionError as error:
            first_error = first_error or error
            continue
        family = candidate
        break
    else:  # the first family's complaint (the released sd15 one under "auto"), naming the file
        raise ConversionError(
            str(first_error).replace("The checkpoint", f"The checkpoint '{checkpoint_path}'", 1)
        ) from None
    with atomic_directory(out) as staging:
        for name, module in components.items():
            module.load_state_dict(_in_dtype(module, report.state_dicts[name], dtype), strict=False, assign=True)
            _materialize_computed(module, dtype)
            module.save_pretrained(staging / name, safe_serialization=True)
        DDIMScheduler(**family.scheduler).save_pretrained(staging / SCHEDULER_DIR)
        stored = {key: checkpoint[key].contiguous() for key in SCHEDULE_BUFFERS if key in checkpoint}
        if stored:
            from safetensors.torch import save_file

            save_file(stored, str(staging / SCHEDULER_DIR / RELEASE_SCHEDULE_FILE))
        manifest = {
            "format": BUNDLE_FORMAT,
            "dp360_version": __version__,
            "kind": kind,
            "family": family.name,
            "source": str(checkpoint_path),
            "dtype": str(dtype).removeprefix("torch."),
            "ignored_keys": len(report.ignored),
            # what this conversion wrote: a later conversion replaces the folder only if it holds
            # nothing else (a user's file beside look-alike entries is never deleted)
            "files": sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file()),
        }
        (staging / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        check_out()  # again: the user may have put files there while we converted
    return Path(out_dir)


def _component_classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .temporal import TemporalModules

    return {
        "unet": UNet2DConditionModel,
        "reference_unet": UNet2DConditionModel,
        "controlnet": ControlNetModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "temporal": TemporalModules,
    }


def _check_component(folder: Path, name: str, advice: str) -> None:
    """Validate a component folder before the libraries load it: its config is a bounded JSON
    object, and its weights file holds exactly the tensors of the module that config builds (so
    loading neither hangs, nor allocates more than the file holds, nor fills anything at random)."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        what = "is not a folder" if os.path.lexists(folder) else "is missing"
        raise ConfigError(f"The bundle's {name} folder '{folder}' {what}; {advice}.")
    config = read_json_object(config_path, advice)
    check_bounds(config, COMPONENT_BOUNDS, f"'{config_path}'", advice)
    cls = _component_classes()[name]
    try:
        with torch.device("meta"):
            if name == "text_encoder":
                from transformers import CLIPTextConfig

                module = cls(CLIPTextConfig.from_dict(config))
            else:
                module = cls.from_config(config)
    except Exception as error:  # noqa: BLE001 - any refusal by the library means an unusable config
        raise Dp360Error(
            f"'{config_path}' is not a valid {cls.__name__} configuration ({type(error).__name__}: {one_line(error)}); {advice}."
        ) from None
    weights_path = folder / WEIGHT_FILES.get(name, "diffusion_pytorch_model.safetensors")
    found = {key: shape for key, (shape, _) in safetensors_header(weights_path, advice).items()}
    problems = shape_problems({key: value.shape for key, value in module.state_dict().items()}, found)
    if problems:
        raise Dp360Error(f"'{weights_path}' does not match its config.json ({problems}); {advice}.")


def check_bundle(bundle_dir: str | Path, expect: str | None = None) -> str:
    """Check a bundle folder without loading its weights (manifest, every component's config and
    tensor names and shapes, the scheduler); returns its kind, which must be `expect` when given."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / BUNDLE_FILE
    if not manifest_path.is_file():
        raise Dp360Error(
            f"'{bundle_dir}' is not a converted dp360 bundle (no {BUNDLE_FILE}); run `dp360 weights convert KIND --out FOLDER`."
        )
    kind = read_json_object(
        manifest_path, "convert the checkpoint again with `dp360 weights convert KIND --out FOLDER`"
    ).get("kind")
    if kind not in KIND_COMPONENTS:
        raise Dp360Error(
            f"'{manifest_path}' names an unknown bundle kind {one_line(repr(kind), 40)} (expected main or back); "
            "convert the checkpoint again with `dp360 weights convert KIND --out FOLDER`."
        )
    if expect is not None and kind != expect:
        raise Dp360Error(
            f"'{bundle_dir}' holds a dp360 {kind} bundle where the {expect} bundle is needed; point dp360 at the "
            f"{expect} bundle, or convert it with `dp360 weights convert {expect}`."
        )
    advice = _reconvert_advice(kind)
    for name in KIND_COMPONENTS[kind]:
        _check_component(bundle_dir / name, name, advice)
    check_scheduler(bundle_dir / SCHEDULER_DIR / SCHEDULER_FILE, advice)
    return kind


def check_scheduler(path: Path, advice: str) -> None:
    """Refuse a scheduler config whose values are not finite, out of range or of the wrong type, or
    whose noise schedule leaves no signal at some timestep (the sampler would divide by zero)."""
    from diffusers import DDIMScheduler

    config = read_json_object(path, advice)
    source = f"'{path}'"

    def refuse(key: str, accepted: str) -> None:
        raise ConfigError(
            f"{source} sets {key} to {one_line(repr(config[key]), 60)}, but dp360 accepts {accepted} there; {advice}."
        )

    check_bounds(config, SCHEDULER_BOUNDS, source, advice, nullable=())
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            refuse(key, "a number greater than 0 and less than 1")  # NaN and infinities fail the range too
    if "beta_start" in config and "beta_end" in config and config["beta_start"] >= config["beta_end"]:
        raise ConfigError(
            f"{source} sets beta_start ({config['beta_start']!r}) at or above beta_end ({config['beta_end']!r}), "
            f"but the noise must grow along the schedule; {advice}."
        )
    for key, choices in SCHEDULER_CHOICES.items():
        if key in config and config[key] not in choices:
            refuse(key, " or ".join(f'"{choice}"' for choice in choices))
    for key in SCHEDULER_FLAGS:
        if key in config and not isinstance(config[key], bool):
            refuse(key, "true or false")
    if config.get("trained_betas") is not None:
        refuse("trained_betas", "null (the schedule follows beta_start and beta_end)")
    try:
        alphas = DDIMScheduler.from_config(config).alphas_cumprod
    except Exception as error:  # noqa: BLE001 - any refusal by the library means an unusable config
        raise ConfigError(
            f"{source} is not a valid DDIMScheduler configuration ({type(error).__name__}: {one_line(error)}); {advice}."
        ) from None
    if not bool(torch.isfinite(alphas).all()) or float(alphas.min()) <= 0:
        raise ConfigError(
            f"{source} describes a noise schedule that leaves no signal at its last timesteps (beta_schedule "
            f"{config.get('beta_schedule', 'linear')!r}, beta_start {config.get('beta_start')!r}, beta_end "
            f"{config.get('beta_end')!r}), which dp360's models cannot sample from; {advice}."
        )


def _reconvert_advice(kind: str) -> str:
    return f"convert the checkpoint again with `dp360 weights convert {kind}`"


def _stored_schedule(buffers: dict[str, torch.Tensor], key: str, count: int, high: float, advice: str):
    values = buffers.get(key)
    if values is None:
        return None
    values = values.detach().to(torch.float32)
    if (
        values.shape != (count,)
        or not bool(torch.isfinite(values).all())
        or not bool(((values > 0) & (values <= high)).all())
    ):
        raise ConfigError(f"The bundle's stored noise schedule ({key}) is not {count} values in (0, {high}]; {advice}.")
    return values.clone()


def apply_release_schedule(scheduler, buffers: dict[str, torch.Tensor], advice: str = "") -> None:
    """Sample with the checkpoint's stored schedule buffers, cast to float32, as the release does
    (they are float16 there, so their rounding shows in the views):
    - alphas_cumprod: diffusers' DDIM step then computes a_t, a_prev (a_0 after the last step), sigma
      and the update from these values exactly as the release's make_schedule/p_sample_ddim do;
    - sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod: the release's q_sample, which forward-
      diffuses the PanoHead latent to t = 999, multiplies by these stored values (not by the square
      roots of the rounded alphas_cumprod, which diffusers' add_noise would take).
    Absent buffers leave diffusers' float32 schedule."""
    count = scheduler.config.num_train_timesteps
    alphas_cumprod = _stored_schedule(buffers, "alphas_cumprod", count, 1.0, advice)
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod = alphas_cumprod
        scheduler.final_alpha_cumprod = (
            torch.tensor(1.0) if scheduler.config.set_alpha_to_one else alphas_cumprod[0].clone()
        )
    signal = _stored_schedule(buffers, "sqrt_alphas_cumprod", count, 1.0, advice)
    noise = _stored_schedule(buffers, "sqrt_one_minus_alphas_cumprod", count, 1.0, advice)
    if signal is not None and noise is not None:
        setattr(scheduler, FORWARD_COEFFICIENTS, (signal, noise))


def load_bundle(bundle_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, kind: str | None = None):
    """A `BackViewPipeline` or `Portrait360Pipeline` from a bundle folder; with `kind` ("main" or
    "back"), a bundle of the other kind is refused with one sentence."""
    from diffusers import DDIMScheduler

    from ..pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline

    bundle_dir = Path(bundle_dir)
    kind = check_bundle(bundle_dir, expect=kind)
    advice = _reconvert_advice(kind)
    classes = _component_classes()
    kwargs = {"use_safetensors": True} if dtype is None else {"use_safetensors": True, "torch_dtype": dtype}
    try:
        components = {
            name: classes[name].from_pretrained(bundle_dir / name, **kwargs).eval() for name in KIND_COMPONENTS[kind]
        }
        scheduler = DDIMScheduler.from_pretrained(bundle_dir / SCHEDULER_DIR)
        release = bundle_dir / SCHEDULER_DIR / RELEASE_SCHEDULE_FILE
        if release.is_file():
            from safetensors.torch import load_file

            apply_release_schedule(scheduler, load_file(str(release)), advice)
    except Exception as error:  # noqa: BLE001 - a loader boundary: what slipped past the checks above
        raise Dp360Error(
            f"The bundle '{bundle_dir}' cannot be loaded ({type(error).__name__}: {one_line(error)}); {advice}."
        ) from None
    pipeline_class = Portrait360Pipeline if kind == "main" else BackViewPipeline
    pipeline = pipeline_class(scheduler=scheduler, **components)
    # from_pretrained leaves every component in CPU memory in `dtype`. Moving it to the CPU would do
    # nothing but make diffusers warn, once per half-precision component, that it "cannot run" there:
    # with --offload the idle networks live in CPU memory by design, and torch runs half precision on
    # the CPU (slowly).
    return pipeline if torch.device(device).type == "cpu" else pipeline.to(device)


def bundle_installer(kind: str, fp16: bool = False) -> Installer:
    """How `dp360.weights` makes and recognises a converted bundle of `kind` (main, back) from the
    official checkpoint: converted (half precision with `fp16`), then checked."""

    def install(raw: Path, target: Path) -> None:
        convert_to_bundle(raw, target, kind, family="auto", dtype=torch.float16 if fp16 else torch.float32)
        check_bundle(target)

    return Installer(present=lambda target: (target / BUNDLE_FILE).is_file(), install=install)
