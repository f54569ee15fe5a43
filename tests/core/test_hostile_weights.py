"""Hostile and broken weight/config files end in one Dp360Error sentence that names the file, fast,
without running pickled code; `weights convert --out` never replaces what dp360 did not create.

Real tiny bundles and generators are built once per module; each case damages a hard-linked copy
(damaged files are replaced, never written through the link)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dp360.diffusion.models.bundle import convert_to_bundle, load_bundle, load_official_checkpoint
from dp360.errors import Dp360Error
from dp360.panohead.perceptual import load_lpips
from dp360.panohead.persistence import UnsafePickleError, write_network_pickle
from dp360.panohead.store import convert_panohead_pickle, load_generator, panohead_problem
from dp360.panohead.tiny import tiny_generator

BIG = 10**9
# Every case must fail fast (a hang was the bug); building the shared tiny models is not timed.
pytestmark = pytest.mark.timeout(30, func_only=True)


class _Payload:
    """Pickles as a call to os.system: loading it unsafely would create the marker file."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    weights = tiny_weights(8)
    return {
        **weights.bundles,
        "main.th": weights.checkpoints["main"],
        "back.th": weights.checkpoints["back"],
        "panohead": weights.panohead,
        "panohead.pkl": weights.panohead_pickle,
    }


def _clone(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=os.link)
    return target


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _assert_sentence(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, Dp360Error)
    assert "\n" not in message and message.strip() == message, message
    assert any(name in message for name in names), (names, message)
    assert "weights_only" not in message and "Traceback" not in message, message


# ---------------------------------------------------------------------------------- hostile bytes


def _safetensors(header: object, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _evil_torch(marker: Path, legacy: bool = False) -> bytes:
    path = marker.with_suffix(".evil")
    torch.save({"w": torch.zeros(2), "x": _Payload(f"touch {marker}")}, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _torch_bytes(value: object, marker: Path) -> bytes:
    path = marker.with_suffix(".value")
    torch.save(value, path)
    return path.read_bytes()


GARBAGE = b"\x00\x13 this is not a weights file \xff\xfe" * 40
# (case id, content from (original file, marker path)); None content means a link to /etc/passwd.
SAFETENSORS_CASES: list[tuple[str, Callable[[Path, Path], bytes | None]]] = [
    ("offsets-past-end", lambda p, m: _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, BIG]}})),
    ("huge-shape", lambda p, m: _safetensors({"w": {"dtype": "F32", "shape": [BIG, BIG], "data_offsets": [0, 16]}})),
    ("lying-header-length", lambda p, m: _safetensors({"w": {"dtype": "F32", "shape": [4]}}, length=10**15)),
    ("truncated", lambda p, m: _half(p)),
    ("system-file", lambda p, m: None),
    ("empty", lambda p, m: b""),
    ("garbage", lambda p, m: GARBAGE),
]
TORCH_CASES: list[tuple[str, Callable[[Path, Path], bytes | None]]] = [
    ("pickled-code", lambda p, m: _evil_torch(m)),
    ("pickled-code-legacy-format", lambda p, m: _evil_torch(m, legacy=True)),
    ("truncated", lambda p, m: _half(p) if p.is_file() else _evil_torch(m)[:100]),
    ("garbage", lambda p, m: GARBAGE),
    ("empty", lambda p, m: b""),
    ("system-file", lambda p, m: None),
    ("a-list", lambda p, m: _torch_bytes([torch.zeros(2)], m)),
    ("odd-keys", lambda p, m: _torch_bytes({"features.x.weight": torch.zeros(2), 3: torch.zeros(1)}, m)),
]


def _damage(path: Path, make: Callable[[Path, Path], bytes | None], marker: Path) -> None:
    content = make(path, marker)
    path.unlink(missing_ok=True)
    if content is None:
        path.symlink_to("/etc/passwd")
    else:
        path.write_bytes(content)


# ------------------------------------------------------------------ official checkpoints (.th)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[case[0] for case in TORCH_CASES])
def test_official_checkpoint(tmp_path, tiny, case):
    checkpoint, marker = tmp_path / "model_state.th", tmp_path / "pwned"
    _damage(checkpoint, lambda p, m: case[1](tiny["main.th"], m), marker)
    with pytest.raises(Dp360Error) as error:
        convert_to_bundle(checkpoint, tmp_path / "out", "main", family="tiny")
    _assert_sentence(error, "model_state.th")
    assert not (tmp_path / "out").exists() and not marker.exists()
    if case[0].startswith("pickled-code"):
        assert "pickled code" in str(error.value)


def test_official_checkpoint_keeps_only_tensors(tmp_path, tiny):
    path = tmp_path / "c.th"
    torch.save({"state_dict": {"a": torch.zeros(1), "step": 3}}, path)
    assert list(load_official_checkpoint(path)) == ["a"]


# ---------------------------------------------------------------------------- diffusion bundles

BUNDLE_CONFIG_CASES = [
    ("unet/config.json", "garbage", b"{not json"),
    ("unet/config.json", "a-list", b"[1, 2]"),
    ("unet/config.json", "a-string", b'"unet"'),
    ("unet/config.json", "deep-nesting", b"[" * 100_000 + b"]" * 100_000),
    ("unet/config.json", "huge-file", b'{"a": "' + b"x" * (2 << 20) + b'"}'),
    ("unet/config.json", "negative-channels", {"block_out_channels": [-32, 64]}),
    ("unet/config.json", "absurd-channels", {"block_out_channels": [BIG, BIG]}),
    ("unet/config.json", "absurd-layers", {"layers_per_block": BIG}),
    ("unet/config.json", "absurd-transformer-layers", {"transformer_layers_per_block": BIG}),
    ("unet/config.json", "thousand-blocks", {"block_out_channels": [32] * 1000}),
    ("unet/config.json", "layers-as-text", {"layers_per_block": "2"}),
    ("unet/config.json", "unknown-block-type", {"down_block_types": ["Nope2D", "DownBlock2D"]}),
    ("unet/config.json", "config-mismatching-weights", {"layers_per_block": 3}),
    ("temporal/config.json", "absurd-layers", {"layers_per_block": BIG}),
    ("controlnet/config.json", "absurd-embedding", {"conditioning_embedding_out_channels": [BIG] * 4}),
    ("vae/config.json", "absurd-resolution", {"sample_size": BIG}),
    ("text_encoder/config.json", "absurd-layers", {"num_hidden_layers": BIG}),
    ("text_encoder/config.json", "absurd-vocabulary", {"vocab_size": 10**12}),
    ("text_encoder/config.json", "absurd-heads", {"num_attention_heads": BIG}),
    ("text_encoder/config.json", "absurd-positions", {"max_position_embeddings": BIG}),
    ("scheduler/scheduler_config.json", "absurd-timesteps", {"num_train_timesteps": BIG}),
    ("dp360_bundle.json", "unknown-kind", {"kind": "sideways"}),
    ("dp360_bundle.json", "kind-as-number", {"kind": 3}),
    ("dp360_bundle.json", "garbage", b"\xff\xfe garbage"),
    ("dp360_bundle.json", "a-list", b'["main"]'),
]


@pytest.mark.parametrize(
    "relative, case, content", BUNDLE_CONFIG_CASES, ids=[f"{c[0]}:{c[1]}" for c in BUNDLE_CONFIG_CASES]
)
def test_bundle_config(tmp_path, tiny, relative, case, content):
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    path = bundle / relative
    changes = content if isinstance(content, dict) else {}
    if changes:
        content = json.dumps({**json.loads(path.read_text()), **changes}).encode()
    _replace(path, content)
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    _assert_sentence(error, path.name)
    if case.startswith(("absurd", "negative")) and relative != "dp360_bundle.json":
        # the offending key and the limit are named
        assert next(iter(changes)) in str(error.value) and "dp360 accepts" in str(error.value)


SCHEDULER = "scheduler/scheduler_config.json"
NAN, INF = float("nan"), float("inf")
# key -> value, and what the sentence must say dp360 accepts there (issue 21: NaN gave black views)
SCHEDULER_CASES = [
    ("beta_start", NAN, "a number greater than 0 and less than 1"),
    ("beta_end", INF, "a number greater than 0 and less than 1"),
    ("beta_start", -0.001, "a number greater than 0 and less than 1"),
    ("beta_end", 1.0, "a number greater than 0 and less than 1"),
    ("beta_end", "0.012", "a number greater than 0 and less than 1"),
    ("beta_start", 0.5, "the noise must grow along the schedule"),  # above beta_end (0.012)
    ("num_train_timesteps", 10, "a whole number from 1000 to 10000"),
    ("num_train_timesteps", 1000.5, "a whole number from 1000 to 10000"),
    ("num_train_timesteps", BIG, "a whole number from 1000 to 10000"),
    ("steps_offset", 500, "a whole number from 0 to 1"),
    ("clip_sample_range", NAN, "a number from 0.001 to 1000.0"),
    ("dynamic_thresholding_ratio", -1, "a number from 0.001 to 1.0"),
    ("beta_schedule", "sideways", '"scaled_linear" or "linear" or "squaredcos_cap_v2"'),
    ("prediction_type", "v_prediction", '"epsilon"'),
    ("timestep_spacing", None, '"leading" or "trailing" or "linspace"'),
    ("clip_sample", "no", "true or false"),
    ("trained_betas", [0.5] * 4, "null"),
]


@pytest.mark.parametrize("key, value, accepted", SCHEDULER_CASES, ids=[f"{c[0]}={c[1]!r}" for c in SCHEDULER_CASES])
def test_scheduler_config_value(tmp_path, tiny, key, value, accepted):
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    path = bundle / SCHEDULER
    _replace(path, json.dumps({**json.loads(path.read_text()), key: value}).encode())  # NaN as JSON's NaN
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    _assert_sentence(error, f"'{path}'")
    message = str(error.value)
    assert key in message and accepted in message, message
    assert message.endswith("convert the checkpoint again with `dp360 weights convert main`.")


def test_a_schedule_leaving_no_signal_is_refused(tmp_path, tiny):
    """In range one by one, but 1000 steps of beta 0.5..0.9 leave alphas_cumprod at 0: NaN latents."""
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    path = bundle / SCHEDULER
    changes = {"beta_start": 0.5, "beta_end": 0.9, "beta_schedule": "linear"}
    _replace(path, json.dumps({**json.loads(path.read_text()), **changes}).encode())
    with pytest.raises(Dp360Error, match="leaves no signal at its last timesteps") as error:
        load_bundle(bundle)
    _assert_sentence(error, f"'{path}'")


def test_the_schedule_dp360_writes_passes(tiny):
    from dp360.diffusion.models.bundle import check_bundle

    assert check_bundle(tiny["main"]) == "main" and check_bundle(tiny["back"]) == "back"


def test_a_missing_component_folder_says_missing(tmp_path, tiny):
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    shutil.rmtree(bundle / "unet")
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    _assert_sentence(error, f"'{bundle / 'unet'}'")
    assert f"The bundle's unet folder '{bundle / 'unet'}' is missing;" in str(error.value)
    assert "JSON" not in str(error.value)


@pytest.mark.parametrize("relative", ["unet/config.json", SCHEDULER, "dp360_bundle.json"])
def test_a_missing_or_huge_config_says_so(tmp_path, tiny, relative):
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    path = bundle / relative
    path.unlink()
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    if relative != "dp360_bundle.json":  # without it the folder is no bundle at all (its own sentence)
        assert f"'{path}' is missing;" in str(error.value), str(error.value)
    _replace(path, json.dumps({"pad": "x" * (3 << 20)}).encode())
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    _assert_sentence(error, f"'{path}'")
    assert f"'{path}' is too large (3.0 MB, more than dp360's limit of 1 MB for a config file);" in str(error.value)
    assert "JSON" not in str(error.value)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
@pytest.mark.parametrize("case", SAFETENSORS_CASES, ids=[case[0] for case in SAFETENSORS_CASES])
def test_bundle_weights(tmp_path, tiny, component, case):
    bundle = _clone(tiny["main"], tmp_path / "bundle")
    path = next((bundle / component).glob("*.safetensors"))
    _damage(path, case[1], tmp_path / "marker")
    with pytest.raises(Dp360Error) as error:
        load_bundle(bundle)
    _assert_sentence(error, path.name)


# ------------------------------------------------------------------------------------ PanoHead


def _kwargs_with(change: Callable[[dict], None]) -> dict:
    kwargs = tiny_generator(0).config.init_kwargs()
    change(kwargs)
    return kwargs


PANOHEAD_CONFIG_CASES = [
    ("garbage", b"not json at all"),
    ("a-list", b"[]"),
    ("a-string", b'"panohead"'),
    ("no-init-kwargs", {"class_name": "x"}),
    ("init-kwargs-a-list", {"init_kwargs": [1, 2]}),
    ("negative-z-dim", lambda k: k.update(z_dim=-1)),
    ("absurd-mapping-layers", lambda k: k["mapping_kwargs"].update(num_layers=BIG)),
    ("absurd-resolution", lambda k: k.update(img_resolution=2**40)),
    ("absurd-channels", lambda k: k.update(channel_max=BIG)),
    ("absurd-triplane", lambda k: k["rendering_kwargs"].update(triplane_size=2**40)),
    ("absurd-depth-samples", lambda k: k["rendering_kwargs"].update(depth_resolution=BIG)),
    ("not-a-power-of-two", lambda k: k["rendering_kwargs"].update(triplane_size=48)),
    ("ray-end-as-text", lambda k: k["rendering_kwargs"].update(ray_end="far")),
    ("null-width", lambda k: k.update(w_dim=None)),
    ("unknown-argument", lambda k: k.update(evil=1)),
    ("config-mismatching-weights", lambda k: k.update(w_dim=16)),
]


@pytest.mark.parametrize("case, content", PANOHEAD_CONFIG_CASES, ids=[c[0] for c in PANOHEAD_CONFIG_CASES])
def test_converted_panohead_config(tmp_path, tiny, case, content):
    folder = _clone(tiny["panohead"], tmp_path / "panohead")
    path = folder / "panohead.json"
    if callable(content):
        content = {"init_kwargs": _kwargs_with(content)}
    _replace(path, content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(Dp360Error) as error:
        load_generator(folder)
    _assert_sentence(error, "panohead.json")
    assert panohead_problem(folder) == str(error.value)


@pytest.mark.parametrize("case", SAFETENSORS_CASES, ids=[case[0] for case in SAFETENSORS_CASES])
def test_converted_panohead_weights(tmp_path, tiny, case):
    folder = _clone(tiny["panohead"], tmp_path / "panohead")
    _damage(folder / "generator.safetensors", case[1], tmp_path / "marker")
    with pytest.raises(Dp360Error) as error:
        load_generator(folder)
    _assert_sentence(error, "generator.safetensors")
    assert panohead_problem(folder) == str(error.value)


def _pickle_string(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _deep_list(depth: int) -> bytes:
    # `depth` empty lists, then APPENDs that nest each into the one below: no recursion to write.
    return b"]" * depth + b"a" * (depth - 1)


def _deep_record_pickle() -> bytes:
    """{'G_ema': _reconstruct_persistent_obj({'type': 'class', 'state': {'_init_kwargs': [[[...]]]}})}"""
    meta = (
        b"}"
        + _pickle_string("type")
        + _pickle_string("class")
        + b"s"
        + _pickle_string("state")
        + b"}"
        + _pickle_string("_init_kwargs")
        + _deep_list(200_000)
        + b"ss"
    )
    record = b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n(" + meta + b"tR"
    return b"\x80\x02}" + _pickle_string("G_ema") + record + b"s."


def _pickle_with_kwargs(change: Callable[[dict], None]) -> Callable[[Path, Path], bytes]:
    def make(original: Path, marker: Path) -> bytes:
        generator = tiny_generator(0)
        kwargs = generator.config.init_kwargs()
        change(kwargs)
        return write_network_pickle(marker.with_suffix(".pkl"), generator, kwargs).read_bytes()

    return make


def _pickle_of(value: object) -> bytes:
    return pickle.dumps(value, protocol=4)


PICKLE_CASES: list[tuple[str, Callable[[Path, Path], bytes | None]]] = [
    ("nested-too-deep", lambda p, m: b"\x80\x02" + _deep_list(200_000) + b"."),
    ("nested-too-deep-in-record", lambda p, m: _deep_record_pickle()),
    ("negative-sizes", _pickle_with_kwargs(lambda k: k.update(z_dim=-4))),
    ("absurd-mapping-layers", _pickle_with_kwargs(lambda k: k["mapping_kwargs"].update(num_layers=BIG))),
    ("absurd-channels", _pickle_with_kwargs(lambda k: k.update(channel_max=BIG, channel_base=BIG))),
    ("rendering-kwargs-a-string", _pickle_with_kwargs(lambda k: k.update(rendering_kwargs="x"))),
    ("refused-global", lambda p, m: _pickle_of({"G_ema": _Payload(f"touch {m}")})),
    ("torch-archive", lambda p, m: _evil_torch(m)),
    ("truncated", lambda p, m: _half(p)),
    ("garbage", lambda p, m: GARBAGE),
    ("empty", lambda p, m: b""),
    ("system-file", lambda p, m: None),
    ("no-network", lambda p, m: _pickle_of({"D": 1})),
    ("a-list", lambda p, m: _pickle_of([1, 2, 3])),
]


@pytest.mark.parametrize("case", PICKLE_CASES, ids=[case[0] for case in PICKLE_CASES])
def test_panohead_pickle(tmp_path, tiny, case):
    path, marker = tmp_path / "panohead.pkl", tmp_path / "pwned"
    _damage(path, lambda p, m: case[1](tiny["panohead.pkl"], m), marker)
    with pytest.raises(Dp360Error) as error:
        convert_panohead_pickle(path, tmp_path / "out")
    _assert_sentence(error, "panohead.pkl")
    assert not (tmp_path / "out").exists() and not marker.exists()
    if case[0] == "refused-global":
        assert isinstance(error.value, UnsafePickleError) and "system" in str(error.value)


# ---------------------------------------------------------- LPIPS backbone and RetinaFace weights


@pytest.mark.parametrize("case", TORCH_CASES, ids=[case[0] for case in TORCH_CASES])
def test_lpips_backbone(tmp_path, case):
    path, marker = tmp_path / "vgg16-397923af.pth", tmp_path / "pwned"
    _damage(path, case[1], marker)
    with pytest.raises(Dp360Error) as error:
        load_lpips(backbone=path)
    _assert_sentence(error, path.name)
    assert not marker.exists()


@pytest.mark.parametrize("case", TORCH_CASES, ids=[case[0] for case in TORCH_CASES])
def test_retinaface_weights(tmp_path, case):
    from dp360.prepare.detectors import make_detector
    from dp360.weights import RETINAFACE_FILES

    path, marker = tmp_path / "weights" / RETINAFACE_FILES["resnet50"], tmp_path / "pwned"
    path.parent.mkdir()
    _damage(path, case[1], marker)
    # `auto` must not hide a broken file by falling back to dlib.
    with pytest.raises(Dp360Error) as error:
        make_detector("auto", weights_dir=path.parent)
    _assert_sentence(error, path.name)
    assert not marker.exists()


# ----------------------------------------------------------------------- a run's fitted field


def _nerf_run(folder: Path) -> tuple[Path, Path]:
    from dp360.nerf.common import FitSettings

    nerf = folder / "run" / "nerf"
    checkpoint = nerf / "dp360" / "nerfacto-head" / "fit" / "nerfstudio_models" / "step-000000040.ckpt"
    checkpoint.parent.mkdir(parents=True)
    record = {"settings": FitSettings.preset("test").key_dict(), "background": [1.0, 1.0, 1.0], "views_dir": "v"}
    (nerf / "fit.json").write_text(json.dumps(record))
    torch.save({"step": 40, "pipeline": {"_model.x": torch.zeros(1)}}, checkpoint)
    return nerf, checkpoint


def _settings(**changes) -> Callable[[dict], None]:
    return lambda record: record["settings"].update(changes)


FIT_CASES = [
    ("garbage", b"{{{"),
    ("a-list", b"[]"),
    ("no-settings", lambda r: r.pop("settings")),
    ("settings-a-string", lambda r: r.update(settings="fast")),
    ("unknown-setting", _settings(evil=1)),
    ("levels-as-text", _settings(num_levels="16")),
    ("absurd-hash-table", _settings(log2_hashmap_size=BIG)),
    ("absurd-rays", _settings(rays_per_batch=BIG)),
    ("negative-width", _settings(hidden_dim=-1)),
    ("nan-near", lambda r: r["settings"].update(near=float("nan"))),
    ("odd-proposals", _settings(proposal_samples=[1, 2, 3])),
    ("odd-background", lambda r: r.update(background="white")),
    ("background-out-of-range", lambda r: r.update(background=[0, 0, 300])),
    ("no-background", lambda r: r.pop("background")),
]


@pytest.mark.parametrize("case, content", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_record(tmp_path, case, content):
    from dp360.nerf.fit import load_field

    nerf, _ = _nerf_run(tmp_path)
    if callable(content):
        record = json.loads((nerf / "fit.json").read_text())
        content(record)
        content = json.dumps(record).encode()
    _replace(nerf / "fit.json", content)
    with pytest.raises(Dp360Error) as error:
        load_field(nerf)
    _assert_sentence(error, "fit.json")


FIT_CHECKPOINT_CASES = TORCH_CASES + [
    ("no-pipeline", lambda p, m: _torch_bytes({"step": 1}, m)),
    ("pipeline-not-tensors", lambda p, m: _torch_bytes({"step": 1, "pipeline": {"a": 1}}, m)),
    ("step-as-text", lambda p, m: _torch_bytes({"step": "1", "pipeline": {}}, m)),
]


@pytest.mark.parametrize("case", FIT_CHECKPOINT_CASES, ids=[case[0] for case in FIT_CHECKPOINT_CASES])
def test_fit_checkpoint(tmp_path, case):
    from dp360.nerf.fit import load_field

    nerf, checkpoint = _nerf_run(tmp_path)
    marker = tmp_path / "pwned"
    _damage(checkpoint, case[1], marker)
    with pytest.raises(Dp360Error) as error:
        load_field(nerf)
    _assert_sentence(error, checkpoint.name)
    assert not marker.exists()


# --------------------------------------------------------- `weights convert --out` never destroys


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden leftovers included) with its content's digest."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in root.rglob("*")
    }


def _convert(cli, kind: str, checkpoint: Path, out: str | Path):
    family = ["--family", "tiny"] if kind != "panohead" else []
    return cli("weights", "convert", kind, *family, "--checkpoint", checkpoint, "--out", out)


def _assert_refused(result, root: Path, before: dict[str, str], *names: str) -> None:
    code, stdout, stderr = result
    assert code == 2, (code, stdout, stderr)
    assert stderr.startswith("error: ") and "Traceback" not in stdout + stderr, stderr
    assert any(name in stderr for name in names), stderr
    assert _snapshot(root) == before


@pytest.fixture
def workspace(tmp_path, tiny):
    """A user's folder: the checkpoints (hard links) and a folder of documents."""
    root = tmp_path / "home"
    (root / "mydocs" / "sub").mkdir(parents=True)
    (root / "mydocs" / "thesis.txt").write_text("years of work")
    (root / "mydocs" / "sub" / "photo.png").write_bytes(b"\x89PNG...")
    (root / "myfile.txt").write_text("keep me")
    os.link(tiny["main.th"], root / "main.th")
    os.link(tiny["panohead.pkl"], root / "panohead.pkl")
    return root


@pytest.mark.parametrize("kind, checkpoint", [("main", "main.th"), ("panohead", "panohead.pkl")])
@pytest.mark.parametrize(
    "out, name",
    [("mydocs", "mydocs"), (".", "home"), ("myfile.txt", "myfile.txt"), ("mydocs/..", "home")],
    ids=["folder-with-user-files", "current-folder", "a-file", "parent-folder"],
)
def test_convert_refuses_user_folders(cli, workspace, monkeypatch, kind, checkpoint, out, name):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    _assert_refused(_convert(cli, kind, workspace / checkpoint, out), workspace, before, name)


def test_convert_refuses_dot_dot_and_an_empty_current_folder(cli, workspace, monkeypatch):
    (workspace / "empty").mkdir()
    monkeypatch.chdir(workspace / "empty")
    before = _snapshot(workspace)
    _assert_refused(_convert(cli, "main", workspace / "main.th", ".."), workspace, before, "home")
    _assert_refused(_convert(cli, "main", workspace / "main.th", "."), workspace, before, "empty")


@pytest.mark.parametrize("kind, checkpoint", [("main", "main.th"), ("panohead", "panohead.pkl")])
def test_convert_refuses_the_folder_holding_the_checkpoint(cli, workspace, kind, checkpoint):
    downloads = workspace / "downloads"
    downloads.mkdir()
    os.link(workspace / checkpoint, downloads / checkpoint)
    before = _snapshot(workspace)
    _assert_refused(_convert(cli, kind, downloads / checkpoint, downloads), workspace, before, "downloads")
    _assert_refused(_convert(cli, kind, downloads / checkpoint, workspace), workspace, before, "home")
    _assert_refused(_convert(cli, kind, downloads / checkpoint, downloads / checkpoint), workspace, before, checkpoint)


def test_convert_refuses_a_bundle_of_another_kind(cli, workspace, tiny, monkeypatch):
    monkeypatch.chdir(workspace)
    _clone(tiny["back"], workspace / "back-bundle")
    _clone(tiny["panohead"], workspace / "panohead")
    before = _snapshot(workspace)
    _assert_refused(_convert(cli, "main", workspace / "main.th", "back-bundle"), workspace, before, "back bundle")
    _assert_refused(_convert(cli, "main", workspace / "main.th", workspace / "panohead"), workspace, before, "panohead")
    _assert_refused(_convert(cli, "panohead", workspace / "panohead.pkl", "back-bundle"), workspace, before, "back")


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("kind, checkpoint", [("main", "main.th"), ("panohead", "panohead.pkl")])
def test_convert_twice_replaces_its_own_bundle(cli, workspace, kind, checkpoint):
    out = workspace / "converted"
    for _ in range(2):
        code, stdout, stderr = _convert(cli, kind, workspace / checkpoint, out)
        assert code == 0, stderr
    assert sorted(path.name for path in workspace.iterdir()) == sorted(
        ["converted", "main.th", "mydocs", "myfile.txt", "panohead.pkl"]
    )
    if kind == "main":
        load_bundle(out)
    else:
        load_generator(out)


def test_reconverting_replaces_only_what_the_bundle_lists(tmp_path, tiny):
    out = tmp_path / "bundle"
    convert_to_bundle(tiny["main.th"], out, "main", family="tiny")
    convert_to_bundle(tiny["main.th"], out, "main", family="tiny")  # dp360's own bundle: replaced
    # a user's file beside the bundle's own, even one named like them, is never deleted
    (out / "unet" / "notes.json").write_text('{"mine": true}')
    with pytest.raises(Dp360Error, match="already holds files that are not a dp360 main bundle"):
        convert_to_bundle(tiny["main.th"], out, "main", family="tiny")
    assert (out / "unet" / "notes.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("manifest", [{"kind": "main"}, ["main"], {"format": "dp360-bundle", "kind": "main"}])
def test_a_look_alike_bundle_manifest_does_not_make_a_users_folder_a_bundle(tmp_path, tiny, manifest):
    from dp360.diffusion.models.bundle import BUNDLE_FILE

    mine = tmp_path / "mine"
    (mine / "unet").mkdir(parents=True)
    (mine / "unet" / "config.json").write_text("{}")
    (mine / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(Dp360Error, match="already holds files that are not a dp360 main bundle"):
        convert_to_bundle(tiny["main.th"], mine, "main", family="tiny")
    assert (mine / "unet" / "config.json").read_text() == "{}"
