"""Dual-appearance reference attention ("reference-only" with a front and a back bank).

The reference network is a UNet copy. In every transformer block its self-attention processor
records the block's `norm1` output (the tensor diffusers hands to `attn1`) into a bank under the
block's module name. In the main UNet, every self-attention attends to
`[own tokens ; front bank ; back bank]` through the main UNet's own `to_k` / `to_v`; with no
banks it is plain self-attention. Matching by module name keeps writer and reader aligned
without relying on call order.

Efficiency: the reference network runs once per step for both reference images (one batch of
2) and its banks are shared by all frames. With `share_projection=True` (default) the bank tokens
are also projected by `to_k` / `to_v` at batch 1 and broadcast, instead of projecting the same
tokens for every frame as the reference code does (it repeats the reference latent 8 times); and
with `ReferenceBanks.reuse_projections` (default) those projections are kept in the banks object,
so every window of a step reuses them instead of projecting again. All give the same result,
which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def _heads(attn: Attention, tensor: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = tensor.shape
    return tensor.view(batch, tokens, attn.heads, -1).transpose(1, 2)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch = query.shape[0]
    out = F.scaled_dot_product_attention(_heads(attn, query), _heads(attn, key), _heads(attn, value), scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def plain_self_attention(attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
    return _attend(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))


@dataclass
class ReferenceBanks:
    """Banks recorded by the reference network: one dict per reference image (front, back),
    mapping a transformer block's attn1 module name to its norm1 output (1 or B, tokens, C)."""

    entries: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Keep each block's projected bank keys and values here on first use, for the other windows
    # of the same step (a new step brings new banks, so the cache lives one step).
    reuse_projections: bool = True
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @classmethod
    def from_batch(cls, bank: dict[str, torch.Tensor], reuse_projections: bool = True) -> ReferenceBanks:
        """Split one bank recorded at batch R (R reference images in one pass) into R banks of
        batch 1, in batch order (views, no copies)."""
        count = next(iter(bank.values())).shape[0] if bank else 0
        return cls(
            [{name: tokens[index : index + 1] for name, tokens in bank.items()} for index in range(count)],
            reuse_projections,
        )


class ReferenceState:
    """Shared by the processors of one model: what to write to, or what to read from."""

    def __init__(self, share_projection: bool = True):
        self.recording: dict[str, torch.Tensor] | None = None
        self.reading: ReferenceBanks | None = None
        self.share_projection = share_projection


class ReferenceWriteProcessor:
    """Reference network: record norm1 output, then ordinary self-attention."""

    def __init__(self, name: str, state: ReferenceState):
        self.name, self.state = name, state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        if self.state.recording is not None:
            self.state.recording[self.name] = hidden_states
        return plain_self_attention(attn, hidden_states)


class ReferenceReadProcessor:
    """Main UNet: self-attention over [own tokens ; bank tokens of each reference]."""

    def __init__(self, name: str, state: ReferenceState):
        self.name, self.state = name, state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        banks = self.state.reading
        if not banks:
            return plain_self_attention(attn, hidden_states)
        batch = hidden_states.shape[0]
        keys, values = [attn.to_k(hidden_states)], [attn.to_v(hidden_states)]
        shared = self.state.share_projection and all(bank[self.name].shape[0] == 1 for bank in banks.entries)
        if shared:
            projected = banks.projections.get(self.name) if banks.reuse_projections else None
            if projected is None:
                # Each bank projected on its own, exactly as without the cache.
                tokens = [bank[self.name].to(hidden_states.dtype) for bank in banks.entries]
                projected = (
                    torch.cat([attn.to_k(part) for part in tokens], dim=1),
                    torch.cat([attn.to_v(part) for part in tokens], dim=1),
                )
                if banks.reuse_projections:
                    banks.projections[self.name] = projected
            keys.append(projected[0].expand(batch, -1, -1))
            values.append(projected[1].expand(batch, -1, -1))
        else:
            for bank in banks.entries:
                tokens = bank[self.name].to(hidden_states.dtype)
                tokens = tokens.expand(batch, -1, -1) if tokens.shape[0] == 1 else tokens
                keys.append(attn.to_k(tokens))
                values.append(attn.to_v(tokens))
        return _attend(attn, attn.to_q(hidden_states), torch.cat(keys, dim=1), torch.cat(values, dim=1))


def self_attention_names(unet: torch.nn.Module) -> list[str]:
    """Names of the attn1 modules of the UNet's transformer blocks (16 in SD1.5)."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith("attn1")]


def _install(unet: torch.nn.Module, make) -> ReferenceState:
    state = ReferenceState()
    processors = {}
    for name, processor in unet.attn_processors.items():
        module_name = name.removesuffix(".processor")
        processors[name] = make(module_name, state) if module_name.endswith("attn1") else processor
    unet.set_attn_processor(processors)
    return state


def install_reference_writer(reference_unet: torch.nn.Module) -> ReferenceState:
    return _install(reference_unet, ReferenceWriteProcessor)


def install_reference_reader(unet: torch.nn.Module) -> ReferenceState:
    return _install(unet, ReferenceReadProcessor)
