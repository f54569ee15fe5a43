"""ArcFace identity similarity, when the user supplies its weights (`dp360 eval --arcface FILE`).

The network is insightface's IResNet (the `arcface_torch` recognition models: iresnet18 / 34 / 50
/ 100, a PyTorch state dict such as `backbone.pth`), written here from its architecture and read
with `weights_only`; the depth is taken from the file's keys. Faces are found with dlib's HOG
detector, located by its 68 landmarks (eye centres, nose tip, mouth corners) and warped by a
similarity onto ArcFace's 112 x 112 five-point template, the alignment the network was trained on.
dp360 neither ships nor downloads these weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import Dp360Error
from .metrics import UPSAMPLE_BELOW, FaceEmbedding, face_model_path

# insightface's template of (left eye, right eye, nose tip, left mouth corner, right mouth corner)
# in a 112 x 112 crop, image left first
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
CROP = 112
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
ADVICE = "pass insightface's arcface_torch IResNet state dict (such as backbone.pth) as --arcface"


class _Block(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """112 x 112 RGB in [-1, 1] -> a 512-d identity embedding."""

    def __init__(self, layers: tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = [_Block(inplanes, planes, 2)] + [_Block(planes, planes, 1) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def layer_counts(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """The blocks per stage of an IResNet state dict (iresnet50: 3, 4, 14, 3)."""
    counts = []
    for index in range(1, 5):
        blocks = {key.split(".")[1] for key in state if key.startswith(f"layer{index}.")}
        if not blocks or not all(block.isdigit() for block in blocks):
            raise ValueError(f"no layer{index} blocks")
        counts.append(max(int(block) for block in blocks) + 1)
    return tuple(counts)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _landmarks():
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(face_model_path(LANDMARKS_FILE)))


def align(pixels: np.ndarray) -> np.ndarray | None:
    """The largest face of a uint8 RGB image warped onto ArcFace's template (112 x 112), or None."""
    import cv2

    detector, predictor = _landmarks()
    faces = detector(pixels, 1 if min(pixels.shape[:2]) < UPSAMPLE_BELOW else 0)
    if not faces:
        return None
    face = max(faces, key=lambda box: box.width() * box.height())
    shape = predictor(pixels, face)
    points = np.array([[shape.part(k).x, shape.part(k).y] for k in range(68)], dtype=np.float64)
    five = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
    return cv2.warpAffine(pixels, similarity(five, TEMPLATE), (CROP, CROP), flags=cv2.INTER_LINEAR)


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, shift) taking `source` points closest to
    `target` points in least squares (Umeyama's closed form, without reflections)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    a, b = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(b.T @ a / len(a))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign) / (a * a).sum(1).mean())
    return np.column_stack([scale * rotation, target_mean - scale * rotation @ source_mean])


class ArcFaceModel:
    """The same interface as `metrics.IdentityModel`, with ArcFace's embedding."""

    def __init__(self, weights: str | Path, device: str = "cpu"):
        from ..safety import load_tensors

        state = load_tensors(weights, ADVICE)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            state = {key.removeprefix("module."): value for key, value in state.items()}
            network = IResNet(layer_counts(state))
            network.load_state_dict(state, strict=True)
        except (AttributeError, ValueError, RuntimeError, TypeError) as error:
            detail = str(error).splitlines()[0][:160]
            raise Dp360Error(f"'{weights}' is not an ArcFace IResNet state dict ({detail}); {ADVICE}.") from None
        self.network = network.eval().requires_grad_(False).to(device)
        self.device = device
        self.name = f"arcface-iresnet{sum(layer_counts(state)) * 2 + 2}"

    def embed(self, image: np.ndarray) -> FaceEmbedding:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
        crop = align(np.ascontiguousarray(pixels[..., :3]))
        if crop is None:
            return FaceEmbedding(None, "no face found")
        batch = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(self.device)
        with torch.no_grad():
            return FaceEmbedding(self.network(batch)[0].double().cpu().numpy())


def write_random_arcface(path: str | Path, layers: tuple[int, int, int, int] = (2, 2, 2, 2), seed: int = 0) -> Path:
    """An IResNet (iresnet18 by default) with random weights in the arcface_torch layout (tests)."""
    from ..atomic import atomic_path

    torch.manual_seed(seed)
    state = IResNet(layers).state_dict()
    with atomic_path(Path(path)) as temporary:
        torch.save(state, temporary)
    return Path(path)
