"""The views' visual hull and the density primed to it (dp360.nerf.hull), and the view-independent
colour head: the pieces that start a fit from a surface where the head is."""

import json

import numpy as np
import pytest
import torch

from dp360 import cameras
from dp360.nerf import synthetic
from dp360.nerf.hull import VisualHull, prime_density, visual_hull

SIZE = 48


def _orbit(count, size):
    """(mesh, silhouettes, cam2worlds, intrinsics) of the synthetic head at `count` eye-level cameras
    (dp360's conventions); the silhouettes are the fit's (`foreground_alpha` of the rendered views)."""
    from dp360.nerf.common import foreground_alpha

    mesh = synthetic.head_mesh(subdivisions=4)
    poses = [cameras.orbit_pose(yaw, 0.0) for yaw in np.linspace(0, 360, count, endpoint=False)]
    images = [(synthetic.render(mesh, pose, size) * 255).round().astype(np.uint8) for pose in poses]
    silhouettes = np.stack([foreground_alpha(image) > 127 for image in images])
    return mesh, silhouettes, np.stack(poses), np.stack([cameras.normalized_intrinsics()] * count)


def test_visual_hull_holds_the_head_and_little_else():
    """Every point inside the head is in the hull of its silhouettes, and points 2 cm or more outside
    the head are not."""
    import trimesh

    mesh, silhouettes, cam2worlds, intrinsics = _orbit(12, SIZE)
    hull = visual_hull(silhouettes, cam2worlds, intrinsics, half_size=0.5, resolution=64)
    points = np.random.default_rng(0).uniform(-0.35, 0.35, size=(3000, 3))
    distance = trimesh.proximity.signed_distance(mesh, points)  # positive inside
    in_hull = hull.contains(torch.tensor(points, dtype=torch.float32)).numpy()
    assert in_hull[distance > 0].mean() > 0.98
    assert in_hull[distance < -0.02].mean() < 0.02
    assert 0.9 * mesh.volume < hull.volume_share < 1.4 * mesh.volume  # the box is 1 m^3
    # a camera given in OpenGL's axes (y up, looking along -z) sees the head behind it: nothing is left
    opengl = np.stack([cameras.opencv_to_opengl(pose) for pose in cam2worlds])
    assert visual_hull(silhouettes, opengl, intrinsics, half_size=0.5, resolution=64).volume_share == 0


def test_a_view_carves_past_an_edge_only_when_its_silhouette_stays_inside_it():
    """A silhouette cut by the bottom of the frame (a neck, shoulders) may go on below it; above the
    frame, where the silhouette stops short of the edge, it carves."""
    size = 32
    silhouette = np.zeros((1, size, size), dtype=bool)
    silhouette[0, size // 2 :, size // 4 : 3 * size // 4] = True  # lower middle, touching the bottom edge only
    at_front = cameras.look_at_cam2world((0.0, 0.0, 2.7))[None]  # at +z, looking at the origin, +y up
    hull = visual_hull(silhouette, at_front, cameras.normalized_intrinsics()[None], 0.5, resolution=64)
    points = torch.tensor([[0.0, -0.45, 0.0], [0.0, -0.1, 0.0], [0.0, 0.1, 0.0], [0.0, 0.45, 0.0], [0.45, -0.1, 0.0]])
    # below the frame (kept), lower half (kept), upper half (carved), above the frame (carved),
    # beside the silhouette within the frame (carved)
    assert hull.contains(points).tolist() == [True, True, False, False, False]


def test_priming_puts_density_inside_the_hull_only():
    """A fresh field primed to a ball: dense inside it, empty outside; unprimed it is neither."""
    from nerfstudio.fields.nerfacto_field import NerfactoField

    torch.manual_seed(0)
    aabb = torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    field = NerfactoField(aabb, num_images=1, num_levels=6, max_res=64, log2_hashmap_size=14, implementation="torch")
    centres = (torch.arange(32) + 0.5) / 32 - 0.5
    grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), dim=-1)
    ball = VisualHull(grid.norm(dim=-1) < 0.25, half_size=0.5)
    directions = torch.nn.functional.normalize(torch.randn(2000, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    inner, outer = directions * 0.15, directions * 0.4

    def medians():
        with torch.no_grad():
            return float(field.density_fn(inner).median()), float(field.density_fn(outer).median())

    before_inside, _ = medians()
    losses = prime_density(field, ball, steps=50, density=300.0, seed=0, points_per_step=4096)
    inside, outside = medians()
    assert before_inside < 30 and inside > 100 and outside < 5, (before_inside, inside, outside)
    assert losses[-1] < 0.2 * losses[0]


def test_a_fit_records_its_priming(fitted):
    """The session's fitted field was primed: its steps, and a hull about the head's volume."""
    _, nerf, _ = fitted
    record = json.loads((nerf / "fit.json").read_text())
    assert record["hull_priming"]["steps"] == 200 and 0.04 < record["hull_priming"]["hull_share"] < 0.09
    assert record["settings"]["view_dependent_colour"] is False


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """nerfstudio's trainer of a dp360-head fit on the synthetic head's views (32 px), set up and
    not yet stepped."""
    from dp360.nerf.common import FitSettings, nerfstudio_quietly
    from dp360.nerf.method import head_config

    folder = tmp_path_factory.mktemp("primed")
    views = synthetic.write_views(folder / "views", size=32, background=(0.0, 0.0, 0.0))
    config = head_config(FitSettings.preset("test", iterations=40), "cpu", views)
    config.output_dir, config.experiment_name, config.timestamp, config.vis = folder, "dp360", "fit", "tensorboard"
    torch.manual_seed(0)
    with nerfstudio_quietly():
        made = config.setup(local_rank=0, world_size=1)
        made.setup()
    return made


def _head_densities(model):
    """Median density of the field on points well inside the synthetic head and well outside it."""
    vertices = torch.tensor(synthetic.head_mesh(subdivisions=3).vertices, dtype=torch.float32)
    with torch.no_grad():
        return float(model.field.density_fn(vertices * 0.7).median()), float(
            model.field.density_fn(vertices * 1.3).median()
        )


def test_the_first_step_primes_the_field_to_the_views_hull(trainer):
    """Before its first step, a dp360-head fit fits its density to the views' hull (the pipeline's
    callback, as under `ns-train`): dense inside the head, empty around it."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    model = trainer.pipeline.model
    inside_before, _ = _head_densities(model)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(0, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    inside, outside = _head_densities(model)
    assert inside_before < 30 and inside > 100 and outside < 5, (inside_before, inside, outside)
    assert trainer.pipeline.hull_priming["steps"] == 40  # at most the fit's iterations
    assert 0.04 < trainer.pipeline.hull_priming["hull_share"] < 0.1


def test_views_without_a_plain_background_leave_the_field_unprimed(trainer):
    """Views whose border is not one plain colour are all foreground: their hull is the whole box,
    which says nothing, and the field is left as it is."""

    class BusyViews:  # four of the cameras, every pixel foreground (what `HeadDataset` gives a capture)
        cameras = trainer.pipeline.datamanager.train_dataset.cameras[:4]

        def __len__(self):
            return len(self.cameras)

        def get_numpy_image(self, index):
            return np.full((32, 32, 4), 255, np.uint8)

    model = trainer.pipeline.model
    before = [parameter.clone() for parameter in model.field.parameters()]
    record = model.prime_to_hull(BusyViews(), seed=0)
    assert record["steps"] == 0 and record["hull_share"] > 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, model.field.parameters()))


@pytest.mark.parametrize("dependent", [False, True])
def test_the_colour_head_sees_the_direction_only_when_asked(dependent):
    """With `view_dependent_colour` off, a point's colour is the same from every direction; on
    (nerfacto's), it changes with the direction."""
    from nerfstudio.cameras.rays import Frustums, RaySamples
    from nerfstudio.field_components.field_heads import FieldHeadNames

    from dp360.nerf.common import FitSettings
    from dp360.nerf.method import head_config

    config = head_config(FitSettings.preset("test", view_dependent_colour=dependent), "cpu")
    model = config.pipeline.model.setup(
        scene_box=_scene_box(), num_train_data=4, metadata={}, device="cpu", grad_scaler=None
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.field.mlp_head.parameters():
            parameter.normal_(0, 0.5)  # an untrained head may not yet mix in the direction
    position = torch.zeros(2, 1, 3)
    directions = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0]], [[0.0, 0.6, -0.8]]]), dim=-1)
    samples = RaySamples(
        frustums=Frustums(
            origins=position,
            directions=directions,
            starts=torch.zeros(2, 1, 1),
            ends=torch.full((2, 1, 1), 0.01),
            pixel_area=torch.ones(2, 1, 1),
        ),
        camera_indices=torch.zeros(2, 1, 1, dtype=torch.long),
    )
    with torch.no_grad():
        rgb = model.field(samples)[FieldHeadNames.RGB]
    assert (float((rgb[0] - rgb[1]).abs().max()) > 1e-3) == dependent


def _scene_box():
    from nerfstudio.data.scene_box import SceneBox

    return SceneBox(aabb=torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]))


def test_fit_records_made_before_the_setting_keep_a_view_dependent_head(tmp_path):
    """A fit.json without `view_dependent_colour` was fitted with nerfacto's head: it loads as one."""
    from dp360.nerf.checkpoint import read_fit_record

    record = {"settings": {"iterations": 10}, "background": [1.0, 1.0, 1.0], "views_dir": "views"}
    (tmp_path / "fit.json").write_text(json.dumps(record))
    assert read_fit_record(tmp_path / "fit.json")[1].view_dependent_colour is True
    record["settings"]["view_dependent_colour"] = "no"
    (tmp_path / "fit.json").write_text(json.dumps(record))
    from dp360.errors import Dp360Error

    with pytest.raises(Dp360Error, match="view_dependent_colour setting is not true or false"):
        read_fit_record(tmp_path / "fit.json")
