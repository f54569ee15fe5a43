"""LPIPS (VGG16) perceptual distance for the PanoHead inversion.

Backbone: torchvision's VGG16 ImageNet weights (`vgg16-397923af.pth`, 528 MB), fetched into the
dp360 weights cache by `dp360 weights download perceptual` and read with weights_only.
Linear heads: LPIPS v0.1 VGG heads as shipped inside torchmetrics (a dependency already).
LPIPS facts: inputs in [-1, 1] shifted by (-.030, -.088, -.188) and scaled by (.458, .448,
.450); features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalised over
channels; squared differences weighted by the heads, averaged over space, summed over layers.

The DiffPortrait360 projector uses NVIDIA's TorchScript export of the same network
(`vgg16.pt`, unweighted sum of squared feature differences); TorchScript archives carry code,
so dp360 uses the weight-only LPIPS form instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import PERCEPTUAL_FILE, PERCEPTUAL_HOME, perceptual_dir
from ..errors import Dp360Error
from ..safety import load_tensors, one_line

VGG16_FILE = PERCEPTUAL_FILE  # its download and hash: dp360.weights
VGG16_URL = PERCEPTUAL_HOME + VGG16_FILE
SLICE_ENDS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def backbone_path() -> Path:
    return perceptual_dir() / VGG16_FILE


def lpips_heads_path() -> Path:
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise Dp360Error("torchmetrics (which ships the LPIPS heads) is not installed; reinstall dp360.")
    return Path(list(spec.submodule_search_locations)[0]) / "functional" / "image" / "lpips_models" / "vgg.pth"


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's feature layers alone: the whole network's random init (its 120M-weight
        # classifier) took seconds, for weights that are loaded over it anyway.
        self.features = make_layers(cfgs["D"])[: SLICE_ENDS[-1]]
        channels = (64, 128, 256, 512, 512)
        self.heads = nn.ModuleList(nn.Conv2d(count, 1, 1, bias=False) for count in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        outputs, start = [], 0
        for end in SLICE_ENDS:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample distance between images in [-1, 1] (N, 3, H, W)."""
        total = images.new_zeros(images.shape[0])
        for head, a, b in zip(self.heads, self._layers(images), self._layers(targets)):
            a = a / (a.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((a - b).square()).mean(dim=[1, 2, 3])
        return total


def load_lpips(device: str | torch.device = "cpu", backbone: str | Path | None = None) -> LPIPS:
    """LPIPS-VGG with its backbone from the weights cache (or `backbone`); a missing backbone is
    an error with the command that fetches it, never a silent switch to another loss."""
    path = Path(backbone) if backbone is not None else backbone_path()
    if not path.is_file():
        raise Dp360Error(
            f"The perceptual-loss backbone (torchvision VGG16, 528 MB) is not at {path}; run "
            f"`dp360 weights download perceptual` (or put {VGG16_FILE} from {VGG16_URL} there)."
        )
    advice = "delete it and run `dp360 weights download perceptual`"
    state = load_tensors(path, advice)
    model = LPIPS()
    try:
        features = {
            key[len("features.") :]: value
            for key, value in state.items()
            if key.startswith("features.") and int(key.split(".")[1]) < SLICE_ENDS[-1]
        }
        model.features.load_state_dict(features, strict=True)
    except Exception as error:  # noqa: BLE001 - not a dict, odd keys, wrong shapes: not the VGG16 file
        raise Dp360Error(
            f"'{path}' is not a torchvision VGG16 state dict ({type(error).__name__}: {one_line(error, 120)}); {advice}."
        ) from None
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    for index, head in enumerate(model.heads):
        head.weight.data.copy_(heads[f"lin{index}.model.1.weight"])
    return model.to(device)


def write_random_backbone(path: str | Path, seed: int = 0) -> Path:
    """A VGG16 state dict with random weights in torchvision's layout (tests, benchmarks)."""
    from torchvision.models import vgg16

    from ..atomic import atomic_path

    torch.manual_seed(seed)
    state = {f"features.{key}": value for key, value in vgg16(weights=None).features.state_dict().items()}
    with atomic_path(Path(path)) as temporary:
        torch.save(state, temporary)
    return Path(path)


def area_downsample(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """The projector compares at most 256 x 256 (area averaging), as the reference does."""
    if images.shape[-1] > size:
        return F.adaptive_avg_pool2d(images, (size, size))
    return images
