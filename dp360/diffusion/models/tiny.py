"""Tiny model bundles for tests and `dp360 doctor --smoke`: tiny components with seeded random
weights, written as checkpoints in the official key layout and converted by the real converter,
plus synthetic camera-condition images. Their images are meaningless; the code path is real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundle import convert_to_bundle
from .components import BACK_COMPONENTS, MAIN_COMPONENTS, build_components, component_config
from .configs import TINY
from .convert import to_official_layout


def randomize_zero_layers(module: torch.nn.Module, seed: int = 123) -> None:
    """Give zero-initialised layers (temporal proj_out, ControlNet zero convs) small random
    values, so that every wire of a tiny model affects its output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.abs().sum() == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def tiny_components(names, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    components = build_components(TINY, names)
    for module in components.values():
        randomize_zero_layers(module)
        module.eval()
    return components


def camera_condition_images(view_count: int, size: int) -> list[np.ndarray]:
    """Stand-ins for sphere32: a disc with a marker that moves around it with the yaw."""
    import cv2

    images = []
    for index in range(view_count):
        angle = 2 * np.pi * index / view_count
        image = np.full((size, size, 3), 255, np.uint8)
        centre = (size // 2, size // 2)
        cv2.circle(image, centre, size // 3, (200, 170, 150), -1)
        marker = (int(size / 2 + np.sin(angle) * size / 4), size // 2)
        if np.cos(angle) > 0:
            cv2.circle(image, marker, max(2, size // 12), (40, 40, 40), -1)
        images.append(image)
    return images


def write_tiny_bundles(folder: str | Path, view_count: int = 32) -> dict[str, Path]:
    """Write `main.th`, `back.th` (official layout), their converted bundles and camera images."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind, names, seed in (("main", MAIN_COMPONENTS, 0), ("back", BACK_COMPONENTS, 1)):
        components = tiny_components(names, seed)
        checkpoint = to_official_layout(
            {name: (component_config(TINY, name), module.state_dict()) for name, module in components.items()},
            schedule=torch.zeros(1000),
        )
        torch.save(checkpoint, folder / f"{kind}.th")
        paths[kind] = convert_to_bundle(folder / f"{kind}.th", folder / f"{kind}-bundle", kind, family="tiny")
    cameras = folder / "cameras"
    cameras.mkdir(exist_ok=True)
    for index, image in enumerate(camera_condition_images(view_count, TINY.image_size)):
        Image.fromarray(image).save(cameras / f"{index:07d}.png")
    paths["cameras"] = cameras
    return paths
