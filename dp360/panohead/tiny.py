"""Tiny PanoHead generators for tests and `dp360 doctor --smoke`: built in code with seeded random
weights, written as a pickle in the released persistence layout, and read back by the same
safe loader and converter as the real file."""

from __future__ import annotations

from pathlib import Path

import torch

from .generator import PanoHeadGenerator, tiny_config
from .persistence import write_network_pickle
from .store import convert_panohead_pickle


def tiny_generator(seed: int = 0, **config_overrides) -> PanoHeadGenerator:
    torch.manual_seed(seed)
    generator = PanoHeadGenerator(tiny_config(**config_overrides))
    with torch.no_grad():
        # Released generators have non-zero noise strengths and a trained average w; give the
        # tiny one the same kind of values so that every wire matters.
        for name, parameter in generator.named_parameters():
            if name.endswith("noise_strength"):
                parameter.fill_(0.05)
        generator.backbone.mapping.w_avg.normal_(0, 0.5)
    return generator.eval()


def write_tiny_panohead(folder: str | Path, seed: int = 0) -> Path:
    """`folder/tiny-panohead.pkl` (persistence layout) converted into `folder/panohead/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = tiny_generator(seed)
    pickle_path = write_network_pickle(folder / "tiny-panohead.pkl", generator, generator.config.init_kwargs())
    return convert_panohead_pickle(pickle_path, folder / "panohead")
