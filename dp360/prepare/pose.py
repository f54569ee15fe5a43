"""Head pose from five landmarks, turned into a PanoHead camera label.

The pose is solved with OpenCV's PnP against a generic 5-point face (average adult proportions)
in the crop, with PanoHead's camera intrinsics. As in PanoHead's cropping, only the rotation is
kept: the camera sits at radius 2.7 on its optical axis and looks through the origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .. import cameras

# Generic face in millimetres, in PanoHead world axes (y up, the face looks along +z, x to the
# image right in a frontal view). Rows follow `FaceDetection.landmarks5`. Proportions from adult
# anthropometry (interpupillary ~62 mm, pupils ~35 mm above the nose tip, mouth corners ~20 mm
# below it): on frontal photos the nose tip sits ~64% of the way from the eyes to the mouth.
FACE_MODEL_5 = np.array(
    [
        [-31.0, 35.0, -30.0],  # image-left eye centre (the subject's right eye)
        [31.0, 35.0, -30.0],  # image-right eye centre
        [0.0, 0.0, 0.0],  # nose tip
        [-24.0, -20.0, -24.0],  # image-left mouth corner
        [24.0, -20.0, -24.0],  # image-right mouth corner
    ]
)


@dataclass
class HeadPose:
    cam2world: np.ndarray  # OpenCV axes, radius 2.7, looking through the origin
    yaw: float  # degrees, geometric, 0 = frontal, > 0 = camera towards the subject's left
    elevation: float  # degrees, > 0 = camera above eye level
    roll: float  # degrees, rotation of the camera about its optical axis relative to upright
    source: str  # "landmarks", "override" or "default"
    rvec: np.ndarray | None = None  # PnP solution in crop pixels (for drawing pose axes)
    tvec: np.ndarray | None = None

    def as_dict(self) -> dict:
        return {
            "yaw_deg": round(self.yaw, 3),
            "elevation_deg": round(self.elevation, 3),
            "roll_deg": round(self.roll, 3),
            "source": self.source,
        }


def crop_camera_matrix(size: int) -> np.ndarray:
    return cameras.pixel_intrinsics(cameras.normalized_intrinsics(), size, size)


def _roll_of(cam2world: np.ndarray) -> float:
    upright = cameras.look_at_cam2world(cam2world[:3, 3])
    relative = upright[:3, :3].T @ cam2world[:3, :3]
    return math.degrees(math.atan2(relative[1, 0], relative[0, 0]))


def pose_from_landmarks(landmarks5_crop: np.ndarray, size: int) -> HeadPose:
    """Solve the head rotation from landmarks given in crop pixels (crop of `size` px)."""
    image_points = np.asarray(landmarks5_crop, dtype=np.float64).reshape(5, 1, 2)
    object_points = FACE_MODEL_5.reshape(5, 1, 3)
    camera_matrix = crop_camera_matrix(size)
    ok, rvec, tvec = cv2.solvePnP(object_points, image_points, camera_matrix, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise RuntimeError("head pose could not be solved from the landmarks")
    rvec, tvec = cv2.solvePnPRefineLM(object_points, image_points, camera_matrix, None, rvec, tvec)
    rotation, _ = cv2.Rodrigues(rvec)
    cam2world = cameras.rotation_only_cam2world(rotation)
    yaw, elevation = cameras.yaw_elevation_of(cam2world)
    return HeadPose(cam2world, yaw, elevation, _roll_of(cam2world), "landmarks", rvec.reshape(3), tvec.reshape(3))


def pose_from_angles(yaw: float, elevation: float, source: str) -> HeadPose:
    cam2world = cameras.orbit_pose(yaw, elevation)
    return HeadPose(cam2world, yaw, elevation, 0.0, source)


def pose_axes_in_crop(pose: HeadPose, size: int, length_mm: float = 60.0) -> np.ndarray | None:
    """Crop-pixel positions of the nose tip and the tips of the head's x, y, z axes (4, 2)."""
    if pose.rvec is None or pose.tvec is None:
        return None
    points = np.array([[0.0, 0.0, 0.0], [length_mm, 0, 0], [0, length_mm, 0], [0, 0, length_mm]])
    projected, _ = cv2.projectPoints(points, pose.rvec, pose.tvec, crop_camera_matrix(size), None)
    return projected.reshape(4, 2)
