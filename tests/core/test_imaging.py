import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp360.atomic import (
    atomic_directory,
    atomic_files_into,
    atomic_path,
    current_umask,
    remove_empty_folder_inside,
    remove_file_inside,
    remove_stale_temporaries,
    write_json_atomic,
)
from dp360.errors import InputImageError, RunDirectoryError
from dp360.imaging import MAX_PIXELS, MAX_SIDE, MIN_SIDE, downscaled_size, load_portrait, save_image_atomic

from ..images import cut_copy, png_with_size, truncated_copy

PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS


@pytest.fixture
def gradient():
    y, x = np.mgrid[0:200, 0:300]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------- bad inputs


def _error(path) -> str:
    with pytest.raises(InputImageError) as caught:
        load_portrait(path)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.png")


def test_folder_instead_of_file(tmp_path):
    assert "is a folder" in _error(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not pixels\n" * 20)
    assert "not an image file" in _error(tmp_path / "notes.png")


def test_zero_size_png(tmp_path):
    assert "cannot be decoded" in _error(png_with_size(tmp_path / "zero.png", 0, 0))


@pytest.mark.parametrize("suffix,format", [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated_file(tmp_path, astronaut, suffix, format):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(astronaut).save(whole, format=format)
    message = _error(truncated_copy(whole, tmp_path / f"cut{suffix}"))
    assert "corrupt or truncated" in message or "cannot be decoded" in message


def test_tiny_image(tmp_path):
    Image.new("RGB", (100, 300)).save(tmp_path / "tiny.png")
    assert "only 100x300 pixels" in _error(tmp_path / "tiny.png")


# ------------------------------------------------------------------------- normalisation


def _roundtrip(tmp_path, image: Image.Image, name: str, **save):
    path = tmp_path / name
    image.save(path, **save)
    return load_portrait(path)


def test_rgb_passes_unchanged(tmp_path, gradient):
    loaded = _roundtrip(tmp_path, Image.fromarray(gradient), "rgb.png")
    assert loaded.rgb.dtype == np.uint8 and np.array_equal(loaded.rgb, gradient)
    assert loaded.alpha is None and loaded.notes == [] and len(loaded.sha256) == 64


def test_grayscale_becomes_rgb(tmp_path, gradient):
    loaded = _roundtrip(tmp_path, Image.fromarray(gradient[:, :, 0]), "gray.png")
    assert loaded.rgb.shape == (200, 300, 3)
    assert np.array_equal(loaded.rgb[:, :, 0], gradient[:, :, 0]) and np.array_equal(
        loaded.rgb[:, :, 2], gradient[:, :, 0]
    )


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.linspace(0, 65535, 300)[None, :].repeat(200, 0)).astype(np.uint16)
    loaded = _roundtrip(tmp_path, Image.fromarray(values), "deep.png")
    row = loaded.rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[150] - 128) <= 1
    assert any("8-bit" in note for note in loaded.notes)


def test_rgba_composited_on_white_with_mask(tmp_path, gradient):
    rgba = np.dstack([gradient, np.zeros(gradient.shape[:2], np.uint8)])
    rgba[50:150, 100:200, 3] = 255
    loaded = _roundtrip(tmp_path, Image.fromarray(rgba, "RGBA"), "alpha.png")
    assert np.array_equal(loaded.rgb[0, 0], [255, 255, 255])
    assert np.array_equal(loaded.rgb[100, 150], gradient[100, 150])
    assert loaded.alpha is not None and loaded.alpha[0, 0] == 0 and loaded.alpha[100, 150] == 255


def test_palette_with_and_without_transparency(tmp_path, gradient):
    palette = Image.fromarray(gradient).convert("P", palette=Image.ADAPTIVE, colors=64)
    plain = _roundtrip(tmp_path, palette, "pal.png")
    assert plain.rgb.shape == (200, 300, 3) and plain.alpha is None
    assert np.abs(plain.rgb.astype(int) - gradient.astype(int)).mean() < 20
    corner_index = palette.getpixel((0, 0))
    transparent = _roundtrip(tmp_path, palette, "pal_t.png", transparency=corner_index)
    assert transparent.alpha is not None and transparent.alpha[0, 0] == 0
    assert np.array_equal(transparent.rgb[0, 0], [255, 255, 255])


def test_cmyk_jpeg(tmp_path, gradient):
    loaded = _roundtrip(tmp_path, Image.fromarray(gradient).convert("CMYK"), "cmyk.jpg", quality=95)
    assert loaded.rgb.shape == (200, 300, 3)
    assert np.abs(loaded.rgb.astype(int) - gradient.astype(int)).mean() < 12
    assert any("CMYK" in note for note in loaded.notes)


def test_exif_orientation_is_applied(tmp_path, gradient):
    image = Image.fromarray(gradient)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    loaded = _roundtrip(tmp_path, image, "rotated.jpg", exif=exif, quality=95)
    assert loaded.rgb.shape == (300, 200, 3)
    expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270))
    assert np.abs(loaded.rgb.astype(int) - expected.astype(int)).mean() < 8


def test_multi_frame_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (160, 160), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = load_portrait(path)
    assert loaded.rgb[80, 80, 0] > 200 and loaded.rgb[80, 80, 2] < 50
    assert any("3 frames" in note for note in loaded.notes)


def test_huge_image_is_downscaled_with_note(tmp_path):
    Image.new("RGB", (MAX_SIDE + 904, 2500), (10, 20, 30)).save(tmp_path / "huge.png")
    loaded = load_portrait(tmp_path / "huge.png")
    assert max(loaded.rgb.shape[:2]) == MAX_SIDE
    assert loaded.original_size == (MAX_SIDE + 904, 2500)
    assert any("downscaled" in note for note in loaded.notes)


@pytest.mark.parametrize("size", [(5000, 130), (130, 5000), (10_000, 300)])
def test_thin_image_keeps_the_minimum_side(tmp_path, size):
    # Bringing the longest side to MAX_SIDE would take the short side under MIN_SIDE (5000x130 ->
    # 4096x106, then upscaled by --no-crop): the downscale stops where the short side is MIN_SIDE.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "thin.png")
    loaded = load_portrait(tmp_path / "thin.png")
    width, height = loaded.size
    assert min(width, height) == MIN_SIDE and (width > height) == (size[0] > size[1])
    assert max(width, height) >= MAX_SIDE  # shrunk no further than the minimum allows
    assert abs(width / height - size[0] / size[1]) / (size[0] / size[1]) < 0.01  # the aspect ratio is kept
    assert any("downscaled" in note and f"{MIN_SIDE} px minimum" in note for note in loaded.notes)


@pytest.mark.parametrize(
    "size,expected",
    [((8000, 6000), (4096, 3072)), ((5000, 130), (4923, 128)), ((5000, 128), (5000, 128)), ((4000, 100), (4000, 100))],
)
def test_downscaled_size(size, expected):
    assert downscaled_size(*size) == expected
    assert min(downscaled_size(*size)) >= min(min(size), MIN_SIDE)


# ------------------------------------------------------------------------- atomic writes


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []


def test_atomic_writes_replace_whole_files(tmp_path, gradient):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").read_text().strip().endswith("}") and '"x": 2' in (tmp_path / "a.json").read_text()
    save_image_atomic(tmp_path / "g.png", gradient)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), gradient)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "g.png"]


def test_atomic_directory_swaps_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "stage"
    with atomic_directory(target) as staging:
        (staging / "one.txt").write_text("1")
    assert (target / "one.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "two.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["one.txt"]
    with atomic_directory(target) as staging:
        (staging / "three.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["three.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


# ------------------------------------------------------------------- limits before decoding


def test_header_bomb_is_refused_before_decoding(tmp_path):
    # 1.6 GB of RGBA once decoded, a few bytes on disk: refused from the header alone.
    bomb = png_with_size(tmp_path / "bomb.png", 20000, 20000)
    start = time.perf_counter()
    message = _error(bomb)
    assert time.perf_counter() - start < 5  # a bound against hangs on a busy machine, not a speed target
    assert "20000x20000" in message and "400 MP" in message and "90 MP" in message and "--max-pixels" in message
    assert Image.MAX_IMAGE_PIXELS == PILLOW_LIMIT  # Pillow's global is left as it was


def test_max_pixels_sets_the_limit(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "g.png")  # 300x200 = 0.06 MP
    with pytest.raises(InputImageError, match=r"0\.06 MP.*limit of 0\.05 MP"):
        load_portrait(tmp_path / "g.png", max_pixels=50_000)
    assert load_portrait(tmp_path / "g.png", max_pixels=60_000).size == (300, 200)
    assert MAX_PIXELS == 90_000_000


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP"])
def test_every_truncation_point_is_one_sentence(tmp_path, astronaut, format):
    whole = tmp_path / f"whole.{format.lower()}"
    Image.fromarray(astronaut).save(whole, format=format, **({"quality": 95} if format == "JPEG" else {}))
    size = whole.stat().st_size
    cuts = [c for c in (1, 3, 8, 16, 30, 100, 400, 2000, 5000, 30000) if c < size] + [size // 2, size - 200]
    for cut in cuts:
        message = _error(cut_copy(whole, tmp_path / f"cut{cut}.{format.lower()}", cut))
        assert any(words in message for words in ("corrupt or truncated", "cannot be decoded", "not an image")), cut


# ---------------------------------------------------------------------- modes follow the umask


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_follow_the_umask(tmp_path, gradient, umask, mask, file_mode, folder_mode):
    umask(mask)
    assert current_umask() == mask
    save_image_atomic(tmp_path / "g.png", gradient)
    write_json_atomic(tmp_path / "a.json", {})
    with atomic_directory(tmp_path / "stage") as staging:
        save_image_atomic(staging / "g.png", gradient)
    with atomic_files_into(tmp_path / "shared") as staging:
        (staging / "sub").mkdir()
        write_json_atomic(staging / "sub" / "b.json", {})
    for path in ("g.png", "a.json", "stage/g.png", "shared/sub/b.json"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == file_mode, path
    for path in ("stage", "shared", "shared/sub"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == folder_mode, path


# ------------------------------------------------------------------------ stale temporaries

_KILLED_WRITER = """
import contextlib, os, sys
from pathlib import Path
from dp360.atomic import atomic_directory, atomic_files_into, atomic_path

root = Path(sys.argv[1])
with contextlib.ExitStack() as stack:
    stack.enter_context(atomic_path(root / "run.json")).write_text("{")
    (stack.enter_context(atomic_directory(root / "views")) / "000.png").write_bytes(b"half")
    (stack.enter_context(atomic_files_into(root / "export")) / "head.glb").write_bytes(b"half")
    stack.enter_context(atomic_path(root / "export" / "turntable.mp4")).write_bytes(b"half")
    os._exit(1)  # killed: no cleanup runs
"""


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    root = tmp_path / "run"
    (root / "views").mkdir(parents=True)
    (root / "views" / "000.png").write_bytes(b"done")
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(root)], check=False, cwd=Path(__file__).parents[2])
    # Killed inside atomic_directory's swap: the old folder survives only inside the .old folder.
    (root / ".frames.k2_9xq0a.old" / "frames").mkdir(parents=True)
    (root / ".frames.k2_9xq0a.old" / "frames" / "0000.png").write_bytes(b"old frame")
    # The user's files, some with names close to ours.
    keep = [
        "holiday.txt",
        ".hidden",
        ".notes.tmp",
        ".a.short.tmp",
        ".a.ABCDEFGH.tmp",
        "a.abcdefgh.tmp",
        ".a.abcdefgh.tmpx",
        ".a.abcdefgh.old.bak",
        "export/notes.txt",
        "export/deep/.x.abcdefgh.tmp",  # two levels down: not looked at
    ]
    for name in keep:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("user")

    removed = remove_stale_temporaries(root)

    assert sorted(re.sub(r"\.[a-z0-9_]{8}\.", ".*.", path.relative_to(root).as_posix()) for path in removed) == [
        ".export.*.tmp",
        ".frames.*.old",
        ".run.*.tmp.json",
        ".views.*.tmp",
        "export/.turntable.*.tmp.mp4",
    ]
    after = sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))
    assert after == sorted([*keep, "export", "export/deep", "frames", "frames/0000.png", "views", "views/000.png"])
    assert all((root / name).read_text() == "user" for name in keep)
    assert (root / "views" / "000.png").read_bytes() == b"done"
    assert (root / "frames" / "0000.png").read_bytes() == b"old frame"  # put back
    assert remove_stale_temporaries(root) == [] and remove_stale_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------ links in shared folders


def _user_folder(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.txt").write_text("user")
    return user


def test_files_moved_into_a_shared_folder_never_go_through_a_planted_link(tmp_path):
    user = _user_folder(tmp_path)
    shared = tmp_path / "run" / "nerf"
    shared.mkdir(parents=True)
    (shared / "models").symlink_to(user, target_is_directory=True)
    with pytest.raises(RunDirectoryError, match=r"models' is a symbolic link"):
        with atomic_files_into(shared) as staging:
            (staging / "models").mkdir()
            (staging / "models" / "mine.txt").write_text("dp360")
            (staging / "models" / "step.ckpt").write_text("dp360")
    assert sorted(os.listdir(user)) == ["mine.txt"] and (user / "mine.txt").read_text() == "user"
    assert [name for name in os.listdir(shared.parent) if name != "nerf"] == []  # no staging left

    # the shared folder itself a link: refused as well
    os.unlink(shared / "models")
    os.rmdir(shared)
    shared.symlink_to(user, target_is_directory=True)
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        with atomic_files_into(shared) as staging:
            (staging / "mine.txt").write_text("dp360")
    assert sorted(os.listdir(user)) == ["mine.txt"] and (user / "mine.txt").read_text() == "user"


def test_files_moved_into_a_shared_folder_merge_subfolders_and_replace_their_own(tmp_path):
    shared = tmp_path / "export"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub" / "keep.txt").write_text("other stage")
    (shared / "was_a_file").write_text("old output")
    (shared / "was_a_folder").mkdir()
    (shared / "was_a_folder" / "x").write_text("old output")
    with atomic_files_into(shared) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
        (staging / "was_a_file").mkdir()
        (staging / "was_a_file" / "y").write_text("new")
        (staging / "was_a_folder").write_text("new")
    assert (shared / "sub" / "keep.txt").read_text() == "other stage"
    assert (shared / "sub" / "new.txt").read_text() == "new"
    assert (shared / "was_a_file" / "y").read_text() == "new"
    assert (shared / "was_a_folder").read_text() == "new"


def test_files_removed_inside_a_run_are_never_reached_through_a_link(tmp_path):
    user = _user_folder(tmp_path)
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "head.glb").write_bytes(b"ours")
    (run / "views").symlink_to(user, target_is_directory=True)
    (run / "export" / "link.txt").symlink_to(user / "mine.txt")

    with pytest.raises(RunDirectoryError, match=r"views' is a symbolic link"):
        remove_file_inside(run, "views/mine.txt")
    assert not remove_file_inside(run, "export/link.txt")  # a link in place of a file: left alone
    assert not remove_empty_folder_inside(run, "views")  # a link in place of a folder: left alone
    assert (user / "mine.txt").read_text() == "user" and (run / "export" / "link.txt").is_symlink()
    assert not remove_file_inside(run, "export/missing.png") and not remove_file_inside(run, "gone/x.png")

    assert remove_file_inside(run, "export/head.glb") and not (run / "export" / "head.glb").exists()
    assert not remove_empty_folder_inside(run, "export")  # still holds the link
    os.unlink(run / "export" / "link.txt")
    assert remove_empty_folder_inside(run, "export") and not (run / "export").exists()


def test_stale_temporaries_sweep_never_follows_a_link(tmp_path):
    user = _user_folder(tmp_path)
    (user / ".x.abcdefgh.tmp").write_text("user")  # named like ours, but in the user's folder
    run = tmp_path / "run"
    run.mkdir()
    (run / "views").symlink_to(user, target_is_directory=True)  # not descended into
    (run / ".nerf.abcdefgh.tmp").symlink_to(user, target_is_directory=True)  # the link goes, not the folder
    removed = remove_stale_temporaries(run)
    assert [path.name for path in removed] == [".nerf.abcdefgh.tmp"]
    assert sorted(os.listdir(user)) == [".x.abcdefgh.tmp", "mine.txt"]
    assert (run / "views").is_symlink()
