"""Faces of known pose, for tests and benchmarks/pose_accuracy.py: a frontal photo's face is
pasted onto the generic 3D head (`face_model`) and rendered at a chosen yaw and elevation.

The mesh is the 68 landmarks plus a forehead above the brows, triangulated in the frontal view;
each triangle is textured from the photo by an affine warp (the 68 landmarks' texture points
are the photo's detected landmarks, the forehead's come from the head fitted to the photo).
Triangles are drawn back to front, and those facing away are culled. The camera is PanoHead's
(its intrinsics, looking at the head's centre), so the truth is exact: the head's centre
projects to the image centre and the camera's yaw and elevation are the ones asked for.
A face seen from the side is not a photo of a turned head (no ears, hair or neck), but the
detector and the 68-point model find it like one up to about 45 degrees of yaw.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .. import cameras
from .face_model import FACE_MODEL_68


def _forehead(model: np.ndarray) -> np.ndarray:
    """Points above the brows: two rows rising 25 and 50 mm, sloping back like a forehead."""
    brows = model[17:27]
    rows = []
    for rise, back in ((25.0, 6.0), (50.0, 18.0)):
        row = brows + np.array([0.0, rise, -back])
        row[:, 2] -= 0.004 * row[:, 0] ** 2  # rounder towards the temples
        rows.append(row)
    return np.concatenate(rows)


@dataclass
class TexturedHead:
    photo: np.ndarray  # (H, W, 3) uint8
    vertices: np.ndarray  # (N, 3) mm, world axes, origin at the head's centre
    texture: np.ndarray  # (N, 2) photo pixels
    triangles: np.ndarray  # (M, 3) vertex indices


def textured_head(photo: np.ndarray, landmarks68: np.ndarray, shape: np.ndarray | None = None) -> TexturedHead:
    """The face of `photo` (its 68 dlib landmarks given) on the generic head, or on `shape`
    ((68, 3) mm, the same axes) to render a head that differs from the one the fit uses."""
    from scipy.spatial import Delaunay

    from .align import ffhq_square, square_frame
    from .face_model import landmarks5_of_68
    from .pose import fit_head

    model = FACE_MODEL_68 if shape is None else np.asarray(shape, dtype=np.float64)
    vertices = np.concatenate([model, _forehead(model)])
    # Where the forehead is in the photo: project it with the generic head fitted there.
    frame = square_frame(ffhq_square(landmarks5_of_68(landmarks68)), 512)
    fit = fit_head(frame.apply(landmarks68), 512)
    projected, _ = cv2.projectPoints(_forehead(FACE_MODEL_68), fit.rvec, fit.tvec, fit.camera_matrix, None)
    texture = np.concatenate([np.asarray(landmarks68, dtype=np.float64), frame.invert(projected.reshape(-1, 2))])
    triangles = Delaunay(vertices[:, :2]).simplices
    return TexturedHead(photo=photo, vertices=vertices, texture=texture, triangles=triangles)


def render_head(
    head: TexturedHead,
    yaw: float,
    elevation: float,
    size: int = 512,
    eye_distance_px: float = 80.0,
    background: tuple[int, int, int] = (128, 128, 128),
) -> np.ndarray:
    """(size, size, 3) uint8 image of `head` seen from the orbit camera at `yaw`, `elevation`
    (degrees, dp360's convention) with PanoHead's intrinsics; the distance is chosen so that
    a frontal face's eyes are `eye_distance_px` apart. The head's centre is at the image centre."""
    intrinsics = cameras.normalized_intrinsics()
    eye_distance_mm = float(np.linalg.norm(FACE_MODEL_68[36:42].mean(0) - FACE_MODEL_68[42:48].mean(0)))
    radius = cameras.FOCAL_NORMALIZED * size * eye_distance_mm / eye_distance_px
    cam2world = cameras.orbit_pose(yaw, elevation, radius=radius)
    world2cam = np.linalg.inv(cam2world)
    camera_points = head.vertices @ world2cam[:3, :3].T + world2cam[:3, 3]
    pixels = camera_points @ cameras.pixel_intrinsics(intrinsics, size, size).T
    pixels = pixels[:, :2] / pixels[:, 2:3]
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = background
    depth = camera_points[head.triangles, 2].mean(1)
    for index in np.argsort(-depth):  # far to near
        triangle = head.triangles[index]
        target = pixels[triangle].astype(np.float32)
        source = head.texture[triangle].astype(np.float32)
        # Facing the camera: the same winding as in the frontal view (image y down: negative area).
        edge1, edge2 = target[1] - target[0], target[2] - target[0]
        front1 = head.vertices[triangle[1], :2] - head.vertices[triangle[0], :2]
        front2 = head.vertices[triangle[2], :2] - head.vertices[triangle[0], :2]
        if (edge1[0] * edge2[1] - edge1[1] * edge2[0]) * (front1[0] * front2[1] - front1[1] * front2[0]) >= 0:
            continue
        left, top = np.floor(target.min(0)).astype(int)
        right, bottom = np.ceil(target.max(0)).astype(int) + 1
        left, top, right, bottom = max(left, 0), max(top, 0), min(right, size), min(bottom, size)
        if right <= left or bottom <= top:
            continue
        matrix = cv2.getAffineTransform(source, (target - [left, top]).astype(np.float32))
        patch = cv2.warpAffine(
            head.photo, matrix, (right - left, bottom - top), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        mask = np.zeros((bottom - top, right - left), np.uint8)
        cv2.fillConvexPoly(mask, np.round((target - [left, top]) * 16).astype(np.int32), 1, cv2.LINE_8, shift=4)
        region = canvas[top:bottom, left:right]
        region[mask > 0] = patch[mask > 0]
    return canvas


def project_landmarks(
    shape: np.ndarray, yaw: float, elevation: float, size: int = 512, eye_distance_px: float = 80.0
) -> np.ndarray:
    """Pixels (N, 2) of 3D points (mm, world axes, origin at the head's centre) seen as
    `render_head` sees them."""
    eye_distance_mm = float(np.linalg.norm(FACE_MODEL_68[36:42].mean(0) - FACE_MODEL_68[42:48].mean(0)))
    radius = cameras.FOCAL_NORMALIZED * size * eye_distance_mm / eye_distance_px
    return cameras.project_points(
        shape, cameras.orbit_pose(yaw, elevation, radius=radius), cameras.normalized_intrinsics(), size, size
    )
