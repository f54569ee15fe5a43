"""`dp360 eval` and the consistency score on the synthetic textured head, whose truth is known
exactly: the metrics, the alignment of a capture's cameras to the orbit, the front/back split,
the field rendered where no view is near, the comparison table, and the consistency stage."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp360 import cameras
from dp360.errors import Dp360Error
from dp360.eval import metrics
from dp360.eval.capture import read_capture, write_capture
from dp360.eval.truth import Candidate, EvalSettings, Models, evaluate
from dp360.manifest import new_manifest
from dp360.nerf import synthetic


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    from dp360.panohead.perceptual import VGG16_FILE, write_random_backbone

    return write_random_backbone(tmp_path_factory.mktemp("vgg") / VGG16_FILE)


@pytest.fixture(scope="module")
def models(vgg):
    return Models.load(EvalSettings(size=48, lpips_backbone=vgg))


@pytest.fixture
def lpips_in_cache(vgg):
    from dp360.panohead.perceptual import backbone_path

    backbone_path().parent.mkdir(parents=True, exist_ok=True)
    backbone_path().symlink_to(vgg)


def _altered(source: Path, target: Path, change) -> Path:
    """A copy of a capture with every image passed through `change`."""
    shutil.copytree(source, target)
    for path in target.glob("[0-9]*.png"):
        Image.fromarray(np.ascontiguousarray(change(np.asarray(Image.open(path))))).save(path)
    return target


def _subset(views: Path, target: Path, step: int) -> Path:
    """A capture of every `step`-th view (the same images and cameras)."""
    frames = read_capture(views).frames[::step]
    entries = [
        {
            "file_path": str(frame.image_path.resolve()),
            "cam2world": frame.cam2world,
            "intrinsics": frame.intrinsics,
            "width": frame.width,
            "height": frame.height,
        }
        for frame in frames
    ]
    write_capture(target, entries)
    return target


def _settings(vgg, **overrides):
    return EvalSettings(**{"size": 48, "lpips_backbone": vgg, "framing": "camera", **overrides})


# -- metrics ------------------------------------------------------------------------------------


def test_image_metrics_are_perfect_on_identical_images_and_lower_on_a_shifted_one(vgg, astronaut):
    image = np.asarray(Image.fromarray(astronaut).resize((64, 64)), np.float32) / 255
    shifted = np.roll(image, 2, axis=1)
    assert metrics.psnr(image, image) == metrics.PSNR_CAP
    assert metrics.psnr(image, shifted) < 25
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    assert metrics.ssim(image, shifted) < 0.9
    lpips = metrics.Lpips("cpu", vgg)
    assert lpips(image, image) == pytest.approx(0.0, abs=1e-6)
    assert lpips(image, shifted) > 0.01
    missing = metrics.Lpips("cpu", vgg.parent / "absent.pth")
    assert missing(image, image) is None and "dp360 weights download perceptual" in missing.reason


def test_identity_similarity_is_one_for_the_same_face_and_none_without_a_face(astronaut):
    model = metrics.IdentityModel()
    face = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
    assert metrics.identity_similarity(model, face, face)[0] == pytest.approx(1.0, abs=1e-6)
    head = synthetic.render(synthetic.head_mesh(subdivisions=4), cameras.orbit_pose(0), 96)
    value, reason = metrics.identity_similarity(model, face, head)
    assert value is None and "no face" in reason


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift_and_matches_the_matrix_square_root():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 40))  # fewer samples than dimensions, as for one subject
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(features, features + 0.5) == pytest.approx(40 * 0.25, rel=1e-6)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) * 2 + 1
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    small_a, small_b = a[:4], b[:3]  # rank-deficient covariances too
    cs_a, cs_b = np.cov(small_a, rowvar=False), np.cov(small_b, rowvar=False)
    expected = ((small_a.mean(0) - small_b.mean(0)) ** 2).sum() + np.trace(cs_a + cs_b - 2 * sqrtm(cs_a @ cs_b).real)
    assert metrics.frechet_distance(small_a, small_b) == pytest.approx(expected, rel=1e-5)


# -- cameras ------------------------------------------------------------------------------------


def _random_similarity(seed: int = 3):
    from scipy.spatial.transform import Rotation

    rotation = Rotation.random(random_state=seed).as_matrix()
    return rotation, np.array([0.4, -1.2, 3.0]), 0.37


def _moved(pose: np.ndarray, rotation, translation, scale) -> np.ndarray:
    moved = np.eye(4)
    moved[:3, :3] = rotation @ pose[:3, :3]
    moved[:3, 3] = scale * rotation @ pose[:3, 3] + translation
    return moved


def test_orbit_alignment_undoes_a_similarity_of_the_capture_world():
    orbit = cameras.dp360_orbit(8)
    rotation, translation, scale = _random_similarity()
    rig = [_moved(pose, rotation, translation, scale) for pose in orbit]
    assert np.allclose(cameras.axes_meeting_point(rig), translation)
    transform, found_scale = cameras.orbit_alignment(rig, reference=0)
    assert found_scale == pytest.approx(1 / scale)
    for pose, moved in zip(orbit, rig):
        assert np.allclose(cameras.align_cam2world(moved, transform, found_scale), pose, atol=1e-9)
    # another reference frame becomes the front: every camera turns by its yaw
    transform, found_scale = cameras.orbit_alignment(rig, reference=2)
    aligned = cameras.align_cam2world(rig[2], transform, found_scale)
    assert cameras.yaw_elevation_of(aligned) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert cameras.angle_between_cameras(orbit[0], orbit[2]) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="do not meet"):
        cameras.axes_meeting_point([orbit[0], orbit[0]])


def test_rotation_homography_maps_pixels_of_the_same_rays():
    centre = np.array([0.3, 0.1, 2.5])
    target = cameras.look_at_cam2world(centre, (0.0, 0.0, 0.0))
    source = cameras.look_at_cam2world(centre, (0.4, -0.2, 0.1))
    target_k, source_k = cameras.normalized_intrinsics(4.2647), cameras.normalized_intrinsics(2.5, 0.45)
    points = np.array([[0.05, 0.1, 0.0], [-0.1, 0.0, 0.2], [0.12, -0.08, -0.1]])
    in_target = cameras.project_points(points, target, target_k, 64, 64)
    in_source = cameras.project_points(points, source, source_k, 100, 80)
    homography = cameras.rotation_homography(
        source, cameras.pixel_intrinsics(source_k, 100, 80), target, cameras.pixel_intrinsics(target_k, 64, 64)
    )
    # OpenCV pixel coordinates (pixel centres at integers) on both sides
    mapped = np.column_stack([in_target - 0.5, np.ones(len(points))]) @ homography.T
    assert np.allclose(mapped[:, :2] / mapped[:, 2:], in_source - 0.5, atol=1e-9)


def test_plane_homography_matches_two_cameras_at_the_heads_centre_plane():
    target, source = cameras.orbit_pose(0.0), cameras.orbit_pose(8.0, 10.0)  # apart, both looking at the head
    target_k, source_k = cameras.normalized_intrinsics(), cameras.normalized_intrinsics(3.0)
    on_plane = np.array([[0.1, 0.05, 0.0], [-0.12, 0.1, 0.0], [0.0, -0.2, 0.0]])  # z = 0 faces the target
    in_target = cameras.project_points(on_plane, target, target_k, 64, 64)
    in_source = cameras.project_points(on_plane, source, source_k, 100, 80)
    homography = cameras.plane_homography(
        source, cameras.pixel_intrinsics(source_k, 100, 80), target, cameras.pixel_intrinsics(target_k, 64, 64)
    )
    mapped = np.column_stack([in_target - 0.5, np.ones(3)]) @ homography.T
    assert np.allclose(mapped[:, :2] / mapped[:, 2:], in_source - 0.5, atol=1e-9)
    turned = cameras.look_at_cam2world(target[:3, 3], (0.1, 0.2, 0.0))  # same centre: a pure rotation
    pixel = cameras.pixel_intrinsics(source_k, 100, 80), cameras.pixel_intrinsics(target_k, 64, 64)
    assert np.allclose(
        cameras.plane_homography(turned, pixel[0], target, pixel[1]),
        cameras.rotation_homography(turned, pixel[0], target, pixel[1]),
    )


# -- against a ground truth ---------------------------------------------------------------------


def test_truth_against_itself_is_perfect_and_split_by_yaw(fitted, models, vgg):
    views, _, _ = fitted
    result = evaluate(Candidate("self", read_capture(views)), read_capture(views), _settings(vgg), models)
    front, back = result["summary"]["front"], result["summary"]["back"]
    # views 0-8 and 24-31 have |yaw| <= 90 (the two side views at exactly 90 count as front)
    assert (front["frames"], back["frames"]) == (17, 15)
    assert {frame["name"] for frame in result["frames"] if frame["side"] == "front"} == {
        f"{k:03d}.png" for k in (*range(0, 9), *range(24, 32))
    }
    for side in (front, back):
        assert side["psnr"] == metrics.PSNR_CAP and side["ssim"] == pytest.approx(1.0)
        assert side["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert all(frame["source"] == f"view {frame['name']}" and frame["gap_deg"] < 1e-6 for frame in result["frames"])
    # no face to describe in 48 px views of the synthetic head: CSIM is missing, with the reason
    assert front["csim"] is None and front["csim_frames"] == 0 and "too small" in front["csim_note"]
    assert all("too small" in frame["csim_note"] for frame in result["frames"] if frame["side"] == "front")
    assert all(frame["csim"] is None and frame["csim_note"] is None for frame in result["frames"][9:24])  # back
    assert result["summary"]["front"]["fid"] is None and "Inception" in result["summary"]["front"]["fid_note"]


def test_a_capture_in_another_world_frame_is_aligned_to_the_orbit(fitted, models, vgg, tmp_path):
    views, _, _ = fitted
    rotation, translation, scale = _random_similarity()
    frames = [
        {
            "file_path": str((views / frame.name).resolve()),
            "cam2world": _moved(frame.cam2world, rotation, translation, scale),
            "intrinsics": frame.intrinsics,
            "width": frame.width,
            "height": frame.height,
        }
        for frame in read_capture(views).frames[::4]
    ]
    write_capture(tmp_path, frames)
    result = evaluate(Candidate("self", read_capture(views)), read_capture(tmp_path), _settings(vgg), models)
    assert [frame["yaw"] for frame in result["frames"]] == pytest.approx(
        [0, 45, 90, 135, 180, -135, -90, -45], abs=1e-6
    )
    assert all(frame["psnr"] > 60 for frame in result["frames"])


def test_shifted_and_mirrored_views_lower_every_score(fitted, models, vgg, tmp_path):
    views, _, _ = fitted
    truth = read_capture(_subset(views, tmp_path / "truth", 2))
    for name, change in (("shifted", lambda a: np.roll(a, 2, axis=1)), ("mirrored", lambda a: a[:, ::-1])):
        candidate = Candidate(name, read_capture(_altered(views, tmp_path / name, change)))
        summary = evaluate(candidate, truth, _settings(vgg), models)["summary"]
        for side in ("front", "back"):
            assert summary[side]["psnr"] < 25, (name, side)  # from 100 (the cap) for the same views
            assert summary[side]["ssim"] < 0.8, (name, side)
            assert summary[side]["lpips"] > 0.01, (name, side)


def test_truth_cameras_far_from_every_view_use_the_field_when_there_is_one(fitted, models, vgg, tmp_path):
    views, nerf, _ = fitted
    mesh = synthetic.head_mesh(subdivisions=4)
    capture = tmp_path / "between"
    capture.mkdir()
    frames = []
    for index, pose in enumerate([cameras.orbit_pose(0.0)] + synthetic.held_out_poses(32, count=4)):
        name = f"{index}.png"
        Image.fromarray((synthetic.render(mesh, pose, 40) * 255).round().astype(np.uint8)).save(capture / name)
        pixel = cameras.pixel_intrinsics(cameras.normalized_intrinsics(), 40, 40)
        frames.append({"file_path": name, "cam2world": pose, "intrinsics": pixel, "width": 40, "height": 40})
    write_capture(capture, frames)
    truth = read_capture(capture)
    run = tmp_path / "run"
    run.mkdir()
    (run / "views").symlink_to(views, target_is_directory=True)
    (run / "nerf").symlink_to(nerf, target_is_directory=True)
    (run / "run.json").write_text(json.dumps(new_manifest()))
    with_field = evaluate(Candidate.open(run), truth, _settings(vgg), models)
    assert [frame["source"] for frame in with_field["frames"]] == ["view 000.png"] + ["field"] * 4
    assert with_field["frames"][1]["gap_deg"] == pytest.approx(360 / 64, abs=0.01)
    assert with_field["summary"]["front"]["from_field"] == 2 and with_field["summary"]["back"]["from_field"] == 2
    assert not with_field["notes"]
    assert all(math.isfinite(frame["psnr"]) and frame["psnr"] > 12 for frame in with_field["frames"])
    without = evaluate(Candidate("views", read_capture(views)), truth, _settings(vgg), models)
    assert [frame["source"].endswith("(no field)") for frame in without["frames"]] == [False] + [True] * 4
    assert "no field" in without["notes"][-1]


def test_bad_settings_and_captures_are_refused_with_what_to_do(tmp_path, vgg):
    with pytest.raises(Dp360Error, match="--size"):
        EvalSettings(size=8).check()
    with pytest.raises(Dp360Error, match="--framing"):
        EvalSettings(framing="zoom").check()
    with pytest.raises(Dp360Error, match="transforms.json"):
        read_capture(tmp_path)
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "a.png"}]}))
    with pytest.raises(Dp360Error, match="transform_matrix"):
        read_capture(tmp_path)
    frame = {"file_path": "a.png", "transform_matrix": np.eye(4).tolist(), "fl_x": 10, "w": 8, "h": 8}
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": [frame]}))
    with pytest.raises(Dp360Error, match="a.png' is missing"):
        read_capture(tmp_path)
    with pytest.raises(Dp360Error, match="neither a dp360 run"):
        Candidate.open(tmp_path / "nothing")


# -- the consistency score ----------------------------------------------------------------------


def test_a_fitted_field_has_a_finite_consistency_score(fitted, vgg):
    from dp360.eval.consistency import consistency

    views, nerf, _ = fitted
    lpips = metrics.Lpips("cpu", vgg)
    result = consistency(views.parent, "cpu", lpips=lpips)
    summary = result["summary"]
    assert summary["views"] == 32 and summary["resolution"] == 8  # an eighth of 48 px, at least 8
    assert 12 < summary["psnr"] < metrics.PSNR_CAP
    assert [row["yaw"] for row in result["views"][:3]] == pytest.approx([0.0, 11.25, 22.5])
    # too small for LPIPS and for a face descriptor: neither, and the reasons say why
    assert summary["lpips"] is None and "too small for LPIPS" in result["unavailable"]["lpips"]
    assert summary["csim"] is None and "too small" in result["unavailable"]["csim"]
    larger = consistency(views.parent, "cpu", resolution=16, lpips=lpips)["summary"]
    assert larger["resolution"] == 16 and 12 < larger["psnr"] < metrics.PSNR_CAP and 0 < larger["lpips"] < 1


def test_the_consistency_stage_runs_after_export_and_needs_a_field(tmp_path):
    from dp360.eval.consistency import CONSISTENCY_STAGE
    from dp360.pipeline.registry import pipeline_stages
    from dp360.pipeline.stage import StageContext

    names = [stage.name for stage in pipeline_stages()]
    assert names[names.index("export") + 1 :] == ["consistency", "report"]
    context = StageContext(tmp_path, None, "cpu", "fp32", False, None)
    verdict = CONSISTENCY_STAGE.check(context)
    assert verdict.status == "not_available" and "fitted field" in verdict.reason
    assert CONSISTENCY_STAGE.needs == ("fit",) and CONSISTENCY_STAGE.shared_folder


def test_the_report_shows_the_consistency_score(tmp_path):
    from dp360.report import render_report

    record = {
        "status": "done",
        "summary": {"views": 32, "resolution": 64, "psnr": 23.5, "lpips": 0.123, "csim": None, "csim_views": 0},
    }
    record["summary"]["unavailable"] = {"csim": "no face <b>found</b>"}
    page = render_report(tmp_path, {"stages": {"consistency": record}})
    assert "View consistency" in page and "23.50" in page and "0.123" in page
    assert "no face &lt;b&gt;found&lt;/b&gt;" in page  # escaped
    page = render_report(tmp_path, {"stages": {}})
    assert "View consistency" in page and "not run" in page


# -- the command --------------------------------------------------------------------------------


def test_dp360_eval_writes_metrics_plot_and_comparison_table(cli, fitted, lpips_in_cache, tmp_path):
    views, nerf, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(views.parent, run, ignore=shutil.ignore_patterns("eval"))
    (run / "run.json").write_text(json.dumps(new_manifest()))
    table = tmp_path / "compare"
    truth = _subset(views, tmp_path / "truth", 4)
    args = ("--size", "48", "--device", "cpu", "--table", table)
    code, stdout, stderr = cli("eval", run, tmp_path / "shifted", "--truth", truth, *args)
    assert code == 2 and "neither a dp360 run" in stderr and not table.with_suffix(".md").exists()

    _altered(views, tmp_path / "shifted", lambda a: np.roll(a, 2, axis=1))
    code, stdout, stderr = cli("eval", run, tmp_path / "shifted", "--truth", truth, *args, "--json")
    assert code == 0, stderr
    results = json.loads(stdout)
    assert [result["candidate"] for result in results] == ["run", "shifted"]
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["truth"]["summary"]["front"]["psnr"] == metrics.PSNR_CAP
    assert saved["consistency"]["summary"]["psnr"] > 12  # the run has a field; the other capture none
    assert results[1]["consistency"] is None and not (tmp_path / "shifted" / "eval").exists()
    assert Image.open(run / "eval" / "metrics.png").size[0] > 600
    markdown = table.with_suffix(".md").read_text()
    rows = table.with_suffix(".csv").read_text().splitlines()
    assert markdown.startswith("<!-- dp360 eval comparison -->") and "| run | 100 |" in markdown
    assert rows[0].startswith("candidate,front_psnr") and rows[1].startswith("run,100.0,") and len(rows) == 3
    assert float(rows[2].split(",")[1]) < 25

    # the table replaces only its own files, and only when asked
    code, _, stderr = cli("eval", run, "--truth", truth, *args)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = cli("eval", run, *args, "--overwrite", "--quiet")
    assert code == 0, stderr
    assert "consistency scores only" in table.with_suffix(".md").read_text()
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my,own\n")
    code, _, stderr = cli("eval", run, "--device", "cpu", "--table", tmp_path / "notes.md", "--overwrite")
    assert code == 2 and "not a dp360 comparison table" in stderr and foreign.read_text() == "my,own\n"
    code, _, stderr = cli("eval", tmp_path / "shifted", "--device", "cpu")
    assert code == 2 and "--truth" in stderr


def test_fid_is_computed_with_inception_weights_through_the_loading_path(fitted, vgg, tmp_path):
    views, _, _ = fitted
    weights = metrics.write_random_inception(tmp_path / metrics.INCEPTION_FILE)
    settings = _settings(vgg, inception=weights)
    capture = _subset(views, tmp_path / "few", 8)  # views 0, 8 and 24 (front: |yaw| <= 90) and 16
    models = Models.load(settings)
    result = evaluate(Candidate("self", read_capture(views)), read_capture(capture), settings, models)
    front, back = result["summary"]["front"], result["summary"]["back"]
    assert (front["fid_samples"], back["fid_samples"]) == (3, 1)
    assert back["fid"] is None and "at least 2" in back["fid_note"]
    assert front["fid"] == pytest.approx(0.0, abs=1e-3)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(Dp360Error):
        metrics.InceptionFeatures("cpu", damaged, required=True)
    assert os.path.getsize(weights) > 1_000_000


def test_crop_framing_zooms_the_truth_as_the_prepare_crop_zoomed_the_reference(fitted, models, vgg, tmp_path):
    """A wide-angle truth camera (focal 2.0 at 96 px) at the orbit's cameras: a crop whose side in
    the reference image spans the views' field of view (96 * 2.0 / 4.2647 = 45 px) is zoom 1,
    the truth's own angles; a crop twice or half that size is the wrong zoom, and scores far lower."""
    views, _, _ = fitted
    mesh = synthetic.head_mesh(subdivisions=4)
    capture = tmp_path / "wide"
    capture.mkdir()
    intrinsics = cameras.normalized_intrinsics(2.0)
    frames = []
    for index in (0, 8, 16, 24):
        pose = cameras.dp360_orbit(32)[index]
        image = (synthetic.render(mesh, pose, 96, intrinsics) * 255).round().astype(np.uint8)
        Image.fromarray(image).save(capture / f"{index}.png")
        pixel = cameras.pixel_intrinsics(intrinsics, 96, 96)
        frames.append({"file_path": f"{index}.png", "cam2world": pose, "intrinsics": pixel, "width": 96, "height": 96})
    write_capture(capture, frames)
    run = tmp_path / "run"
    (run / "prepared").mkdir(parents=True)
    (run / "views").symlink_to(views, target_is_directory=True)
    (run / "run.json").write_text(json.dumps(new_manifest()))
    Image.new("RGB", (96, 96)).save(run / "input.png")  # the reference image was the run's input
    truth = read_capture(capture)
    scores = {}
    for side in (22.5, 45.0, 90.0):
        (run / "prepared" / "face.json").write_text(json.dumps({"crop_side_in_input_px": side}))
        result = evaluate(Candidate.open(run), truth, _settings(vgg, framing="auto"), models)
        assert result["framing"] == "crop" and result["zoom"] == pytest.approx(side / 45.0, rel=0.01)
        scores[side] = result["summary"]["front"]["psnr"]
    camera = evaluate(Candidate.open(run), truth, _settings(vgg), models)
    assert camera["framing"] == "camera" and camera["summary"]["front"]["psnr"] == pytest.approx(scores[45.0], abs=0.1)
    assert scores[45.0] > 16 and scores[22.5] < scores[45.0] - 6 and scores[90.0] < scores[45.0] - 6
    # a reference image of another size than the run's input was not the input: auto keeps the
    # truth cameras' angles (and says so); --framing crop still zooms
    Image.new("RGB", (200, 150)).save(run / "input.png")
    result = evaluate(Candidate.open(run), truth, _settings(vgg, framing="auto"), models)
    assert result["framing"] == "camera" and "not the size of the run's input" in result["notes"][-1]
    assert evaluate(Candidate.open(run), truth, _settings(vgg, framing="crop"), models)["framing"] == "crop"


def test_arcface_weights_given_by_the_user_replace_dlibs_network(astronaut, tmp_path):
    from dp360.eval.arcface import TEMPLATE, similarity, write_random_arcface

    weights = write_random_arcface(tmp_path / "backbone.pth")  # iresnet18, random, arcface_torch's layout
    model = Models.load(EvalSettings(arcface=weights, lpips_backbone=None)).identity
    assert model.name == "arcface-iresnet18"
    face = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
    assert metrics.identity_similarity(model, face, face)[0] == pytest.approx(1.0, abs=1e-6)
    assert metrics.identity_similarity(model, face, np.zeros((128, 128, 3), np.uint8))[1].endswith("no face found")
    # the alignment: a rotated, scaled and moved copy of the template maps back onto it exactly
    turn = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    points = (TEMPLATE - 5) @ turn.T * 2.5 + [100, 40]
    matrix = similarity(points, TEMPLATE)
    assert np.allclose(points @ matrix[:, :2].T + matrix[:, 2], TEMPLATE, atol=1e-9)
    (tmp_path / "other.pth").write_bytes(open(weights, "rb").read()[:1000])
    with pytest.raises(Dp360Error, match="--arcface|damaged"):
        Models.load(EvalSettings(arcface=tmp_path / "other.pth"))
    with pytest.raises(Dp360Error, match="--arcface"):
        EvalSettings(arcface=tmp_path / "absent.pth").check()
