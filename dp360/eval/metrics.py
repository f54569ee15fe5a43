"""The image metrics of the paper's Table 1, in one place: PSNR, SSIM, LPIPS, identity
similarity (CSIM) and FID.

- PSNR and SSIM: scikit-image, on float images in [0, 1]. Identical images have an infinite PSNR;
  it is reported capped at `PSNR_CAP` dB so that it stays a number in JSON and in means.
- LPIPS: dp360's VGG16 LPIPS (`dp360.panohead.perceptual`), backbone from the weights cache.
- CSIM: cosine similarity of face descriptors from dlib's face-recognition ResNet (weights ship in
  `face-recognition-models`, so it works offline); faces found by dlib's HOG detector and aligned
  with its 5-point model. The paper uses ArcFace; dlib's network is the offline stand-in.
- FID: Inception-v3 pool features (torch-fidelity's network and weight file,
  `INCEPTION_FILE`, which dp360 does not download) and the Frechet distance between two sets.

Where a metric cannot be computed (no backbone, no face, no Inception weights) the functions
return None with a reason instead of failing; callers decide whether that is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Dp360Error

PSNR_CAP = 100.0  # dB; reached only by identical images
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FACE_NETWORK_FILE = "dlib_face_recognition_resnet_model_v1.dat"
FACE_SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"
# dlib's face descriptor wants a face of at least ~80 px; detection upsamples images below
# UPSAMPLE_BELOW once (a 512 px crop's face is found without it, 5x faster).
MIN_FACE_IMAGE = 64
UPSAMPLE_BELOW = 384


def psnr(truth: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1], capped at PSNR_CAP."""
    from skimage.metrics import mean_squared_error

    error = float(mean_squared_error(np.asarray(truth, np.float64), np.asarray(image, np.float64)))
    if error <= 10 ** (-PSNR_CAP / 10):
        return PSNR_CAP
    return min(PSNR_CAP, 10 * math.log10(1.0 / error))


def ssim(truth: np.ndarray, image: np.ndarray) -> float:
    """SSIM of float RGB images in [0, 1] (scikit-image, 7 px window, per channel)."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            np.asarray(truth, np.float64), np.asarray(image, np.float64), channel_axis=2, data_range=1.0
        )
    )


def finite_mean(values) -> float | None:
    """Mean of the values that are numbers; None when there are none."""
    numbers = [float(value) for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(numbers)) if numbers else None


# -- LPIPS ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _loaded_lpips(device: str, path: str, modified: int):
    """One LPIPS network per backbone file and device in a process (it is never trained)."""
    from ..panohead.perceptual import load_lpips

    return load_lpips(device, path)


class Lpips:
    """LPIPS-VGG distance of float images in [0, 1], or None with `reason` when its backbone is missing."""

    def __init__(self, device: str = "cpu", backbone: str | Path | None = None, required: bool = False):
        from ..panohead.perceptual import backbone_path, load_lpips

        self.device = device
        self.model = None
        self.reason: str | None = None
        path = Path(backbone) if backbone is not None else backbone_path()
        if not path.is_file():
            if required:
                load_lpips(device, path)  # its error says where the backbone goes
            self.reason = f"LPIPS backbone not found at {path}; run `dp360 weights download perceptual`"
            return
        self.model = _loaded_lpips(device, str(path.resolve()), path.stat().st_mtime_ns)

    def __call__(self, truth: np.ndarray, image: np.ndarray) -> float | None:
        distances = self.many([truth], [image])
        return None if distances is None else distances[0]

    def many(self, truths: list[np.ndarray], images: list[np.ndarray], batch: int = 16) -> list[float] | None:
        """Distances of same-sized image pairs, in batches (one forward for many small images)."""
        if self.model is None:
            return None
        import torch

        def tensor(arrays: list[np.ndarray]) -> torch.Tensor:
            pixels = torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32)).permute(0, 3, 1, 2)
            return pixels.to(self.device) * 2 - 1

        distances: list[float] = []
        with torch.no_grad():
            for start in range(0, len(truths), batch):
                chunk = slice(start, start + batch)
                distances += [float(d) for d in self.model(tensor(truths[chunk]), tensor(images[chunk]))]
        return distances


# -- identity -------------------------------------------------------------------------------------


def face_model_path(file_name: str) -> Path:
    """A model file shipped inside `face-recognition-models` (found without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise Dp360Error("Identity similarity needs the 'face-recognition-models' package; reinstall dp360.")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / file_name
    if not path.is_file():
        raise Dp360Error(f"{file_name} is missing at {path}; reinstall 'face-recognition-models'.")
    return path


@functools.lru_cache(maxsize=1)
def _dlib_face_models():
    import dlib

    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(face_model_path(FACE_SHAPE_FILE))),
        dlib.face_recognition_model_v1(str(face_model_path(FACE_NETWORK_FILE))),
    )


@dataclass
class FaceEmbedding:
    vector: np.ndarray | None
    reason: str | None = None  # why there is no vector


class IdentityModel:
    """dlib's face-recognition ResNet: a 128-d descriptor of the largest face in an image."""

    name = "dlib-resnet"

    def __init__(self):
        self.detector, self.shape_predictor, self.network = _dlib_face_models()

    def embed(self, image: np.ndarray) -> FaceEmbedding:
        """`image`: RGB, uint8 or float in [0, 1]."""
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
        pixels = np.ascontiguousarray(pixels[..., :3])
        if min(pixels.shape[:2]) < MIN_FACE_IMAGE:
            return FaceEmbedding(None, f"image of {pixels.shape[1]} x {pixels.shape[0]} px is too small to find a face")
        faces = self.detector(pixels, 1 if min(pixels.shape[:2]) < UPSAMPLE_BELOW else 0)
        if not faces:
            return FaceEmbedding(None, "no face found")
        face = max(faces, key=lambda box: box.width() * box.height())
        shape = self.shape_predictor(pixels, face)
        return FaceEmbedding(np.asarray(self.network.compute_face_descriptor(pixels, shape), dtype=np.float64))


def cosine_similarity(first: np.ndarray, second: np.ndarray) -> float:
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second) + 1e-12))


def identity_similarity(
    model: IdentityModel, truth: np.ndarray | FaceEmbedding, image: np.ndarray | FaceEmbedding
) -> tuple[float | None, str | None]:
    """(CSIM, None) or (None, reason): cosine similarity of the two faces' descriptors."""
    embeddings = [item if isinstance(item, FaceEmbedding) else model.embed(item) for item in (truth, image)]
    for role, embedding in zip(("reference", "compared image"), embeddings):
        if embedding.vector is None:
            return None, f"{role}: {embedding.reason}"
    return cosine_similarity(embeddings[0].vector, embeddings[1].vector), None


# -- FID ------------------------------------------------------------------------------------------


def inception_path() -> Path:
    """Where dp360 looks for the Inception weights (it never downloads them itself)."""
    from ..cache import cache_dir

    return cache_dir() / "inception" / INCEPTION_FILE


class InceptionFeatures:
    """Inception-v3 2048-d pool features (torch-fidelity's network), or None with `reason`."""

    def __init__(self, device: str = "cpu", weights: str | Path | None = None, required: bool = False):
        self.device = device
        self.model = None
        self.reason: str | None = None
        path = Path(weights) if weights is not None else inception_path()
        how = f"put {INCEPTION_FILE} (from {INCEPTION_URL}) at {inception_path()}, or pass --inception"
        if not path.is_file():
            self.reason = f"no Inception weights at {path}: {how}"
            if required:
                raise Dp360Error(f"FID needs the Inception weights, which are not at {path}; {how}.")
            return
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from ..safety import load_tensors

        # torch-fidelity reads the file with a full unpickler; reading it first with weights_only
        # proves that it holds nothing but tensors (a file that passes runs nothing either way).
        load_tensors(path, f"replace it with {INCEPTION_FILE} from {INCEPTION_URL}")
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            ).to(device)
        except RuntimeError as error:
            raise Dp360Error(
                f"'{path}' is not torch-fidelity's Inception-v3 weight file ({str(error).splitlines()[0]}); {how}."
            ) from None

    def __call__(self, images: list[np.ndarray]) -> np.ndarray | None:
        """(N, 2048) features of float RGB images in [0, 1]."""
        if self.model is None:
            return None
        import torch

        features = []
        with torch.no_grad():
            for image in images:
                pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
                batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].to(self.device)
                features.append(self.model(batch)[0].double().cpu().numpy()[0])
        return np.stack(features)


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """FID between two feature sets (N, D) with sample covariances S1 = A A^T and S2 = B B^T
    (A, B: the centred features over sqrt(N - 1)). tr sqrt(S1 S2) is the sum of the singular
    values of the small N1 x N2 matrix A^T B (the eigenvalues of S1 S2 are their squares): exact,
    far cheaper than a D x D matrix square root when a set has fewer samples than dimensions
    (always, for one subject's views), and as accurate as the SVD."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if len(first) < 2 or len(second) < 2:
        raise ValueError("FID needs at least two samples in each set")
    a = (first - first.mean(0)).T / math.sqrt(len(first) - 1)
    b = (second - second.mean(0)).T / math.sqrt(len(second) - 1)
    trace_sqrt = float(np.linalg.svd(a.T @ b, compute_uv=False).sum())
    difference = first.mean(0) - second.mean(0)
    distance = float(difference @ difference + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)
    return max(distance, 0.0)  # only rounding makes it negative


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 with random weights, in its weight file's layout (tests)."""
    import tempfile

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ..atomic import atomic_path

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        state = _Unloaded("random", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    with atomic_path(Path(path)) as temporary:
        torch.save(state, temporary)
    return Path(path)
