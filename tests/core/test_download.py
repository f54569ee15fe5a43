"""Weights on first use, through the real download path against a local hub on 127.0.0.1.

The hub serves tiny files in the official layout (checkpoints written by the tiny models, a
PanoHead pickle, an inference-data zip with 32 camera images), the mirror serves a VGG16 state
dict and RetinaFace weights by name. huggingface_hub talks to it through HF_ENDPOINT exactly as
it talks to huggingface.co."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from dp360 import cache, weights
from dp360.download import DownloadError, partial_path
from dp360.pipeline.registry import need
from dp360.weights import MissingWeightsError, Need

from ..conftest import tiny_reconstruct_settings
from ..hub import LocalHub

MAIN, BACK = weights.WEIGHT_FILES["main"].file_name, weights.WEIGHT_FILES["back"].file_name
PANOHEAD, DATA = weights.WEIGHT_FILES["panohead"].file_name, weights.WEIGHT_FILES["data"].file_name
VGG, RETINAFACE = weights.WEIGHT_FILES["perceptual"].file_name, weights.WEIGHT_FILES["retinaface"].file_name


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(hub files, mirror files): tiny stand-ins in the official formats."""
    from dp360.diffusion.models.tiny import write_tiny_bundles
    from dp360.panohead.perceptual import write_random_backbone
    from dp360.panohead.persistence import write_network_pickle
    from dp360.panohead.tiny import tiny_generator

    folder = tmp_path_factory.mktemp("official")
    tiny = write_tiny_bundles(folder, view_count=32)
    generator = tiny_generator()
    pickle_path = write_network_pickle(folder / "panohead.pkl", generator, generator.config.init_kwargs())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("inference_data/README.txt", "camera images and example portraits")
        for index, image in enumerate(sorted(tiny["cameras"].glob("*.png"))):
            bundle.write(image, f"inference_data/sphere32/{index:07d}.png")
        bundle.write(next(tiny["cameras"].glob("*.png")), "inference_data/portraits/example.png")
    retinaface = io.BytesIO()
    torch.save({"body.conv1.weight": torch.zeros(2)}, retinaface)
    hub_files = {
        MAIN: (folder / "main.th").read_bytes(),
        BACK: (folder / "back.th").read_bytes(),
        PANOHEAD: pickle_path.read_bytes(),
        DATA: archive.getvalue(),
    }
    mirror_files = {
        VGG: write_random_backbone(folder / "vgg.pth").read_bytes(),
        RETINAFACE: retinaface.getvalue(),
    }
    return hub_files, mirror_files


@pytest.fixture
def hub(official, monkeypatch):
    """The local hub, with dp360 pointed at it and downloads turned on."""
    from huggingface_hub import constants

    hub_files, mirror_files = official
    with LocalHub() as server:
        server.hub_files.update(hub_files)
        server.plain_files.update(mirror_files)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("DP360_FILES_ENDPOINT", server.url + "/files")
        monkeypatch.setenv("HF_HOME", str(Path(os.environ["DP360_CACHE"]) / "hf-home"))
        monkeypatch.delenv("DP360_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # The mirror's VGG16 stand-in has its own hash; the check of the published prefix stays.
        prefix = hashlib.sha256(mirror_files[VGG]).hexdigest()[:8]
        perceptual = dataclasses.replace(weights.WEIGHT_FILES["perceptual"], sha256_prefix=prefix)
        monkeypatch.setitem(weights.WEIGHT_FILES, "perceptual", perceptual)
        yield server


def _gets(hub: LocalHub) -> list[str]:
    return [path for method, path, _ in hub.requests if method == "GET"]


RECONSTRUCT_SETTINGS = tiny_reconstruct_settings(20)


def test_reconstruct_from_an_empty_cache_fetches_everything_and_runs_every_stage(cli, hub, tmp_path, astronaut_path):
    out = tmp_path / "head"
    code, stdout, stderr = cli("reconstruct", astronaut_path, "--out", out, *RECONSTRUCT_SETTINGS)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == dict.fromkeys(
        ("prepare", "noise", "views", "fit", "render", "export", "consistency", "report"), "done"
    )
    # every file came once, whole, and was converted or extracted where the stages look
    assert sorted(hub.bytes_sent) == sorted([MAIN, BACK, PANOHEAD, DATA, VGG])
    for name, content in {**hub.hub_files, VGG: hub.plain_files[VGG]}.items():
        assert hub.bytes_sent[name] == len(content), name
    cache_root = Path(os.environ["DP360_CACHE"])
    for kind in ("main", "back"):
        manifest = json.loads((cache_root / "bundles" / f"{kind}-fp32" / "dp360_bundle.json").read_text())
        assert manifest["family"] == "tiny" and manifest["dtype"] == "float32"  # found by shape, fp32 on CPU
    assert len(list((cache_root / "sphere32").glob("*.png"))) == 32
    assert (cache_root / "perceptual" / VGG).read_bytes() == hub.plain_files[VGG]
    # the raw checkpoints were removed after their verified conversion; nothing partial is left
    assert [path.name for path in (cache_root / "downloads").iterdir() if not path.name.endswith(".lock")] == []
    assert (out / "export" / "turntable.mp4").is_file() and (out / "export" / "head.glb").is_file()

    requests = len(hub.requests)
    code, stdout, stderr = cli("reconstruct", astronaut_path, "--out", out, *RECONSTRUCT_SETTINGS)
    assert code == 0, stderr
    assert len(hub.requests) == requests  # the second run asks the hub nothing
    assert all(stage["last_run"] == "reused" for stage in json.loads(stdout)["stages"].values())


def test_an_interrupted_download_resumes_where_it_stopped(hub, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what arrives in blocks of this size (10 MB on real downloads)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    content = hub.hub_files[PANOHEAD]
    hub.cut_after[PANOHEAD] = len(content) // 2
    target = cache.cache_dir() / "bundles" / "panohead"
    with pytest.raises(DownloadError, match="next run resumes"):
        weights.ensure([need("panohead", target)], progress=False)
    partial = partial_path(cache.downloads_dir() / PANOHEAD)
    kept = partial.stat().st_size
    assert len(content) // 2 - 16 * 1024 <= kept <= len(content) // 2 and not target.exists()

    hub.refusing.clear()  # the server is back
    sent_before = hub.bytes_sent[PANOHEAD]
    assert weights.ensure([need("panohead", target)], progress=False) == ["panohead"]
    assert hub.downloads(PANOHEAD)[-1] == f"bytes={kept}-"  # only the rest was asked for
    assert hub.bytes_sent[PANOHEAD] - sent_before == len(content) - kept
    assert need("panohead", target).present() and not partial.exists()
    assert not (cache.downloads_dir() / PANOHEAD).exists()


def test_a_partial_file_of_another_version_is_not_resumed(hub):
    destination = cache.downloads_dir() / DATA
    destination.parent.mkdir(parents=True)
    partial_path(destination).write_bytes(b"x" * 100)  # no record of what it is a prefix of
    weights.ensure([need("data", cache.cache_dir() / "sphere32")], progress=False)
    assert hub.downloads(DATA) == [None]
    assert len(list((cache.cache_dir() / "sphere32").glob("*.png"))) == 32


@pytest.mark.parametrize("name", [PANOHEAD, VGG])
def test_a_file_whose_hash_does_not_match_is_refused_and_deleted(hub, name):
    hub.damaged.add(name)
    wanted = (
        need("panohead", cache.cache_dir() / "bundles" / "panohead")
        if name == PANOHEAD
        else need("perceptual", cache.cache_dir() / "perceptual" / VGG)
    )
    with pytest.raises(DownloadError, match="not the published file"):
        weights.ensure([wanted], progress=False)
    assert not wanted.present()
    leftovers = [path.name for path in cache.cache_dir().rglob("*") if path.is_file() and path.suffix != ".lock"]
    assert leftovers == []


def test_retinaface_comes_from_the_files_mirror(hub):
    target = cache.facexlib_dir() / RETINAFACE
    assert weights.ensure([need("retinaface", target)], progress=False) == ["retinaface"]
    assert target.read_bytes() == hub.plain_files[RETINAFACE]


def test_fp16_bundles_are_made_for_half_precision_and_checkpoints_kept_on_request(hub):
    target = cache.bundle_path("main", fp16=True)
    weights.ensure([need("main", target, fp16=True)], keep_checkpoints=True, progress=False)
    assert json.loads((target / "dp360_bundle.json").read_text())["dtype"] == "float16"
    kept = cache.downloads_dir() / MAIN
    assert kept.read_bytes() == hub.hub_files[MAIN]
    assert weights.cached_official("main") == kept  # what `weights convert main` reads


def test_the_disk_is_checked_before_any_download(hub, monkeypatch):
    monkeypatch.setattr(weights, "_disk_free", lambda path: (path, 1000))
    needs = [need("main", cache.bundle_path("main")), need("data", cache.cache_dir() / "sphere32")]
    with pytest.raises(MissingWeightsError, match=r"need 0\.\d GB of free disk") as error:
        weights.ensure(needs, progress=False)
    assert "dp360 weights download main" in str(error.value)
    assert _gets(hub) == []


def test_a_server_that_is_down_is_named_with_everything_missing(cli, hub, monkeypatch, tmp_path, astronaut_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("DP360_FILES_ENDPOINT", "http://127.0.0.1:9/files")
    out = tmp_path / "head"
    code, _, stderr = cli("reconstruct", astronaut_path, "--out", out, *RECONSTRUCT_SETTINGS)
    assert code == 2
    assert "Cannot reach" in stderr and "127.0.0.1:9" in stderr
    for name in ("main", "back", "panohead", "data", "perceptual"):
        assert f"`dp360 weights download {name}`" in stderr
    assert not out.exists()  # stopped before any stage, nothing written


@pytest.mark.parametrize("how", ["DP360_OFFLINE", "HF_HUB_OFFLINE", "--no-download"])
def test_without_downloads_every_missing_file_is_listed_before_any_stage(
    cli, hub, monkeypatch, tmp_path, astronaut_path, how
):
    extra = ("--no-download",) if how == "--no-download" else ()
    if not extra:
        monkeypatch.setenv(how, "1")
    out = tmp_path / "head"
    code, _, stderr = cli("reconstruct", astronaut_path, "--out", out, *RECONSTRUCT_SETTINGS, *extra)
    assert code == 2
    for name, file_name in (("main", MAIN), ("back", BACK), ("panohead", PANOHEAD), ("data", DATA)):
        assert file_name in stderr and f"`dp360 weights download {name}`" in stderr
    assert "about 10.8 GB" in stderr  # the sizes are published ones: the hub was not asked
    assert hub.requests == [] and not out.exists()
    # --no-3d-noise needs neither PanoHead nor the perceptual backbone
    code, _, stderr = cli("reconstruct", astronaut_path, "--out", out, *RECONSTRUCT_SETTINGS, *extra, "--no-3d-noise")
    assert code == 2 and PANOHEAD not in stderr and VGG not in stderr and MAIN in stderr


def test_weights_files_given_by_the_user_are_never_fetched(hub, tmp_path):
    from dp360.diffusion.stage import ViewModels
    from dp360.panohead.stage import NoiseModels

    assert ViewModels.locate(32, "fp16").main_bundle == cache.bundle_path("main", fp16=True)
    assert ViewModels.locate(32, "fp32").main_bundle == cache.bundle_path("main")
    # --weights-dir: every model comes from there, none from (or into) the cache
    assert NoiseModels.locate(tmp_path).generator_need() is None
    assert NoiseModels.locate().generator_need() == Need("panohead", cache.cache_dir() / "bundles" / "panohead")


def test_downloads_show_a_progress_bar_with_the_file_name_and_size(hub, capsys):
    from dp360.download import fetch, probe

    url = weights.WEIGHT_FILES["retinaface"].url()
    fetch(probe(url, RETINAFACE, hub=False), cache.facexlib_dir() / RETINAFACE, progress=True)
    shown = capsys.readouterr().err
    size_kb = len(hub.plain_files[RETINAFACE]) / 1000
    assert RETINAFACE in shown and f"{size_kb:.1f}/{size_kb:.1f} kB" in shown  # complete, of the server's size
    fetch(probe(url, RETINAFACE, hub=False), cache.facexlib_dir() / "quiet.pth", progress=False)
    assert capsys.readouterr().err == ""
