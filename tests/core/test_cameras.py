import json
import math

import numpy as np
import pytest

from dp360 import cameras

FRONT = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]], dtype=float)


def test_frontal_camera_is_panohead_frontal():
    assert np.allclose(cameras.look_at_pose(math.pi / 2, math.pi / 2), FRONT)
    assert np.allclose(cameras.orbit_pose(0.0, 0.0), FRONT)
    assert np.allclose(cameras.dp360_orbit()[0], FRONT)


def test_back_camera_and_quarter_views():
    orbit = cameras.dp360_orbit(32)
    back = orbit[16]
    assert np.allclose(back[:3, 3], [0, 0, -2.7])
    assert np.allclose(back[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    # Increasing h moves the camera towards +x: view 8 sits on +x, view 24 on -x.
    assert np.allclose(orbit[8][:3, 3], [2.7, 0, 0], atol=1e-9)
    assert np.allclose(orbit[24][:3, 3], [-2.7, 0, 0], atol=1e-9)


def test_orbit_is_evenly_spaced_on_radius_and_looks_at_origin():
    orbit = cameras.dp360_orbit(32)
    yaws = []
    for cam2world in orbit:
        position = cam2world[:3, 3]
        assert np.linalg.norm(position) == pytest.approx(2.7)
        assert np.allclose(cam2world[:3, 2], -position / 2.7)  # optical axis through the origin
        assert np.allclose(cam2world[:3, :3] @ cam2world[:3, :3].T, np.eye(3))
        assert np.linalg.det(cam2world[:3, :3]) == pytest.approx(1.0)
        assert np.allclose(
            cameras.project_points([0, 0, 0], cam2world, cameras.normalized_intrinsics(), 512, 512), [256, 256]
        )
        yaws.append(cameras.yaw_elevation_of(cam2world)[0])
    steps = np.diff(np.unwrap(np.radians(yaws)))
    assert np.allclose(np.degrees(steps), 360 / 32)


def test_projection_of_known_point():
    intrinsics = cameras.normalized_intrinsics()
    # 0.1 to the world's +x is to the image right of the centre by f * 0.1 / 2.7 pixels.
    expected_u = 256 + 4.2647 * 512 * 0.1 / 2.7
    assert np.allclose(cameras.project_points([0.1, 0, 0], FRONT, intrinsics, 512, 512), [[expected_u, 256]])
    # World +y is up, so it lands above the centre (smaller row).
    assert cameras.project_points([0, 0.1, 0], FRONT, intrinsics, 512, 512)[0, 1] == pytest.approx(
        256 - 4.2647 * 512 * 0.1 / 2.7
    )
    # From the back, world +x appears on the image left.
    back = cameras.dp360_orbit(32)[16]
    assert cameras.project_points([0.1, 0, 0], back, intrinsics, 512, 512)[0, 0] < 256
    with pytest.raises(ValueError):
        cameras.project_points([0, 0, 5.0], FRONT, intrinsics, 512, 512)


@pytest.mark.parametrize("yaw,elevation", [(0, 0), (30, 10), (-75, -20), (150, 35), (-179, 5)])
def test_orbit_angles_round_trip(yaw, elevation):
    cam2world = cameras.orbit_pose(yaw, elevation)
    assert cameras.yaw_elevation_of(cam2world) == pytest.approx((yaw, elevation), abs=1e-9)
    assert cam2world[1, 3] == pytest.approx(2.7 * math.sin(math.radians(elevation)))
    # The same camera through PanoHead's native parameters.
    h, v = cameras.panohead_angles(yaw, elevation)
    assert np.allclose(cameras.look_at_pose(h, v), cam2world)


def test_rotation_only_camera_matches_look_at_camera():
    cam2world = cameras.orbit_pose(40, -12)
    world2cam_rotation = cam2world[:3, :3].T
    assert np.allclose(cameras.rotation_only_cam2world(world2cam_rotation), cam2world)


def test_panohead_label_round_trip_and_dataset_json():
    cam2world = cameras.orbit_pose(20, 5)
    label = cameras.panohead_label(cam2world)
    assert len(label) == 25 and label[16] == pytest.approx(4.2647) and label[18] == 0.5 and label[-1] == 1.0
    back, intrinsics = cameras.parse_panohead_label(label)
    assert np.allclose(back, cam2world) and np.allclose(intrinsics, cameras.normalized_intrinsics())
    dataset = json.loads(json.dumps(cameras.panohead_dataset_json([("a.png", label)])))
    name, strings = dataset["labels"][0]
    assert name == "a.png" and all(isinstance(s, str) and len(s.split(".")[1]) == 6 for s in strings)
    assert np.allclose(cameras.parse_panohead_label(strings)[0], cam2world, atol=1e-6)
    with pytest.raises(ValueError):
        cameras.parse_panohead_label(label[:24])
    with pytest.raises(ValueError):
        cameras.parse_panohead_label(label[:24] + [float("nan")])


def test_nerfstudio_transforms_round_trip():
    views = [
        cameras.ViewCamera(f"{k:03d}.png", cam2world, cameras.normalized_intrinsics())
        for k, cam2world in enumerate(cameras.dp360_orbit(32))
    ]
    transforms = cameras.to_nerfstudio_transforms(views, 512, 512)
    assert transforms["fl_x"] == pytest.approx(4.2647 * 512) and transforms["cx"] == 256 and transforms["w"] == 512
    # OpenGL axes: the frontal camera looks down -z with +y up, i.e. identity rotation.
    assert np.allclose(np.asarray(transforms["frames"][0]["transform_matrix"])[:3, :3], np.eye(3))
    restored = cameras.from_nerfstudio_transforms(json.loads(json.dumps(transforms)))
    for original, back in zip(views, restored):
        assert back.file_path == original.file_path
        assert np.allclose(back.cam2world, original.cam2world)
        assert np.allclose(back.intrinsics, original.intrinsics)


def test_nerfstudio_reads_our_transforms(tmp_path):
    """nerfstudio's own parser sees the cameras we wrote (OpenGL c2w and pixel intrinsics)."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from PIL import Image

    orbit = cameras.dp360_orbit(8)
    views = []
    for k, cam2world in enumerate(orbit):
        Image.new("RGB", (64, 64), (k * 20, 0, 0)).save(tmp_path / f"{k:03d}.png")
        views.append(cameras.ViewCamera(f"{k:03d}.png", cam2world, cameras.normalized_intrinsics()))
    (tmp_path / "transforms.json").write_text(json.dumps(cameras.to_nerfstudio_transforms(views, 64, 64)))
    config = NerfstudioDataParserConfig(
        data=tmp_path,
        orientation_method="none",
        center_method="none",
        auto_scale_poses=False,
        scale_factor=1.0,
        eval_mode="all",
    )
    outputs = config.setup().get_dataparser_outputs(split="train")
    parsed = outputs.cameras.camera_to_worlds.numpy()
    assert parsed.shape[0] == 8
    for k, cam2world in enumerate(orbit):
        assert np.allclose(parsed[k], cameras.opencv_to_opengl(cam2world)[:3], atol=1e-5)
    assert float(outputs.cameras.fx[0]) == pytest.approx(4.2647 * 64, rel=1e-5)
