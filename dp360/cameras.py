"""Every camera convention of dp360 lives here.

World frame (PanoHead / EG3D): y up, the face looks along +z, the head sits at the origin.
Camera frame of a pose matrix: OpenCV (x right, y down, z forward), stored as a 4x4 cam2world.

- PanoHead label: 25 numbers = row-major 4x4 cam2world (OpenCV axes) + row-major 3x3 intrinsics
  normalised by the image size (fx = fy = 4.2647, cx = cy = 0.5).
- `look_at_pose(h, v)`: PanoHead's `LookAtPoseSampler` in its own parameters. h = pi/2 is the
  front; increasing h moves the camera towards +x. v is *not* an angle: the polar angle is
  phi = arccos(1 - 2 v / pi), so v = pi/2 is level.
- `orbit_pose(yaw_deg, elevation_deg)`: the same cameras in geometric degrees relative to the
  front: yaw 0 = frontal, yaw > 0 = camera towards +x (the subject's left, so the face turns
  towards the image's left), elevation > 0 = camera above eye level.
- The DiffPortrait360 orbit: view k of n at h = pi/2 + 2 pi k / n, v = pi/2, radius 2.7
  (view 0 frontal, view n/2 the back). The reference code writes pi as 3.14; we use pi (the
  largest difference over 32 views is 0.18 degrees).
- nerfstudio `transforms.json`: cam2world in OpenGL axes (x right, y up, z backward) and
  intrinsics in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CAMERA_RADIUS = 2.7
FOCAL_NORMALIZED = 4.2647
PRINCIPAL_NORMALIZED = 0.5
DP360_VIEW_COUNT = 32
# Flips the y and z camera axes: OpenCV <-> OpenGL (its own inverse).
_CV_GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def normalized_intrinsics(focal: float = FOCAL_NORMALIZED, principal: float = PRINCIPAL_NORMALIZED) -> np.ndarray:
    return np.array([[focal, 0.0, principal], [0.0, focal, principal], [0.0, 0.0, 1.0]])


def pixel_intrinsics(normalized: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised intrinsics (PanoHead) to pixel intrinsics for an image of the given size."""
    scale = np.diag([float(width), float(height), 1.0])
    return scale @ np.asarray(normalized, dtype=np.float64)


def normalize_intrinsics(pixel: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.diag([1.0 / width, 1.0 / height, 1.0]) @ np.asarray(pixel, dtype=np.float64)


def look_at_cam2world(origin: Sequence[float], lookat: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """OpenCV cam2world of a camera at `origin` looking at `lookat` with world +y as up."""
    origin = np.asarray(origin, dtype=np.float64)
    forward = np.asarray(lookat, dtype=np.float64) - origin
    forward /= np.linalg.norm(forward)
    world_up = np.array([0.0, 1.0, 0.0])
    right = -np.cross(world_up, forward)
    norm = np.linalg.norm(right)
    if norm < 1e-9:
        raise ValueError("camera looks straight up or down; its orientation is undefined")
    right /= norm
    down = np.cross(forward, right)
    cam2world = np.eye(4)
    cam2world[:3, 0], cam2world[:3, 1], cam2world[:3, 2], cam2world[:3, 3] = right, down, forward, origin
    return cam2world


def look_at_pose(
    h: float, v: float, radius: float = CAMERA_RADIUS, lookat: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """PanoHead's LookAtPoseSampler (without noise): cam2world for yaw-like h and pitch-like v."""
    v = min(max(v, 1e-5), math.pi - 1e-5)
    phi = math.acos(1.0 - 2.0 * v / math.pi)
    offset = np.array(
        [
            radius * math.sin(phi) * math.cos(math.pi - h),
            radius * math.cos(phi),
            radius * math.sin(phi) * math.sin(math.pi - h),
        ]
    )
    return look_at_cam2world(np.asarray(lookat, dtype=np.float64) + offset, lookat)


def panohead_angles(yaw_deg: float, elevation_deg: float) -> tuple[float, float]:
    """Geometric (yaw, elevation) in degrees to PanoHead's sampler parameters (h, v)."""
    h = math.pi / 2 + math.radians(yaw_deg)
    v = math.pi * (1.0 - math.sin(math.radians(elevation_deg))) / 2.0
    return h, v


def orbit_pose(
    yaw_deg: float,
    elevation_deg: float = 0.0,
    radius: float = CAMERA_RADIUS,
    lookat: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """cam2world of a camera on the orbit, in geometric degrees relative to the frontal view."""
    h, v = panohead_angles(yaw_deg, elevation_deg)
    return look_at_pose(h, v, radius, lookat)


def yaw_elevation_of(cam2world: np.ndarray, lookat: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[float, float]:
    """Geometric (yaw, elevation) in degrees of a camera's position around `lookat`."""
    offset = np.asarray(cam2world)[:3, 3] - np.asarray(lookat, dtype=np.float64)
    offset = offset / np.linalg.norm(offset)
    yaw = math.degrees(math.atan2(offset[0], offset[2]))
    elevation = math.degrees(math.asin(float(np.clip(offset[1], -1.0, 1.0))))
    return yaw, elevation


def dp360_orbit(view_count: int = DP360_VIEW_COUNT, radius: float = CAMERA_RADIUS) -> list[np.ndarray]:
    """The DiffPortrait360 orbit: view k at h = pi/2 + 2 pi k / n, v = pi/2 (0 front, n/2 back)."""
    if view_count < 1:
        raise ValueError("view_count must be at least 1")
    return [look_at_pose(math.pi / 2 + 2 * math.pi * k / view_count, math.pi / 2, radius) for k in range(view_count)]


def rotation_only_cam2world(world2cam_rotation: np.ndarray, radius: float = CAMERA_RADIUS) -> np.ndarray:
    """The camera label PanoHead's cropping derives from a head rotation: the translation is
    dropped, so the camera sits at `radius` on its own optical axis and looks through the origin."""
    rotation = np.asarray(world2cam_rotation, dtype=np.float64)
    cam2world = np.eye(4)
    cam2world[:3, :3] = rotation.T
    cam2world[:3, 3] = -radius * rotation.T[:, 2]
    return cam2world


# --------------------------------------------------------------------------------------------
# PanoHead labels
# --------------------------------------------------------------------------------------------


def panohead_label(cam2world: np.ndarray, intrinsics: np.ndarray | None = None) -> list[float]:
    """25 numbers: cam2world (OpenCV axes, row-major) then normalised intrinsics (row-major)."""
    intrinsics = normalized_intrinsics() if intrinsics is None else np.asarray(intrinsics)
    return [float(x) for x in np.asarray(cam2world, dtype=np.float64).reshape(16)] + [
        float(x) for x in intrinsics.reshape(9)
    ]


def parse_panohead_label(label: Sequence[float | str]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `panohead_label`; accepts the strings PanoHead's dataset.json stores."""
    values = np.array([float(x) for x in label], dtype=np.float64)
    if values.shape != (25,) or not np.all(np.isfinite(values)):
        raise ValueError("a PanoHead camera label must be 25 finite numbers")
    return values[:16].reshape(4, 4), values[16:].reshape(3, 3)


def panohead_dataset_json(entries: Iterable[tuple[str, Sequence[float]]]) -> dict[str, Any]:
    """PanoHead's dataset.json: {"labels": [[file_name, [25 numbers as strings]], ...]} (6 decimals)."""
    return {"labels": [[name, [f"{float(x):.6f}" for x in label]] for name, label in entries]}


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------


def points_in_camera(points_world: np.ndarray, cam2world: np.ndarray) -> np.ndarray:
    """World points (N, 3) in an OpenCV camera's frame: x right, y down, z (the depth) forward."""
    points = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
    world2cam = np.linalg.inv(np.asarray(cam2world, dtype=np.float64))
    return points @ world2cam[:3, :3].T + world2cam[:3, 3]


def project_points(
    points_world: np.ndarray, cam2world: np.ndarray, intrinsics_normalized: np.ndarray, width: int, height: int
) -> np.ndarray:
    """Pixel coordinates (N, 2) of world points (N, 3); pixel (0, 0) is the top-left corner of
    the top-left pixel, so the principal point 0.5 maps to width / 2."""
    camera_points = points_in_camera(points_world, cam2world)
    if np.any(camera_points[:, 2] <= 0):
        raise ValueError("a point lies behind the camera")
    pixels = camera_points @ pixel_intrinsics(intrinsics_normalized, width, height).T
    return pixels[:, :2] / pixels[:, 2:3]


# --------------------------------------------------------------------------------------------
# nerfstudio transforms.json
# --------------------------------------------------------------------------------------------


def opencv_to_opengl(cam2world: np.ndarray) -> np.ndarray:
    return np.asarray(cam2world, dtype=np.float64) @ _CV_GL_FLIP


def opengl_to_opencv(cam2world: np.ndarray) -> np.ndarray:
    return np.asarray(cam2world, dtype=np.float64) @ _CV_GL_FLIP


@dataclass
class ViewCamera:
    """One image with its camera, in dp360's conventions (OpenCV cam2world, normalised K)."""

    file_path: str
    cam2world: np.ndarray
    intrinsics: np.ndarray  # normalised


def to_nerfstudio_transforms(views: Sequence[ViewCamera], width: int, height: int) -> dict[str, Any]:
    """A nerfstudio `transforms.json` dict (OpenGL cam2world, pixel intrinsics per frame)."""
    frames = []
    for view in views:
        pixel = pixel_intrinsics(view.intrinsics, width, height)
        frames.append(
            {
                "file_path": view.file_path,
                "transform_matrix": opencv_to_opengl(view.cam2world).tolist(),
                "fl_x": float(pixel[0, 0]),
                "fl_y": float(pixel[1, 1]),
                "cx": float(pixel[0, 2]),
                "cy": float(pixel[1, 2]),
                "w": int(width),
                "h": int(height),
            }
        )
    shared = frames[0] if frames else {}
    transforms: dict[str, Any] = {"camera_model": "OPENCV"}
    if frames and all(all(f[k] == shared[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")) for f in frames):
        # Same intrinsics everywhere: store them once at the top level, as nerfstudio writes them.
        transforms.update({k: shared[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")})
        frames = [{"file_path": f["file_path"], "transform_matrix": f["transform_matrix"]} for f in frames]
    transforms["frames"] = frames
    return transforms


def from_nerfstudio_transforms(transforms: dict[str, Any]) -> list[ViewCamera]:
    """Inverse of `to_nerfstudio_transforms` (per-frame intrinsics override the top-level ones)."""
    views = []
    for frame in transforms["frames"]:

        def get(key: str, frame: dict[str, Any] = frame) -> Any:
            return frame.get(key, transforms.get(key))

        width, height = int(get("w")), int(get("h"))
        pixel = np.array([[get("fl_x"), 0.0, get("cx")], [0.0, get("fl_y"), get("cy")], [0.0, 0.0, 1.0]], dtype=float)
        views.append(
            ViewCamera(
                file_path=frame["file_path"],
                cam2world=opengl_to_opencv(np.asarray(frame["transform_matrix"], dtype=np.float64)),
                intrinsics=normalize_intrinsics(pixel, width, height),
            )
        )
    return views


def pixel_rays(cam2world, intrinsics, resolution: int):
    """World-space rays through the pixel centres of a `resolution`^2 image, in PyTorch.

    cam2world (N, 4, 4) in OpenCV axes and normalised intrinsics (N, 3, 3), as in a PanoHead
    label. Returns origins and unit directions, each (N, resolution^2, 3), row-major pixels."""
    import torch

    batch = cam2world.shape[0]
    device, dtype = cam2world.device, cam2world.dtype
    centres = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    u, v = cols.reshape(1, -1).expand(batch, -1), rows.reshape(1, -1).expand(batch, -1)
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, skew = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]
    y_cam = (v - cy) / fy
    x_cam = (u - cx - skew * y_cam) / fx
    points_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam), torch.ones_like(x_cam)], dim=-1)  # N, R, 4
    points_world = torch.bmm(cam2world, points_cam.transpose(1, 2)).transpose(1, 2)[..., :3]
    origins = cam2world[:, None, :3, 3].expand(-1, points_world.shape[1], -1)
    directions = torch.nn.functional.normalize(points_world - origins, dim=-1)
    return origins, directions


def orbit_labels(view_count: int = DP360_VIEW_COUNT, radius: float = CAMERA_RADIUS) -> np.ndarray:
    """(n, 25) PanoHead labels of the DP360 orbit (view 0 frontal)."""
    return np.array([panohead_label(pose) for pose in dp360_orbit(view_count, radius)], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Evaluation: aligning a ground-truth capture's cameras to the orbit, and resampling its images
# --------------------------------------------------------------------------------------------


def axes_meeting_point(cam2worlds: Sequence[np.ndarray]) -> np.ndarray:
    """The point nearest (least squares) to every camera's optical axis: where a rig of cameras
    around a head looks. Raises ValueError when the axes are all parallel (no single point)."""
    system, right_side = np.zeros((3, 3)), np.zeros(3)
    for cam2world in cam2worlds:
        cam2world = np.asarray(cam2world, dtype=np.float64)
        forward = cam2world[:3, 2] / np.linalg.norm(cam2world[:3, 2])
        across = np.eye(3) - np.outer(forward, forward)  # projects onto the plane across the axis
        system += across
        right_side += across @ cam2world[:3, 3]
    if len(cam2worlds) < 2 or np.linalg.cond(system) > 1e8:
        raise ValueError("the cameras' optical axes do not meet: they need at least two different directions")
    return np.linalg.solve(system, right_side)


def orbit_alignment(
    cam2worlds: Sequence[np.ndarray], reference: int, radius: float = CAMERA_RADIUS
) -> tuple[np.ndarray, float]:
    """The similarity that puts a capture's cameras (OpenCV cam2world, any world frame) on dp360's
    orbit: the point the cameras look at goes to the origin, their mean up direction to +y, the
    `reference` camera (the input's view) to yaw 0 in front of the face (+z), at `radius`.
    Returns (rotation 3x3 and translation as a 4x4 `world -> orbit world` rigid map, scale)."""
    poses = [np.asarray(pose, dtype=np.float64) for pose in cam2worlds]
    centre = axes_meeting_point(poses)
    up = -np.mean([pose[:3, 1] for pose in poses], axis=0)  # OpenCV y points down
    if np.linalg.norm(up) < 1e-6:
        up = -poses[reference][:3, 1]
    up /= np.linalg.norm(up)
    front = poses[reference][:3, 3] - centre
    distance = float(np.linalg.norm(front))
    front = front - (front @ up) * up
    if np.linalg.norm(front) < 1e-6 * max(distance, 1e-12):
        raise ValueError("the reference camera looks straight down or up at the head; choose a frontal one")
    front /= np.linalg.norm(front)
    rotation = np.stack([np.cross(up, front), up, front])  # rows: orbit x, y, z in capture axes
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = -rotation @ centre
    return transform, radius / distance


def align_cam2world(cam2world: np.ndarray, transform: np.ndarray, scale: float) -> np.ndarray:
    """A capture's OpenCV cam2world moved by `orbit_alignment`'s (transform, scale)."""
    aligned = np.asarray(transform, dtype=np.float64) @ np.asarray(cam2world, dtype=np.float64)
    aligned[:3, 3] *= scale
    return aligned


def angle_between_cameras(first: np.ndarray, second: np.ndarray, lookat: Sequence[float] = (0.0, 0.0, 0.0)) -> float:
    """Degrees between two cameras' directions from `lookat` (how far apart they are on the orbit)."""
    a = np.asarray(first)[:3, 3] - np.asarray(lookat, dtype=np.float64)
    b = np.asarray(second)[:3, 3] - np.asarray(lookat, dtype=np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(min(max(cosine, -1.0), 1.0)))


def rotation_homography(
    source_cam2world: np.ndarray,
    source_pixel_intrinsics: np.ndarray,
    target_cam2world: np.ndarray,
    target_pixel_intrinsics: np.ndarray,
) -> np.ndarray:
    """3x3 map from a target image's pixels to a source image's pixels for the same viewing rays
    (exact when both cameras share a centre; otherwise it ignores the parallax between them).
    Pixel coordinates are OpenCV's `warpPerspective` ones: pixel (0, 0)'s centre is (0, 0), while
    dp360's intrinsics put it at (0.5, 0.5), hence the half-pixel shifts."""
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    source_rotation = np.asarray(source_cam2world, dtype=np.float64)[:3, :3]
    target_rotation = np.asarray(target_cam2world, dtype=np.float64)[:3, :3]
    homography = (
        np.linalg.inv(half)
        @ np.asarray(source_pixel_intrinsics, dtype=np.float64)
        @ source_rotation.T
        @ target_rotation
        @ np.linalg.inv(np.asarray(target_pixel_intrinsics, dtype=np.float64))
        @ half
    )
    return homography / homography[2, 2]


def plane_homography(
    source_cam2world: np.ndarray,
    source_pixel_intrinsics: np.ndarray,
    target_cam2world: np.ndarray,
    target_pixel_intrinsics: np.ndarray,
    point: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """3x3 map from a target image's pixels to a source image's pixels through the plane that
    passes through `point` (the head's centre) facing the target camera: exact for points on that
    plane, so two cameras that both look at the head from nearby positions are matched at the head
    (a pure rotation ignores the parallax between them). It is `rotation_homography` when both
    cameras share a centre. OpenCV pixel coordinates, as `rotation_homography`'s."""
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    source, target = np.asarray(source_cam2world, np.float64), np.asarray(target_cam2world, np.float64)
    normal = target[:3, 2]  # the target's optical axis
    offset = float(normal @ (np.asarray(point, np.float64) - target[:3, 3]))  # the plane's depth before the target
    if offset <= 1e-12:
        raise ValueError("the plane lies behind the target camera")
    # a target ray D meets the plane at C_t + (offset / n.D) D; seen from the source that is
    # proportional to (I + (C_t - C_s) n^T / offset) D
    through_plane = np.eye(3) + np.outer(target[:3, 3] - source[:3, 3], normal) / offset
    homography = (
        np.linalg.inv(half)
        @ np.asarray(source_pixel_intrinsics, dtype=np.float64)
        @ source[:3, :3].T
        @ through_plane
        @ target[:3, :3]
        @ np.linalg.inv(np.asarray(target_pixel_intrinsics, dtype=np.float64))
        @ half
    )
    return homography / homography[2, 2]
