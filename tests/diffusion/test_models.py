"""Diffusion building blocks on tiny seeded models: reference attention, temporal modules,
the official-layout converter (and, when present, the real key manifests on the meta device)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dp360.diffusion.models.components import (
    BACK_COMPONENTS,
    MAIN_COMPONENTS,
    build_component,
    build_components,
    component_config,
)
from dp360.diffusion.models.configs import FULL, TINY
from dp360.diffusion.models.convert import ConversionError, convert_official, to_official_layout
from dp360.diffusion.models.reference_attention import (
    ReferenceBanks,
    install_reference_reader,
    install_reference_writer,
    self_attention_names,
)
from dp360.diffusion.models.temporal import attach_temporal_modules, temporal_sites
from dp360.diffusion.models.tiny import randomize_zero_layers as _randomize_zero_layers
from dp360.diffusion.models.tiny import tiny_components

KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "keys"


def _seeded(name, seed=0):
    torch.manual_seed(seed)
    return build_component(TINY, name).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    front = torch.randn(1, 4, 8, 8, generator=generator)
    back = torch.randn(1, 4, 8, 8, generator=generator)
    return latents, text, front, back


def _bank(reference_unet, writer, latent, text, timestep=torch.tensor(500)):
    bank = {}
    writer.recording = bank
    reference_unet(latent, timestep, encoder_hidden_states=text.expand(latent.shape[0], -1, -1))
    writer.recording = None
    return bank


@torch.no_grad()
def test_reference_attention(inputs):
    latents, text, front, back = inputs
    unet, plain, reference_unet = _seeded("unet"), _seeded("unet"), _seeded("reference_unet", seed=1)
    plain.set_attn_processor(AttnProcessor2_0())
    reader, writer = install_reference_reader(unet), install_reference_writer(reference_unet)
    t = torch.tensor(500)
    run = lambda: unet(latents, t, encoder_hidden_states=text.expand(8, -1, -1)).sample  # noqa: E731
    baseline = plain(latents, t, encoder_hidden_states=text.expand(8, -1, -1)).sample

    # No bank: exactly the plain UNet.
    assert torch.allclose(run(), baseline, atol=1e-5)

    front_bank, back_bank = _bank(reference_unet, writer, front, text), _bank(reference_unet, writer, back, text)
    assert sorted(front_bank) == sorted(self_attention_names(reference_unet)) and len(front_bank) == 6
    reader.reading = ReferenceBanks([front_bank])
    front_only = run()
    reader.reading = ReferenceBanks([front_bank, back_bank])
    both = run()
    other_back = _bank(reference_unet, writer, torch.randn_like(back), text)
    reader.reading = ReferenceBanks([front_bank, other_back])
    both_other = run()
    reader.reading = None
    assert (front_only - baseline).abs().max() > 1e-3  # the front bank changes the output
    assert (both - front_only).abs().max() > 1e-3  # the back bank matters
    assert (both - both_other).abs().max() > 1e-3  # and its content matters
    assert torch.allclose(run(), baseline, atol=1e-5)  # reading off restores the plain UNet

    # The shared (batch-1) bank equals the reference's repeated computation at batch 8.
    repeated = ReferenceBanks(
        [
            _bank(reference_unet, writer, front.expand(8, -1, -1, -1), text),
            _bank(reference_unet, writer, back.expand(8, -1, -1, -1), text),
        ]
    )
    reader.reading = repeated
    reader.share_projection = False
    faithful = run()
    reader.reading = None
    assert torch.allclose(faithful, both, atol=1e-5)


@torch.no_grad()
def test_temporal_modules_zero_init_and_grouping(inputs):
    latents, text, _, _ = inputs
    unet, plain = _seeded("unet"), _seeded("unet")
    temporal = _seeded("temporal")
    state = attach_temporal_modules(unet, temporal, frames=8)
    t = torch.tensor(300)
    sixteen = torch.cat([latents, latents.flip(0)])
    context = text.expand(16, -1, -1)
    baseline = plain(sixteen, t, encoder_hidden_states=context).sample
    # Zero-initialised output layers: attached modules leave the UNet unchanged.
    assert torch.allclose(unet(sixteen, t, encoder_hidden_states=context).sample, baseline, atol=1e-5)

    _randomize_zero_layers(temporal)
    output = unet(sixteen, t, encoder_hidden_states=context).sample
    assert (output - baseline).abs().max() > 1e-3
    changed_input = sixteen.clone()
    changed_input[3] += 1.0
    changed = unet(changed_input, t, encoder_hidden_states=context).sample
    difference = (changed - output).abs().flatten(1).amax(1)
    assert torch.all(difference[[0, 1, 2, 4, 5, 6, 7]] > 1e-4)  # its own group of 8 sees the change
    assert torch.all(difference[8:] == 0)  # the other group does not
    state.enabled = False
    assert torch.allclose(unet(sixteen, t, encoder_hidden_states=context).sample, baseline, atol=1e-5)
    with pytest.raises(ValueError, match="8-frame groups"):
        state.enabled = True
        unet(sixteen[:12], t, encoder_hidden_states=context[:12])


def test_temporal_sites_follow_the_reference_layout():
    with torch.device("meta"):
        unet = build_component(FULL, "unet")
    down, up = temporal_sites(unet)
    assert len(down) == 8 and len(up) == 12
    # The last layer of every up block with an upsampler is hooked after the upsampler.
    kinds = [type(site).__name__ for site in up]
    assert [index for index, kind in enumerate(kinds) if kind == "Upsample2D"] == [2, 5, 8]
    channels = [unet.up_blocks[index // 3].resnets[0].out_channels for index in range(12)]
    assert channels == [1280] * 6 + [640] * 3 + [320] * 3


def _targets(components):
    return {
        name: (component_config(TINY, name), {k: v.shape for k, v in module.state_dict().items()})
        for name, module in components.items()
    }


def test_converter_round_trip_and_offenders():
    source = tiny_components(MAIN_COMPONENTS)
    checkpoint = to_official_layout(
        {name: (component_config(TINY, name), module.state_dict()) for name, module in source.items()},
        schedule=torch.zeros(1000),
    )
    assert any(key.startswith("pose_control_model.input_hint_block.14.") for key in checkpoint)
    assert any(key.startswith("control_model.output_blocks.") for key in checkpoint)
    assert not any(key.startswith("control_model.out.") for key in checkpoint)
    fresh = tiny_components(MAIN_COMPONENTS, seed=99)
    report = convert_official(checkpoint, _targets(fresh))
    for name, module in fresh.items():
        missing, unexpected = module.load_state_dict(report.state_dicts[name], strict=False)
        assert not unexpected and all(name in ("reference_unet", "temporal", "text_encoder") for _ in missing)
    # The converted models compute what the originals compute.
    with torch.no_grad():
        latents, t, text = torch.randn(8, 4, 8, 8), torch.tensor(10), torch.randn(8, 77, 32)
        assert torch.allclose(
            fresh["unet"](latents, t, encoder_hidden_states=text).sample,
            source["unet"](latents, t, encoder_hidden_states=text).sample,
            atol=1e-5,
        )
        hint = torch.rand(8, 3, 64, 64) * 2 - 1
        for a, b in zip(
            fresh["controlnet"](latents, t, text, hint, return_dict=False)[0],
            source["controlnet"](latents, t, text, hint, return_dict=False)[0],
        ):
            assert torch.allclose(a, b, atol=1e-5)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.allclose(
            fresh["vae"].encode(image).latent_dist.mean, source["vae"].encode(image).latent_dist.mean, atol=1e-5
        )
        ids = torch.tensor([[49406] + [49407] * 76])
        assert torch.allclose(fresh["text_encoder"](ids)[0], source["text_encoder"](ids)[0], atol=1e-5)
        frames = torch.randn(8, 32, 8, 8)
        assert torch.allclose(fresh["temporal"].down[0](frames, 8), source["temporal"].down[0](frames, 8), atol=1e-5)

    with pytest.raises(ConversionError, match="no component uses.*model.diffusion_model.extra.weight"):
        convert_official({**checkpoint, "model.diffusion_model.extra.weight": torch.zeros(1)}, _targets(fresh))
    dropped = dict(checkpoint)
    del dropped["pose_control_model.zero_convs.0.0.weight"]
    with pytest.raises(ConversionError, match="does not fill.*pose_control_model.zero_convs.0.0.weight"):
        convert_official(dropped, _targets(fresh))
    reshaped = {**checkpoint, "first_stage_model.quant_conv.weight": torch.zeros(3, 3, 1, 1)}
    with pytest.raises(ConversionError, match="shape mismatches.*quant_conv"):
        convert_official(reshaped, _targets(fresh))


@pytest.mark.parametrize(
    "manifest,names",
    [
        ("dp360_main_model_state_340000.keys.json", MAIN_COMPONENTS),
        ("dp360_back_head_230000.keys.json", BACK_COMPONENTS),
    ],
)
def test_real_key_manifests_convert_exactly(manifest, names):
    path = KEYS / manifest
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    entries = json.loads(path.read_text())["entries"]
    with torch.device("meta"):
        components = build_components(FULL, names)
    targets = {
        name: (component_config(FULL, name), {k: v.shape for k, v in module.state_dict().items()})
        for name, module in components.items()
    }
    checkpoint = {key: torch.empty(entry["shape"], device="meta") for key, entry in entries.items()}
    report = convert_official(checkpoint, targets)
    used = sum(len(state) for state in report.state_dicts.values())
    assert used + len(report.ignored) == len(entries)
    assert set(report.unfilled_by_design.get("reference_unet", [])) == {
        "conv_norm_out.weight",
        "conv_norm_out.bias",
        "conv_out.weight",
        "conv_out.bias",
    }
    for name, module in components.items():
        expected = {k for k in module.state_dict() if k not in report.unfilled_by_design.get(name, [])}
        assert set(report.state_dicts[name]) == expected


@torch.no_grad()
def test_reference_banks_of_one_batch_and_reused_projections(inputs):
    """One reference pass at batch 2 records the banks of two batch-1 passes, in batch order;
    bank projections kept in the banks object and reused by a second chunk give what projecting
    them again gives."""
    latents, text, front, back = inputs
    unet, reference_unet = _seeded("unet"), _seeded("reference_unet", seed=1)
    reader, writer = install_reference_reader(unet), install_reference_writer(reference_unet)
    pair = _bank(reference_unet, writer, torch.cat([front, back]), text)
    split = ReferenceBanks.from_batch(pair)
    singles = [_bank(reference_unet, writer, front, text), _bank(reference_unet, writer, back, text)]
    assert len(split.entries) == 2
    for entry, single in zip(split.entries, singles):
        assert entry.keys() == single.keys()
        assert all(entry[name].shape == single[name].shape for name in single)
        assert all(torch.allclose(entry[name], single[name], atol=1e-5) for name in single)

    t = torch.tensor(500)
    other_chunk = latents.flip(0)

    def run(banks, chunk):
        reader.reading = banks
        try:
            return unet(chunk, t, encoder_hidden_states=text.expand(8, -1, -1)).sample
        finally:
            reader.reading = None

    fresh = [run(ReferenceBanks(singles, reuse_projections=False), chunk) for chunk in (latents, other_chunk)]
    reused_banks = ReferenceBanks(singles)
    reused = [run(reused_banks, chunk) for chunk in (latents, other_chunk)]
    assert set(reused_banks.projections) == set(self_attention_names(unet))  # kept after the first chunk
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))
