"""`dp360 app` (cli/web.py): the Gradio app over the same library run as `dp360 reconstruct`,
driven through its HTTP API (gradio_client) and looked at in headless Chromium."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from cli.options import defaults_of
from cli.web import APP_GROUPS, EXAMPLE, PortraitApp, build_page, run_folder_for

from ..browser import CHROMIUM, NO_CHROMIUM
from ..conftest import ASTRONAUT

VIEWS = 8
pytestmark = pytest.mark.timeout(600)


def _tiny_defaults(tiny, **changes):
    """reconstruct's options at the tiny settings (as `dp360 app --weights-dir ... --steps 2 ...` gives)."""
    from cli.options import Detector, FitPreset

    return defaults_of(
        *APP_GROUPS,
        weights_dir=tiny.weights_dir,
        cameras=tiny.cameras,
        detector=Detector.dlib,
        device="cpu",
        view_count=VIEWS,
        steps=2,
        invert_steps=2,
        pti_steps=1,
        fit_preset=FitPreset.test,
        fit_iterations=20,
        frames=4,
        resolution=32,
        mesh_resolution=32,
        mesh_faces=2000,
        texture_size=64,
        **changes,
    )


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return tiny_weights(VIEWS)


@pytest.fixture
def served(tiny, tmp_path):
    """The app on a free loopback port: (its URL, its runs folder)."""
    tiny.into_cache(Path(__import__("os").environ["DP360_CACHE"]))
    runs = tmp_path / "runs"
    page = build_page(PortraitApp(_tiny_defaults(tiny), runs))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False, show_error=True
    )
    try:
        yield f"http://127.0.0.1:{port}/", runs
    finally:
        page.close()


def test_a_portrait_through_the_api_gives_views_turntable_and_mesh(served):
    import trimesh
    from gradio_client import Client, handle_file

    from dp360.video import read_mp4

    url, runs = served
    client = Client(url, verbose=False)
    status, crop, overlay, inversion, back, views, turntable, model, score, downloads = client.predict(
        handle_file(str(ASTRONAUT)), VIEWS, 2, 3.0, 7, "nerfacto", "glb", False, "", "", "views", api_name="/run"
    )
    assert "done" in status
    run = run_folder_for(runs, ASTRONAUT)
    assert run.is_dir() and (run / "run.json").is_file()
    assert len(views) == VIEWS and all(Path(item["image"]).is_file() for item in views)
    assert Path(crop).is_file() and Path(overlay).is_file() and Path(back).is_file() and Path(inversion).is_file()
    assert all("yaw" in item["caption"] and "elev" in item["caption"] for item in views)  # each view's angles
    mesh = trimesh.load(Path(model), force="mesh")
    assert len(mesh.faces) > 100
    video = turntable if isinstance(turntable, str) else turntable["video"]  # gradio_client's two forms
    _, frames = read_mp4(Path(video))
    assert len(frames) == 4
    assert "PSNR" in score
    names = sorted(Path(item).name for item in downloads)
    assert "head.glb" in names and "turntable.mp4" in names and any(name.endswith(".zip") for name in names)
    assert "report-standalone.html" in names  # the report to send: every image inlined

    # the same portrait again reopens its run: every stage is reused
    status = client.predict(
        handle_file(str(ASTRONAUT)), VIEWS, 2, 3.0, 7, "nerfacto", "glb", False, "", "", "views", api_name="/run"
    )[0]
    assert "done" in status and "reused" in status

    # the run is offered among the earlier ones, and reopens with its results
    status, _, _, _, _, reopened_views, *_ = client.predict(run.name, api_name="/reopen")
    assert "reopened" in status and len(reopened_views) == VIEWS

    # an OBJ comes with its MTL and texture, as one zip
    import zipfile

    *_, downloads = client.predict(
        handle_file(str(ASTRONAUT)), VIEWS, 2, 3.0, 7, "nerfacto", "obj", False, "", "", "views", api_name="/run"
    )
    obj_zip = next(Path(item) for item in downloads if str(item).endswith("-obj.zip"))
    with zipfile.ZipFile(obj_zip) as archive:
        assert sorted(archive.namelist()) == ["head.mtl", "head.obj", "head.png"]
        assert b"map_Kd head.png" in archive.read("head.mtl")


def test_the_api_takes_the_portrait_alone_and_returns_the_turntable_the_glb_and_the_run(served):
    """/reconstruct: every input but the portrait defaults to the command line's (here the tiny
    settings); a second job submitted meanwhile waits in the queue (one run at a time)."""
    import time
    import zipfile

    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    url, runs = served
    client = Client(url, verbose=False)
    first = client.submit(handle_file(str(ASTRONAUT)), api_name="/reconstruct")
    deadline = time.monotonic() + 60
    while first.status().code != Status.PROCESSING and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the first run is well under way (a fresh tiny run takes about 20 s here)
    second = client.submit(handle_file(str(ASTRONAUT)), api_name="/reconstruct")
    time.sleep(2)
    waiting, running = second.status(), first.status()
    assert running.code == Status.PROCESSING and waiting.code == Status.IN_QUEUE, (running, waiting)
    for job in (first, second):
        turntable, glb, run_zip = job.result(timeout=300)
        assert Path(turntable).suffix == ".mp4" and Path(glb).suffix == ".glb"
        with zipfile.ZipFile(run_zip) as archive:
            names = archive.namelist()
        run = run_folder_for(runs, ASTRONAUT).name
        assert f"{run}/run.json" in names and f"{run}/export/head.glb" in names
        assert not any(name.endswith(".dp360.lock") for name in names)


def test_the_app_listens_on_loopback_only(served):
    url, _ = served
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    others = {
        info[4][0]
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        if not info[4][0].startswith("127.")
    }
    for address in others:  # this machine's other addresses: nothing listens there
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def test_bad_uploads_and_settings_are_one_sentence_and_write_nothing(tiny, tmp_path):
    from dp360.errors import Dp360Error

    runs = tmp_path / "runs"
    portrait_app = PortraitApp(_tiny_defaults(tiny), runs)
    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_bytes(b"this is not a picture")
    job, out = portrait_app.start(not_an_image, portrait_app.settings())
    job.thread.join(60)
    problem = PortraitApp.problem(job.error)
    assert "is not an image file dp360 can read" in problem and problem.count(".") >= 1 and "\n" not in problem
    assert not out.exists()
    with pytest.raises(Dp360Error, match="--steps"):
        portrait_app.start(ASTRONAUT, portrait_app.settings(steps=0))
    with pytest.raises(Dp360Error, match="Upload a portrait"):
        portrait_app.start("", portrait_app.settings())
    assert not runs.exists() or not any(runs.iterdir())


def test_earlier_runs_are_only_dp360s_and_reopen_by_name(tiny, tmp_path):
    from dp360.errors import Dp360Error
    from dp360.manifest import new_manifest

    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "run.json").write_text('{"stages": {}}')  # a look-alike: not offered
    (runs / "head-0123456789").mkdir()
    (runs / "head-0123456789" / "run.json").write_text(__import__("json").dumps(new_manifest()))
    portrait_app = PortraitApp(_tiny_defaults(tiny), runs)
    assert portrait_app.earlier_runs() == ["head-0123456789"]
    status, found = portrait_app.reopen("head-0123456789")
    assert "reopened" in status and found["views"] == [] and found["model"] is None
    for name in ("mine", "../elsewhere", ""):
        with pytest.raises(Dp360Error, match="no finished run named"):
            portrait_app.reopen(name)


def test_a_run_folder_is_named_by_the_portrait_and_its_content(tmp_path):
    copy = tmp_path / "astronaut.png"
    copy.write_bytes(ASTRONAUT.read_bytes())
    other = tmp_path / "other" / "astronaut.png"
    other.parent.mkdir()
    other.write_bytes(ASTRONAUT.read_bytes() + b"\0")
    assert run_folder_for(tmp_path, copy) == run_folder_for(tmp_path, ASTRONAUT)
    assert run_folder_for(tmp_path, other) != run_folder_for(tmp_path, copy)
    assert run_folder_for(tmp_path, copy).name.startswith("astronaut-")
    assert EXAMPLE.is_file()


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_a_person_runs_the_example_portrait_in_a_real_browser(served, tmp_path):
    """Playwright drives Debian's chromium (no browser download): the example portrait, Run, then
    the page shows the finished run, its views and the mesh. DP360_APP_SCREENSHOT=PATH keeps the
    screenshot (the README's, on tiny random weights)."""
    import os
    import shutil

    from playwright.sync_api import sync_playwright

    url, runs = served
    shot = tmp_path / "app.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(url)
            page.get_by_role("button", name="Use the example portrait").click()
            page.locator("img[src*='astronaut']").first.wait_for(timeout=60_000)  # the portrait is in
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("done", exact=True).wait_for(timeout=150_000)
            gallery = page.locator("img[alt]").evaluate_all("images => images.map(image => image.naturalWidth)")
            assert sum(width > 0 for width in gallery) >= VIEWS  # the views (and the crop, overlay, back view)
            assert run_folder_for(runs, EXAMPLE).is_dir()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("DP360_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DP360_APP_SCREENSHOT"])


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_page_shows_its_form_in_a_browser(served, tmp_path):
    url, _ = served
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        + [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    page = result.stdout
    for text in ("Use the example portrait", "Views around the head", "Run", "Cancel", "Turntable"):
        assert text in page, text


def test_the_command_refuses_a_bad_address_or_auth_before_serving(cli, tmp_path):
    code, _, stderr = cli("app", "--runs", tmp_path / "runs", "--port", "70000")
    assert code == 2 and "--port must be 1 to 65535" in stderr
    code, _, stderr = cli("app", "--runs", tmp_path / "runs", "--auth", "no-colon")
    assert code == 2 and "USER:PASSWORD" in stderr
    secret = tmp_path / "secret"
    secret.write_text("no colon here\n")
    code, _, stderr = cli("app", "--runs", tmp_path / "runs", "--auth", secret)
    assert code == 2 and "USER:PASSWORD" in stderr

    from cli.web import _auth

    secret.write_text("me:s3cret\n")
    assert _auth(str(secret)) == ("me", "s3cret") and _auth("you:pw") == ("you", "pw")
    assert not (tmp_path / "runs").exists()


def test_cancel_stops_the_run_as_ctrl_c_does(tiny, tmp_path):
    import json
    import time

    from cli.web import _interrupt

    tiny.into_cache(Path(__import__("os").environ["DP360_CACHE"]))
    portrait_app = PortraitApp(_tiny_defaults(tiny), tmp_path / "runs")
    job, out = portrait_app.start(ASTRONAUT, portrait_app.settings())
    deadline = time.monotonic() + 120
    while not (job.log.lines and job.log.current) and time.monotonic() < deadline:  # a stage done, the next running
        time.sleep(0.05)
    _interrupt(job.thread)
    job.thread.join(120)
    assert not job.thread.is_alive() and isinstance(job.error, KeyboardInterrupt)
    assert PortraitApp.problem(job.error).startswith("Cancelled: finished stages are kept")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["stages"]["prepare"]["status"] == "done"
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]  # temporaries went


def test_a_bad_upload_through_the_page_is_the_clis_sentence(served, tmp_path):
    from gradio_client import Client, handle_file

    url, runs = served
    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_bytes(b"this is not a picture")
    with pytest.raises(Exception) as raised:
        Client(url, verbose=False).predict(handle_file(str(not_an_image)), api_name="/reconstruct")
    assert "is not an image file dp360 can read" in str(raised.value)
    assert not runs.exists() or not [path for path in runs.rglob("*") if path.is_file()]
