"""The run report (`export/report.html`): written by `reconstruct` as its last stage, rewritten by
`dp360 report`, self-contained (every image and video is a file of the run or a data URI), and
rendered by headless Chromium with every image loaded; a stage that did not run says why."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from dp360.report import MESH_STILL_SIZE, rasterize, report_inputs

from ..browser import CHROMIUM, NO_CHROMIUM
from ..browser import chromium as _chromium
from ..conftest import shared_session_folder, tiny_reconstruct_settings

REPO = Path(__file__).resolve().parents[2]
ASTRONAUT = REPO / "assets" / "astronaut.png"
VIEWS = 8
TINY_SETTINGS = tiny_reconstruct_settings(8, "--views", str(VIEWS))


@contextmanager
def _offline(cache: Path):
    """What conftest's `offline_cache` does for a test, for the runs built once per session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DP360_CACHE", str(cache))
        patch.setenv("DP360_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("DP360_FACEXLIB_DIR", raising=False)
        yield


def _invoke(*args) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def _make_complete_run(root: Path) -> Path:
    from dp360.diffusion.models.tiny import write_tiny_bundles
    from dp360.panohead.perceptual import VGG16_FILE, write_random_backbone
    from dp360.panohead.tiny import write_tiny_panohead

    cache = root / "cache"
    bundles = write_tiny_bundles(root / "bundles", view_count=VIEWS)
    weights = root / "weights"
    weights.mkdir()
    for kind in ("main", "back"):
        (weights / f"{kind}-fp32").symlink_to(bundles[kind], target_is_directory=True)
    (weights / "panohead").symlink_to(write_tiny_panohead(root / "panohead"), target_is_directory=True)
    (cache / "perceptual").mkdir(parents=True)
    write_random_backbone(cache / "perceptual" / VGG16_FILE)
    out = root / "head"
    with _offline(cache):
        code, stdout, stderr = _invoke(
            "reconstruct",
            ASTRONAUT,
            "--out",
            out,
            "--weights-dir",
            weights,
            "--cameras",
            bundles["cameras"],
            *TINY_SETTINGS,
        )
    assert code == 0, stderr
    assert json.loads(stdout)["stages"]["report"]["status"] == "done"
    return out


@pytest.fixture(scope="session")
def complete_run(tmp_path_factory) -> Path:
    """A tiny full run (8 views, an 8-iteration fit), made once per session."""
    from filelock import FileLock

    shared = shared_session_folder(tmp_path_factory)
    with FileLock(str(shared / "report-complete-run.lock")):
        root = shared / "report-complete-run"
        if not (root / "head" / "export" / "report.html").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _make_complete_run(root)
    return root / "head"


@pytest.fixture(scope="module")
def incomplete_run(tmp_path_factory) -> Path:
    """A run without weights: prepared, nothing else (as `reconstruct` does on a new machine offline)."""
    root = tmp_path_factory.mktemp("report-incomplete")
    out = root / "head"
    with _offline(root / "cache"):
        code, stdout, stderr = _invoke(
            "reconstruct",
            ASTRONAUT,
            "--out",
            out,
            "--weights-dir",
            root / "no-weights",
            "--cameras",
            root / "no-cameras",
            *TINY_SETTINGS,
        )
    assert code == 3, stderr  # incomplete: no turntable and no mesh
    assert json.loads(stdout)["stages"]["report"]["status"] == "done"
    return out


class _Links(HTMLParser):
    """Every URL the page loads or links to: (tag, attribute, value)."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "poster", "srcset", "data") and value is not None:
                self.links.append((tag, name, value))


def _links(page: Path) -> list[tuple[str, str, str]]:
    parser = _Links()
    parser.feed(page.read_text())
    return parser.links


def _assert_self_contained(run: Path) -> list[tuple[str, str, str]]:
    """Every src and href is a data URI or a relative path to an existing file of the run."""
    page = run / "export" / "report.html"
    links = _links(page)
    for tag, attribute, value in links:
        if value.startswith("data:"):
            assert tag == "img" and value.startswith("data:image/png;base64,"), (tag, value[:40])
            continue
        assert not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", value), f"<{tag} {attribute}> reaches out: {value}"
        target = (page.parent / unquote(value)).resolve()
        assert target.is_file(), f"<{tag} {attribute}={value!r}> does not resolve"
        assert target.is_relative_to(run.resolve()), value
    return links


def _record(run: Path, name: str) -> dict:
    return json.loads((run / "run.json").read_text())["stages"][name]


# -- the page's content ---------------------------------------------------------------------------


def test_complete_run_page_shows_every_result_from_files_of_the_run(complete_run):
    page = complete_run / "export" / "report.html"
    text = page.read_text()
    links = _assert_self_contained(complete_run)
    images = [value for tag, attribute, value in links if tag == "img" and attribute == "src"]
    files = {value for value in images if not value.startswith("data:")}
    expected = {"../input.png", "../prepared/overlay.png", "../prepared/crop.png", "../views/back_ref.png"}
    expected |= {"../noise/fit.png"}  # the PanoHead inversion: target | inversion
    assert expected | {f"../views/{index:03d}.png" for index in range(VIEWS)} == files
    assert ("video", "src", "turntable.mp4") in links
    # the mesh from four sides (vertex colours and grey geometry), rendered here, not blank
    stills = [value for value in images if value.startswith("data:")]
    assert len(stills) == 8
    for still in stills:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(still.split(",", 1)[1]))).convert("RGB"))
        assert pixels.shape == (MESH_STILL_SIZE, MESH_STILL_SIZE, 3) and pixels.std() > 5
    # the camera of each view: 8 views, 45 degrees apart
    assert "001 &middot; yaw +45.0° &middot; elev +0.0°" in text and "004 &middot; yaw +180.0°" in text
    # every stage with its time and settings, and no warning
    for name in ("prepare", "noise", "views", "fit", "render", "export"):
        assert f"<tr><td>{name}</td><td>done</td>" in text
        assert f"{_record(complete_run, name)['seconds']:.2f} s" in text
    assert "&quot;invert_steps&quot;: 2" in text and "&quot;frames&quot;: 4" in text
    assert "not run:" not in text and "<b>warning</b>" not in text
    # the run's notes from run.json (the astronaut's face is small for PanoHead's crop)
    assert "<b>note</b>: the face is small" in text
    assert "<span class='status done'>done</span>" in text
    assert "PanoHead inversion" in text and "projection loss" in text and "tuning (PTI) loss" in text
    report = _record(complete_run, "report")
    assert report["outputs"] == {"export/report.html": page.stat().st_size}
    assert report["seconds"] < 5  # about 0.5 s on two busy cores


def test_incomplete_run_page_says_why_each_stage_did_not_run(incomplete_run):
    text = (incomplete_run / "export" / "report.html").read_text()
    links = _assert_self_contained(incomplete_run)
    assert {value for tag, _, value in links if tag == "img"} == {
        "../input.png",
        "../prepared/overlay.png",
        "../prepared/crop.png",
    }
    assert not any(tag == "video" for tag, _, _ in links)
    for name in ("noise", "views", "fit", "render", "export"):
        record = _record(incomplete_run, name)
        assert record["status"] == "not_available"
        assert f"not run: {html.escape(record['reason'])}" in text, name
    assert "dp360 weights download main" in text  # the views stage's reason names the fix
    assert "<span class='status incomplete'>incomplete</span>" in text
    # sections without results say why instead of showing a broken image
    views_section = text.split("id='views'", 1)[1].split("<h2", 1)[0]
    assert "not run:" in views_section and "<img" not in views_section


def test_strings_from_run_json_are_escaped(incomplete_run, tmp_path):
    from dp360.report import render_report

    run = tmp_path / "run"
    shutil.copytree(incomplete_run, run)
    manifest = json.loads((run / "run.json").read_text())
    hostile = "<script>alert(1)</script> & \"quotes\" 'single'"
    manifest["input"]["notes"] = [hostile]
    manifest["stages"]["views"]["reason"] = hostile
    manifest["input"]["path"] = f"/x/{hostile}.png"
    page = render_report(run, manifest)
    assert "<script>alert" not in page and page.count("<script>") == 1  # only the page's own
    assert f"not run: {html.escape(hostile)}" in page


def test_report_key_follows_what_the_page_shows(incomplete_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(incomplete_run, run)
    before = report_inputs(run)
    manifest = json.loads((run / "run.json").read_text())
    manifest["updated_at"] = "later"
    manifest["status"] = "running"
    for record in manifest["stages"].values():
        record["last_run"] = "reused"
    manifest["stages"]["report"]["seconds"] = 99  # its own record
    (run / "run.json").write_text(json.dumps(manifest))
    assert report_inputs(run) == before
    manifest["stages"]["views"]["reason"] = "another reason"
    (run / "run.json").write_text(json.dumps(manifest))
    changed = report_inputs(run)
    assert {key for key in before if changed[key] != before[key]} == {"run.json"}
    Image.new("RGB", (8, 8)).save(run / "prepared" / "crop.png")
    assert report_inputs(run)["prepared/crop.png"] != before["prepared/crop.png"]


def test_rasterizer_draws_the_nearest_surface_with_the_right_silhouette():
    import trimesh

    from dp360 import cameras

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    colours = np.where(sphere.vertices[:, 2:3] > 0, [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])  # front red, back blue
    size = 64
    front, grey = rasterize(sphere.vertices, sphere.faces, colours, cameras.orbit_pose(0.0), size, (1, 1, 1))
    back, _ = rasterize(sphere.vertices, sphere.faces, colours, cameras.orbit_pose(180.0), size, (1, 1, 1))
    centre = size // 2
    assert front[centre, centre] == pytest.approx([1, 0, 0]) and back[centre, centre] == pytest.approx([0, 0, 1])
    # the projected disc: radius f * size * r / sqrt(d^2 - r^2) pixels
    expected = np.pi * (cameras.FOCAL_NORMALIZED * size * 0.3 / np.sqrt(2.7**2 - 0.3**2)) ** 2
    covered = (np.abs(front - 1).sum(-1) > 1e-6).sum()
    assert covered == pytest.approx(expected, rel=0.05)
    assert grey[centre, centre].mean() > grey[centre, centre + 18].mean()  # the headlight: brighter facing it


# -- the command ---------------------------------------------------------------------------------


def test_report_command_rewrites_the_page_and_refuses_other_folders(incomplete_run, tmp_path, cli):
    from dp360.manifest import RunLock

    run = tmp_path / "run"
    shutil.copytree(incomplete_run, run)
    page = run / "export" / "report.html"
    original = page.read_text()
    page.write_text("stale")
    code, stdout, stderr = cli("report", run)
    assert code == 0, stderr
    assert stdout.strip() == str(page) and page.read_text() == original
    shutil.rmtree(run / "export")
    assert cli("report", run)[0] == 0 and page.read_text() == original

    empty = tmp_path / "photos"
    empty.mkdir()
    code, _, stderr = cli("report", empty)
    text = " ".join(stderr.split())
    assert code == 2 and text.startswith("error: ") and text.count(". ") == 0 and "run.json" in text
    assert list(empty.iterdir()) == []  # no lock file, no page
    code, _, stderr = cli("report", tmp_path / "missing")
    assert code == 2 and "does not exist" in stderr

    lock = RunLock(run)
    lock.acquire()
    try:
        code, _, stderr = cli("report", run)
        assert code == 2 and "Another dp360 run" in " ".join(stderr.split())
    finally:
        lock.release()


def test_a_self_contained_report_inlines_every_image_and_the_video(complete_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(complete_run, run)
    code, stdout, stderr = cli("report", run, "--self-contained")
    assert code == 0, stderr
    standalone = run / "export" / "report-standalone.html"
    assert stdout.strip() == str(standalone)
    links = _links(standalone)
    images = [value for tag, attribute, value in links if tag == "img" and attribute == "src"]
    assert len(images) == 8 + VIEWS + 5 and all(value.startswith("data:image/png;base64,") for value in images)
    videos = [value for tag, _, value in links if tag == "video"]
    assert len(videos) == 1 and videos[0].startswith("data:video/mp4;base64,")
    video = base64.b64decode(videos[0].split(",", 1)[1])
    assert video == (run / "export" / "turntable.mp4").read_bytes()
    assert not [value for _, _, value in links if not value.startswith(("data:", "#"))]  # nothing beside it
    # sent elsewhere, it shows the same: the crop decodes from the page alone
    crop = next(
        value
        for value in images
        if base64.b64decode(value.split(",", 1)[1]) == (run / "prepared/crop.png").read_bytes()
    )
    assert Image.open(io.BytesIO(base64.b64decode(crop.split(",", 1)[1]))).size == (512, 512)
    assert (run / "export" / "report.html").read_text() == (complete_run / "export" / "report.html").read_text()


# -- in a browser --------------------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
@pytest.mark.parametrize("run_fixture", ["complete_run", "incomplete_run"])
def test_headless_chromium_renders_the_page_with_every_image_loaded(run_fixture, request, tmp_path):
    run = request.getfixturevalue(run_fixture)
    page = run / "export" / "report.html"
    images = sum(1 for tag, attribute, _ in _links(page) if tag == "img" and attribute == "src")

    # the page marks, once loaded, how many images did not load and the state of its video
    dom = _chromium(tmp_path / "profile", "--virtual-time-budget=15000", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attributes.get("data-broken-images") == "0", attributes
    assert attributes.get("data-images") == str(images)
    videos = re.findall(r"<video[^>]*data-state=\"(\w+)\"", dom.stdout)
    assert videos == (["loaded"] if run_fixture == "complete_run" else [])

    shot = tmp_path / "report.png"
    result = _chromium(tmp_path / "profile", "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (3000, 1200, 3)
    top = pixels[:1500]  # the header, the notes and the input photos
    assert top.std() > 20 and (np.abs(top - 255).sum(-1) > 60).mean() > 0.05
