"""Head pose and head placement from face landmarks, as PanoHead's cropping gets them from its
3DDFA_V2 fit: a generic 3D head (`face_model`) is fitted to the landmarks by PnP with
PanoHead's intrinsics, which gives the head's rotation, where its centre projects and how large
it is. As in PanoHead's cropping, only the rotation goes into the camera label: the camera sits
at radius 2.7 and looks through the head's centre.

Fitting all 68 dlib landmarks, not five, matters for the elevation: with five points it hangs
on where the nose tip sits between the eyes and the mouth, which varies from face to face by
more than a 15 degree tilt does (benchmarks/pose_accuracy.py measures both).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .. import cameras
from .face_model import FACE_MODEL_5, FACE_MODEL_68, HEAD_CENTRE_DEPTH_MM

# Jaw-line landmarks on the far side of a turned face follow its silhouette, not fixed points
# of the head: past this yaw (degrees) the far half of the jaw line is left out of the fit
# (measured on rendered faces, benchmarks/pose_accuracy.py: yaw error 4.2 -> 2.2 degrees).
FAR_JAW_YAW = 15.0
_JAW_IMAGE_LEFT = list(range(0, 8))  # the subject's right jaw line, far when yaw > 0
_JAW_IMAGE_RIGHT = list(range(9, 17))


@dataclass
class HeadPose:
    cam2world: np.ndarray  # OpenCV axes, radius 2.7, looking through the origin
    yaw: float  # degrees, geometric, 0 = frontal, > 0 = camera towards the subject's left
    elevation: float  # degrees, > 0 = camera above eye level
    roll: float  # degrees, rotation of the camera about its optical axis relative to upright
    source: str  # "landmarks", "override" or "default"

    def as_dict(self) -> dict:
        return {
            "yaw_deg": round(self.yaw, 3),
            "elevation_deg": round(self.elevation, 3),
            "roll_deg": round(self.roll, 3),
            "source": self.source,
        }


@dataclass
class HeadFit:
    """The generic head fitted to landmarks given in a square frame of `size` pixels."""

    size: int
    camera_matrix: np.ndarray  # (3, 3) pixel intrinsics of the frame
    rvec: np.ndarray  # PnP solution: head (world axes, mm, origin at the head's centre) -> camera
    tvec: np.ndarray  # the head's centre in camera coordinates (mm)
    rotation: np.ndarray  # world -> camera rotation of a camera looking through the head's centre
    yaw: float
    elevation: float
    roll: float
    centre: np.ndarray  # (2,) where the head's centre projects, frame pixels
    offset: np.ndarray  # (2,) that point relative to the frame's centre, in half-sides (x right, y down)
    scale: float  # head size relative to a frontal face that fills the frame as FFHQ's square does
    landmark_count: int  # 68 or 5
    used: list[int]  # the landmarks the fit used
    error_px: float  # mean reprojection error of those landmarks

    def as_dict(self) -> dict:
        return {
            "landmarks": self.landmark_count,
            "landmarks_used": len(self.used),
            "scale": round(self.scale, 4),
            "offset": [round(float(v), 4) for v in self.offset],
            "yaw_deg": round(self.yaw, 3),
            "elevation_deg": round(self.elevation, 3),
            "roll_deg": round(self.roll, 3),
            "reprojection_error_px": round(self.error_px, 3),
        }

    def axes(self, length_mm: float = 60.0) -> np.ndarray:
        """Frame pixels of the nose tip and of the tips of the head's x, y, z axes drawn from it (4, 2)."""
        nose = FACE_MODEL_68[30]
        points = nose + np.array([[0.0, 0.0, 0.0], [length_mm, 0, 0], [0, length_mm, 0], [0, 0, length_mm]])
        projected, _ = cv2.projectPoints(points, self.rvec, self.tvec, self.camera_matrix, None)
        return projected.reshape(4, 2)


def crop_camera_matrix(size: int, focal_scale: float = 1.0) -> np.ndarray:
    """Pixel intrinsics of PanoHead's camera for a square image of `size` px; `focal_scale` > 1
    for a frame that is a part of the image the intrinsics are for (the FFHQ square is 1/1.1
    of PanoHead's crop)."""
    return cameras.pixel_intrinsics(
        cameras.normalized_intrinsics(focal=cameras.FOCAL_NORMALIZED * focal_scale), size, size
    )


def _roll_of(cam2world: np.ndarray) -> float:
    upright = cameras.look_at_cam2world(cam2world[:3, 3])
    relative = upright[:3, :3].T @ cam2world[:3, :3]
    return math.degrees(math.atan2(relative[1, 0], relative[0, 0]))


def _solve(model: np.ndarray, image: np.ndarray, camera_matrix: np.ndarray, guess=None):
    object_points = np.ascontiguousarray(model.reshape(-1, 1, 3))
    image_points = np.ascontiguousarray(image.reshape(-1, 1, 2))
    if guess is None:
        ok, rvec, tvec = cv2.solvePnP(object_points, image_points, camera_matrix, None, flags=cv2.SOLVEPNP_SQPNP)
        if not ok:
            raise RuntimeError("head pose could not be solved from the landmarks")
    else:
        rvec, tvec = (value.reshape(3, 1).copy() for value in guess)
    rvec, tvec = cv2.solvePnPRefineLM(object_points, image_points, camera_matrix, None, rvec, tvec)
    if tvec[2, 0] <= 0:
        raise RuntimeError("head pose could not be solved from the landmarks (the head came out behind the camera)")
    return rvec.reshape(3), tvec.reshape(3)


def _onto_axis(direction: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the unit vector `direction` onto the optical axis (0, 0, 1)."""
    axis = np.cross(direction, [0.0, 0.0, 1.0])
    sine = np.linalg.norm(axis)
    if sine < 1e-12:
        return np.eye(3)
    angle = math.atan2(sine, float(direction[2]))
    return cv2.Rodrigues(axis / sine * angle)[0]


@functools.lru_cache(maxsize=8)
def _reference_distance(size: int, focal_px: float) -> float:
    """Distance (mm) of the head's centre when a frontal generic face fills a `size` px frame as
    FFHQ's aligned square does (half-side = max(2 |eye-eye|, 1.8 |eye-mouth|))."""
    from .align import ffhq_square

    frontal = np.diag([1.0, -1.0, -1.0])  # world (y up, face towards +z) -> camera, face to camera
    camera_matrix = np.array([[focal_px, 0.0, size / 2], [0.0, focal_px, size / 2], [0.0, 0.0, 1.0]])
    face_depth = float(FACE_MODEL_5[:2, 2].mean())  # the eyes, in front of the head's centre
    distance = focal_px * 130.0 / (size / 2) + face_depth  # a first guess; refined below
    for _ in range(4):
        camera_points = FACE_MODEL_5 @ frontal.T + [0.0, 0.0, distance]
        pixels = camera_points @ camera_matrix.T
        _, x_axis, _ = ffhq_square(pixels[:, :2] / pixels[:, 2:])
        half = float(np.linalg.norm(x_axis))
        distance = face_depth + (distance - face_depth) * half / (size / 2)
    return distance


def fit_head(points: np.ndarray, size: int, focal_scale: float = 1.0) -> HeadFit:
    """Fit the generic head to 68 (dlib order) or 5 (`FaceDetection.landmarks5` order)
    landmarks given in pixels of a square frame of `size` px seen with PanoHead's camera
    (`crop_camera_matrix(size, focal_scale)`)."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape == (68, 2):
        model = FACE_MODEL_68
    elif points.shape == (5, 2):
        model = FACE_MODEL_5
    else:
        raise ValueError(f"expected 68 or 5 landmarks (N, 2), got an array of shape {points.shape}")
    camera_matrix = crop_camera_matrix(size, focal_scale)
    used = list(range(len(points)))
    rvec, tvec = _solve(model, points, camera_matrix)
    if len(points) == 68:
        yaw = _angles(rvec, tvec)[0]
        if abs(yaw) > FAR_JAW_YAW:
            far = _JAW_IMAGE_LEFT if yaw > 0 else _JAW_IMAGE_RIGHT
            used = [index for index in used if index not in far]
            rvec, tvec = _solve(model[used], points[used], camera_matrix, guess=(rvec, tvec))
    yaw, elevation, roll, rotation = _angles(rvec, tvec)
    centre = camera_matrix @ tvec
    centre = centre[:2] / centre[2]
    projected, _ = cv2.projectPoints(model[used], rvec, tvec, camera_matrix, None)
    error = float(np.linalg.norm(projected.reshape(-1, 2) - points[used], axis=1).mean())
    return HeadFit(
        size=size,
        camera_matrix=camera_matrix,
        rvec=rvec,
        tvec=tvec,
        rotation=rotation,
        yaw=yaw,
        elevation=elevation,
        roll=roll,
        centre=centre,
        offset=(centre - size / 2) / (size / 2),
        scale=_reference_distance(size, float(camera_matrix[0, 0])) / float(np.linalg.norm(tvec)),
        landmark_count=len(points),
        used=used,
        error_px=error,
    )


def _angles(rvec: np.ndarray, tvec: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Yaw, elevation and roll of a camera that sees the head as the PnP solution does but
    with the head's centre on its optical axis (as in the recentred crop), and its rotation."""
    rotation = _onto_axis(tvec / np.linalg.norm(tvec)) @ cv2.Rodrigues(rvec.reshape(3, 1))[0]
    cam2world = cameras.rotation_only_cam2world(rotation)
    yaw, elevation = cameras.yaw_elevation_of(cam2world)
    return yaw, elevation, _roll_of(cam2world), rotation


def pose_from_fit(fit: HeadFit) -> HeadPose:
    cam2world = cameras.rotation_only_cam2world(fit.rotation)
    return HeadPose(cam2world, fit.yaw, fit.elevation, fit.roll, "landmarks")


def pose_from_landmarks(landmarks: np.ndarray, size: int, focal_scale: float = 1.0) -> HeadPose:
    """The camera of landmarks (68 or 5) given in pixels of a square crop of `size` px."""
    return pose_from_fit(fit_head(landmarks, size, focal_scale))


def pose_from_angles(yaw: float, elevation: float, source: str) -> HeadPose:
    cam2world = cameras.orbit_pose(yaw, elevation)
    return HeadPose(cam2world, yaw, elevation, 0.0, source)


__all__ = [
    "FACE_MODEL_5",
    "FACE_MODEL_68",
    "HEAD_CENTRE_DEPTH_MM",
    "HeadFit",
    "HeadPose",
    "crop_camera_matrix",
    "fit_head",
    "pose_from_angles",
    "pose_from_fit",
    "pose_from_landmarks",
]
