"""PanoHead's crop, in its two steps, widened and resized to 512 px.

1. The aligned square (FFHQ): with e = eye midpoint, d_e = right eye - left eye, d_m = mouth
   midpoint - e, the x axis is d_e - rot90(d_m) normalised, the half-size is
   max(2.0 |d_e|, 1.8 |d_m|) and the centre is e + 0.1 d_m.
2. The recrop: a 3D head is fitted in that square seen as a 512 px image (PanoHead fits
   3DDFA_V2, dp360 a generic 68-landmark head, `pose.fit_head`); the square is moved so that
   its centre is where the head's centre projects, and scaled by the head's size relative to a
   frontal face's (`recentre_square`). On a turned face the head's centre lies behind the face,
   towards the back of the head, so the square moves that way and the whole head stays in it.

The final crop widens the square by 10% on top and 5% on each side (none at the bottom:
512 -> 563 px, PanoHead's size before resizing to 512).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_SIZE = 512
# PanoHead recrop: expansions of the 512 px aligned square, as fractions of its side.
EXPAND_TOP, EXPAND_BOTTOM, EXPAND_LEFT, EXPAND_RIGHT = 0.10, 0.0, 0.05, 0.05
RECROP_SIZE = round(512 * (1 + EXPAND_LEFT + EXPAND_RIGHT))  # 563, the size PanoHead writes before resizing


@dataclass
class CropTransform:
    """Affine map from input pixels to crop pixels, plus the crop's corners in the input."""

    matrix: np.ndarray  # (2, 3) input -> crop
    corners: np.ndarray  # (4, 2) crop corners in input pixels: top-left, top-right, bottom-right, bottom-left
    size: int

    def apply(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return points @ self.matrix[:, :2].T + self.matrix[:, 2]

    @property
    def side(self) -> float:
        """Length of the crop's side in input pixels."""
        return float(np.linalg.norm(self.corners[1] - self.corners[0]))

    def invert(self, points: np.ndarray) -> np.ndarray:
        inverse = cv2.invertAffineTransform(self.matrix)
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return points @ inverse[:, :2].T + inverse[:, 2]


def ffhq_square(landmarks5: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre and the two half-axis vectors (x to the image right, y down) of the aligned square."""
    eye_left, eye_right, _, mouth_left, mouth_right = np.asarray(landmarks5, dtype=np.float64)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_mid
    # eye_to_mouth turned by -90 degrees points to the image right on an upright face, so the
    # x axis averages the eye line with the direction perpendicular to the eye-mouth line.
    x_axis = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x_axis /= np.linalg.norm(x_axis)
    half = max(np.linalg.norm(eye_to_eye) * 2.0, np.linalg.norm(eye_to_mouth) * 1.8)
    x_axis *= half
    y_axis = np.array([-x_axis[1], x_axis[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    return centre, x_axis, y_axis


Square = tuple[np.ndarray, np.ndarray, np.ndarray]  # centre, x half-axis, y half-axis (input pixels)


def square_frame(square: Square, size: int = CROP_SIZE) -> CropTransform:
    """The square itself (not widened) as a `size` px image, the frame the head is fitted in."""
    centre, x_axis, y_axis = square
    origin = centre - x_axis - y_axis
    crop_to_input = np.column_stack([2 * x_axis / size, 2 * y_axis / size, origin])
    corners = np.stack([origin, origin + 2 * x_axis, origin + 2 * x_axis + 2 * y_axis, origin + 2 * y_axis])
    return CropTransform(matrix=cv2.invertAffineTransform(crop_to_input), corners=corners, size=size)


def recentre_square(square: Square, offset: np.ndarray, scale: float) -> Square:
    """PanoHead's recrop: move the square's centre by `offset` (x, y; in half-sides, y down:
    where the head's centre projects in the square's frame) and scale it by `scale`."""
    centre, x_axis, y_axis = square
    return centre + offset[0] * x_axis + offset[1] * y_axis, x_axis * scale, y_axis * scale


def panohead_crop_transform(landmarks5: np.ndarray, size: int = CROP_SIZE) -> CropTransform:
    """The final crop of the FFHQ square of `landmarks5`, without the recrop step."""
    return widened_crop_transform(ffhq_square(landmarks5), size)


def widened_crop_transform(square: Square, size: int = CROP_SIZE) -> CropTransform:
    """The final crop: `square` widened like PanoHead's (top 10%, sides 5%), as `size` px."""
    centre, x_axis, y_axis = square
    top_left = centre - x_axis - y_axis
    # The widened square in input coordinates: origin and the two full side vectors.
    origin = top_left - EXPAND_LEFT * 2 * x_axis - EXPAND_TOP * 2 * y_axis
    side_u = (1 + EXPAND_LEFT + EXPAND_RIGHT) * 2 * x_axis
    side_v = (1 + EXPAND_TOP + EXPAND_BOTTOM) * 2 * y_axis
    crop_to_input = np.column_stack([side_u / size, side_v / size, origin])
    matrix = cv2.invertAffineTransform(crop_to_input)
    corners = np.stack([origin, origin + side_u, origin + side_u + side_v, origin + side_v])
    return CropTransform(matrix=matrix, corners=corners, size=size)


def _blurred_padding(warped: np.ndarray, inside: np.ndarray, size: int) -> np.ndarray:
    """Blend reflected padding towards a blurred copy with distance from the image, so that the
    mirrored content outside the photo does not read as real detail."""
    outside = (inside < 0.5).astype(np.uint8)
    if not outside.any():
        return warped
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    weight = np.clip(distance / (0.1 * size), 0.0, 1.0)[:, :, None]
    blurred = cv2.GaussianBlur(warped, (0, 0), sigmaX=0.02 * size)
    return np.clip(np.round(warped * (1.0 - weight) + blurred * weight), 0, 255).astype(np.uint8)


def warp_crop(
    image: np.ndarray, transform: CropTransform, supersample: int = 2, blur_padding: bool = True
) -> np.ndarray:
    """Resample `image` (H, W) or (H, W, C) uint8 into the crop, reflecting where the crop leaves
    the image; rendered at `supersample`x and area-averaged down for clean edges."""
    size = transform.size
    matrix = transform.matrix.copy()
    source = image
    # Input pixels per output pixel at the supersampled size; pre-shrink the input so that
    # Lanczos never decimates by more than 2x (it would alias).
    scale_in_per_out = 1.0 / (np.sqrt(abs(np.linalg.det(matrix[:, :2]))) * supersample)
    if scale_in_per_out > 2.0:
        shrink = 1.0 / scale_in_per_out
        source = cv2.resize(
            image,
            (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink))),
            interpolation=cv2.INTER_AREA,
        )
        matrix[:, :2] = matrix[:, :2] / shrink
    big = size * supersample
    matrix_big = matrix * supersample
    warped = cv2.warpAffine(source, matrix_big, (big, big), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT)
    warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
    if blur_padding and warped.ndim == 3:
        inside = cv2.warpAffine(
            np.ones(source.shape[:2], np.float32), matrix_big, (big, big), flags=cv2.INTER_LINEAR, borderValue=0.0
        )
        inside = cv2.resize(inside, (size, size), interpolation=cv2.INTER_AREA)
        warped = _blurred_padding(warped, inside, size)
    return warped


def center_square(image: np.ndarray, size: int = CROP_SIZE) -> tuple[np.ndarray, CropTransform]:
    """For `--no-crop`: centre-crop to a square (as PanoHead's projector does) and resize."""
    height, width = image.shape[:2]
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    scale = size / side
    matrix = np.array([[scale, 0.0, -left * scale], [0.0, scale, -top * scale]])
    corners = np.array([[left, top], [left + side, top], [left + side, top + side], [left, top + side]])
    transform = CropTransform(matrix=matrix, corners=corners, size=size)
    return warp_crop(image, transform, blur_padding=False), transform
