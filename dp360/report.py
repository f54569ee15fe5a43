"""The run report: `export/report.html`, one page that shows what a run made and what it did not.

The page shows the input with the prepare stage's overlay, the crop with its camera, the back
view, every view with its camera (and a top-down map of the orbit), the turntable video, the mesh
as still renders from four sides, the stages' timings and settings from `run.json`, and the notes
and warnings; a stage that did not run shows as "not run: <reason>". It needs no network: the
run's own images and video are linked relatively (`../views/000.png`, `turntable.mp4`), and only
the mesh stills, made here from `export/head.glb` by a small NumPy rasterizer, are inlined as PNG
data URIs. Every string from `run.json` is HTML-escaped.

`reconstruct` writes it as its last stage (`REPORT_STAGE`, which runs whatever ran before it);
`dp360 report RUN_DIR` (`write_report`) rewrites it. The page marks, once loaded, how many of its
images failed to load (`data-broken-images` on <body>) and the state of each video
(`data-state`), so a headless browser can check it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from . import cameras, layout
from .atomic import file_sha256, write_bytes_atomic
from .errors import RunDirectoryError
from .pipeline.stage import Stage, StageContext

REPORT_FOLDER, REPORT_NAME = layout.EXPORT, layout.name_of(layout.REPORT)
STANDALONE_NAME = "report-standalone.html"  # `dp360 report --self-contained`: everything inlined
_MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".mp4": "video/mp4",
    ".gif": "image/gif",
}
# The mesh stills: four sides, a little above eye level, a square of this many pixels each.
MESH_SIDES = (("front", 0.0), ("left", 90.0), ("back", 180.0), ("right", -90.0))
MESH_ELEVATION = 10.0
MESH_STILL_SIZE = 224
MESH_BACKGROUND = (0.94, 0.94, 0.95)
# Record fields that change when nothing shown changes (a reused stage's `last_run`).
_UNSHOWN_RECORD_FIELDS = ("last_run",)


# -- reading the run ------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest, or one sentence saying the folder is not a run."""
    from .manifest import read_manifest

    run_dir = Path(run_dir)
    path = run_dir / layout.MANIFEST
    if not path.is_file():
        raise RunDirectoryError(
            f"'{run_dir}' holds no {layout.MANIFEST}, so it is not a dp360 run; pass a folder written by `dp360 reconstruct`."
        )
    return read_manifest(path)


def _shown_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of run.json the page's key follows (not its own record, not `updated_at`, not
    whether a stage was reused this time, not the notes: a rerun that reuses stages says fewer)."""
    shown = {key: manifest.get(key) for key in ("dp360_version", "created_at", "input", "environment", "seed")}
    shown["stages"] = {
        name: {key: value for key, value in record.items() if key not in _UNSHOWN_RECORD_FIELDS}
        for name, record in manifest.get("stages", {}).items()
        if name != "report"
    }
    return shown


def _view_files(run_dir: Path) -> list[str]:
    views = run_dir / layout.VIEWS
    return (
        [f"{layout.VIEWS}/{path.name}" for path in sorted(views.glob("[0-9][0-9][0-9].png"))] if views.is_dir() else []
    )


def report_inputs(run_dir: str | Path) -> dict[str, str]:
    """The hashes the report stage's key is made of: run.json's shown parts and every file the
    page shows, so that the page is redone when any of them changes."""
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / layout.MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    shown = json.dumps(_shown_manifest(manifest if isinstance(manifest, dict) else {}), sort_keys=True, default=str)
    hashes = {layout.MANIFEST: hashlib.sha256(shown.encode()).hexdigest()}
    files = [
        layout.INPUT,
        layout.OVERLAY,
        layout.CROP,
        layout.FACE,
        layout.NOISE_FIT,
        layout.BACK_VIEW,
        layout.TRANSFORMS,
        layout.GRID,
        layout.ORBIT,
    ]
    files += [*_view_files(run_dir), layout.TURNTABLE, layout.MESH, layout.SPLATS]
    for rel in files:
        path = run_dir / rel
        hashes[rel] = file_sha256(path) if path.is_file() else "missing"
    return hashes


def view_cameras(transforms_path: str | Path) -> list[tuple[str, float, float]]:
    """(file name, yaw, elevation) in degrees of every view of a nerfstudio transforms.json
    (yaw 0 frontal, > 0 towards the subject's left; elevation > 0 above eye level)."""
    transforms = json.loads(Path(transforms_path).read_text())
    result = []
    for view in cameras.from_nerfstudio_transforms(transforms):
        yaw, elevation = cameras.yaw_elevation_of(view.cam2world)
        result.append((str(view.file_path), yaw, elevation))
    return result


# -- mesh stills ----------------------------------------------------------------------------------


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # area-weighted
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / (np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12)


def rasterize(
    vertices: np.ndarray,
    faces: np.ndarray,
    vertex_colours: np.ndarray,
    cam2world: np.ndarray,
    size: int,
    background: Sequence[float] = MESH_BACKGROUND,
    intrinsics: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A z-buffered render of a triangle mesh from an OpenCV camera (normalised intrinsics, the
    orbit's by default), in NumPy: (colour, grey), each (size, size, 3) floats in [0, 1]. Colour
    interpolates the vertex colours (RGB in [0, 1]); grey shades the geometry with a headlight.
    Pixels sample their centres; interpolation is perspective-correct."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    colours = np.asarray(vertex_colours, dtype=np.float64)[:, :3]
    intrinsics = cameras.normalized_intrinsics() if intrinsics is None else np.asarray(intrinsics, dtype=np.float64)
    world2cam = np.linalg.inv(np.asarray(cam2world, dtype=np.float64))
    points = vertices @ world2cam[:3, :3].T + world2cam[:3, 3]
    depth = points[:, 2]
    faces = faces[(depth[faces] > 1e-6).all(axis=1)]  # in front of the camera
    safe = np.where(depth > 1e-6, depth, 1.0)
    pixels = points @ cameras.pixel_intrinsics(intrinsics, size, size).T
    xy = pixels[:, :2] / safe[:, None]

    corners = xy[faces]  # F, 3, 2
    first = np.ceil(corners.min(axis=1) - 0.5).astype(np.int64).clip(0, size)  # first pixel (col, row)
    last = np.floor(corners.max(axis=1) - 0.5).astype(np.int64).clip(-1, size - 1)
    extent = last - first + 1
    edge1, edge2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    det = edge1[:, 0] * edge2[:, 1] - edge1[:, 1] * edge2[:, 0]
    live = (extent > 0).all(axis=1) & (np.abs(det) > 1e-12)
    inverse_depth = 1.0 / safe

    found_pixel, found_depth, found_face, found_weights = [], [], [], []
    span = extent.max(axis=1)
    bucket = np.where(live, np.ceil(np.log2(np.maximum(span, 1))).astype(np.int64), -1)
    for level in np.unique(bucket[bucket >= 0]):
        side = 1 << int(level)
        offsets = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2)
        members = np.flatnonzero(bucket == level)
        chunk = max(1, (1 << 20) // len(offsets))
        for start in range(0, len(members), chunk):
            tri = members[start : start + chunk]
            cells = first[tri, None, :] + offsets[None]  # T, S, 2
            inside_box = (offsets[None] < extent[tri, None, :]).all(axis=-1)
            delta = cells + 0.5 - corners[tri, None, 0]
            e1, e2, d = edge1[tri, None], edge2[tri, None], det[tri, None]
            w1 = (delta[..., 0] * e2[..., 1] - delta[..., 1] * e2[..., 0]) / d
            w2 = (e1[..., 0] * delta[..., 1] - e1[..., 1] * delta[..., 0]) / d
            w0 = 1.0 - w1 - w2
            hit = inside_box & (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
            t, s = np.nonzero(hit)
            if not len(t):
                continue
            screen = np.stack([w0[t, s], w1[t, s], w2[t, s]], axis=1)
            face = tri[t]
            inv = (screen * inverse_depth[faces[face]]).sum(axis=1)
            found_pixel.append(cells[t, s, 1] * size + cells[t, s, 0])
            found_depth.append(1.0 / inv)
            found_face.append(face)
            found_weights.append(screen * inverse_depth[faces[face]] / inv[:, None])

    colour = np.tile(np.asarray(background, dtype=np.float64), (size * size, 1))
    grey = colour.copy()
    if found_pixel:
        pixel, depth_hit = np.concatenate(found_pixel), np.concatenate(found_depth)
        order = np.lexsort((depth_hit, pixel))  # by pixel, nearest first
        nearest = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
        pixel = pixel[nearest]
        face = np.concatenate(found_face)[nearest]
        weights = np.concatenate(found_weights)[nearest]
        corners_of = faces[face]
        colour[pixel] = np.einsum("nk,nkc->nc", weights, colours[corners_of])
        normals = np.einsum("nk,nkc->nc", weights, _vertex_normals(vertices, faces)[corners_of])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        forward = np.asarray(cam2world, dtype=np.float64)[:3, 2]
        light = np.abs(normals @ forward)  # two-sided headlight
        grey[pixel] = (0.15 + 0.8 * light)[:, None] * np.array([0.85, 0.85, 0.88])
    return colour.reshape(size, size, 3).clip(0, 1), grey.reshape(size, size, 3).clip(0, 1)


def render_mesh(
    mesh, cam2world: np.ndarray, size: int, background: Sequence[float] = MESH_BACKGROUND, intrinsics=None
) -> tuple[np.ndarray, np.ndarray]:
    """`rasterize` for a trimesh.Trimesh with vertex colours (RGBA bytes) or a UV texture (its
    colour picture then ray-cast, every pixel sampling the texture), as dp360 exports them."""
    if getattr(mesh.visual, "kind", None) == "texture":
        from .nerf.texture import render_textured

        _, grey = rasterize(
            mesh.vertices, mesh.faces, np.full((len(mesh.vertices), 3), 0.5), cam2world, size, background, intrinsics
        )
        return render_textured(mesh, cam2world, size, intrinsics, background), grey
    colours = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    return rasterize(mesh.vertices, mesh.faces, colours, cam2world, size, background, intrinsics)


def framing(vertices: np.ndarray, distance: float = cameras.CAMERA_RADIUS) -> tuple[np.ndarray, float, float]:
    """(centre, camera distance, normalised focal length) that fit the mesh's bounding sphere,
    with a small margin, into a square view from any direction."""
    vertices = np.asarray(vertices, dtype=np.float64)
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    radius = max(float(np.linalg.norm(vertices - centre, axis=1).max()), 1e-6)
    distance = max(distance, 3.0 * radius)
    focal = 0.5 * math.sqrt(distance**2 - radius**2) / (radius * 1.08)
    return centre, distance, focal


def mesh_stills(glb_path: str | Path, size: int = MESH_STILL_SIZE) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(side, colour, grey) uint8 renders of a mesh file from the four sides of MESH_SIDES."""
    import trimesh

    mesh = trimesh.load(Path(glb_path), force="mesh")
    if len(mesh.faces) == 0:
        return []
    centre, distance, focal = framing(mesh.vertices)
    intrinsics = cameras.normalized_intrinsics(focal)
    stills = []
    for side, yaw in MESH_SIDES:
        pose = cameras.orbit_pose(yaw, MESH_ELEVATION, distance, centre)
        colour, grey = render_mesh(mesh, pose, size, MESH_BACKGROUND, intrinsics)
        stills.append((side, _to_uint8(colour), _to_uint8(grey)))
    return stills


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def png_data_uri(pixels: np.ndarray) -> str:
    """A small PNG (256-colour palette) as a data URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        buffer, format="PNG"
    )
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- the page -------------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1160px;padding:16px 24px;
color:#1d1d1f;background:#fff}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;margin:0 0 8px}.status{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;
font-size:13px;color:#fff;background:#888}.status.done{background:#2e7d32}.status.incomplete{background:#b26a00}
.status.failed,.status.interrupted{background:#c62828}
figure{margin:0;display:inline-block;vertical-align:top}figcaption{font-size:12.5px;color:#444;margin-top:2px}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.row img,.row video{max-width:100%;
border:1px solid #ddd;background:#f4f4f5}
.views{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:8px}.views img{width:100%;
border:1px solid #ddd;display:block}.views figcaption{font-variant-numeric:tabular-nums}
.mesh{display:grid;grid-template-columns:repeat(4,1fr);gap:8px}.mesh img{width:100%;display:block;border:1px solid #ddd}
.not-run{color:#8a4b00;background:#fff6e5;border-left:4px solid #e0a030;padding:6px 10px;margin:6px 0}
.failed{color:#8e1c1c;background:#fdecec;border-left:4px solid #d33;padding:6px 10px;margin:6px 0}
table{border-collapse:collapse;width:100%;font-size:13.5px}th,td{text-align:left;vertical-align:top;padding:4px 8px;
border-bottom:1px solid #e5e5e5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:12px}ul.notes li{margin:2px 0}
details summary{cursor:pointer;color:#333}code{font-size:12.5px}
"""

# Marks, once the page has loaded, how many images did not load, for headless checks.
_SCRIPT = """
window.addEventListener("load", function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var image = document.images[i];
    if (!image.complete || image.naturalWidth === 0) broken.push((image.getAttribute("src") || "").slice(0, 120));
  }
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
  if (broken.length) document.body.setAttribute("data-broken-image-sources", broken.join(" "));
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(rel_to_run: str) -> str:
    """A link from export/report.html to a file of the run, escaped for an attribute."""
    return _e(quote(f"../{rel_to_run}"))


def _angle(degrees: float) -> str:
    """Signed degrees to a tenth, without "-0.0" or "-180.0"."""
    rounded = round(float(degrees), 1) + 0.0
    return f"{180.0 if rounded == -180.0 else rounded:+.1f}°"


def _json_block(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"


class _Page:
    def __init__(
        self, run_dir: Path, manifest: dict[str, Any], stage_names: Sequence[str] = (), self_contained: bool = False
    ):
        self.run_dir = run_dir
        self.manifest = manifest
        # every image and the video inlined (one file to send); else links next to the run
        self.self_contained = self_contained
        # the stages of this kind of run in order (`dp360.registry`); without them, the recorded ones
        self.stage_names = tuple(stage_names) or tuple(manifest.get("stages", {}))
        self.records: dict[str, dict[str, Any]] = {
            name: record for name, record in manifest.get("stages", {}).items() if name != "report"
        }
        self.parts: list[str] = []

    def has(self, rel: str) -> bool:
        return (self.run_dir / rel).is_file()

    def problem(self, stage: str, files: Sequence[str] = ()) -> str | None:
        """Why `stage`'s results are not on the page, or None when they are."""
        record = self.records.get(stage)
        if record is None:
            return f"not run: the {stage} stage was not part of the command that made this run"
        status = record.get("status")
        if status == "done":
            missing = [rel for rel in files if not self.has(rel)]
            if missing:
                return (
                    f"missing: {', '.join(missing)} (removed after the {stage} stage wrote it; rerun the same command)"
                )
            return None
        if status == "not_available":
            return f"not run: {record.get('reason') or 'no reason recorded'}"
        if status == "skipped":
            return f"skipped: {record.get('reason') or 'no reason recorded'}"
        if status in ("failed", "interrupted"):
            return f"{status}: {record.get('error') or 'no error recorded'}"
        return f"not run: the {stage} stage is {status}"

    def add(self, text: str) -> None:
        self.parts.append(text)

    def notice(self, message: str) -> None:
        kind = "failed" if message.startswith(("failed", "interrupted")) else "not-run"
        self.add(f'<p class="{kind}">{_e(message)}</p>')

    def status(self) -> str:
        statuses = [record.get("status") for record in self.records.values()]
        if any(status in ("failed", "interrupted") for status in statuses):
            return "failed"
        if any(status not in ("done", "skipped") for status in statuses):
            return "incomplete"
        recorded = self.manifest.get("status")
        return recorded if recorded in ("done", "incomplete", "failed", "interrupted") else "done"

    # -- sections ------------------------------------------------------------------------------

    def header(self) -> None:
        manifest = self.manifest
        source = manifest.get("input", {}) if isinstance(manifest.get("input"), dict) else {}
        environment = manifest.get("environment") if isinstance(manifest.get("environment"), dict) else {}
        name = Path(str(source.get("path") or layout.INPUT)).name
        status = self.status()
        self.add(f"<h1>dp360 run: {_e(name)} <span class='status {_e(status)}'>{_e(status)}</span></h1>")
        size = source.get("size")
        facts = [
            ("input", source.get("path")),
            ("size", f"{size[0]} x {size[1]} px" if isinstance(size, list) and len(size) == 2 else None),
            ("sha256", str(source.get("sha256") or "")[:16] or None),
            ("dp360", manifest.get("dp360_version")),
            ("created", manifest.get("created_at")),
            ("device", environment.get("device")),
            ("dtype", environment.get("dtype")),
            ("gpu", environment.get("gpu")),
            ("seed", manifest.get("seed")),
        ]
        shown = " &middot; ".join(f"{_e(key)} <b>{_e(value)}</b>" for key, value in facts if value is not None)
        self.add(f'<p class="meta">{shown}</p>')

    def notes(self) -> None:
        notes: list[tuple[str, str]] = []
        source = self.manifest.get("input")
        for note in source.get("notes", []) if isinstance(source, dict) else []:
            notes.append(("note", f"input: {note}"))
        recorded = self.manifest.get("notes")
        for note in recorded if isinstance(recorded, list) else []:
            notes.append(("note", str(note)))
        for name in self.records:
            problem = self.problem(name)
            if problem is not None:
                skipped = self.records[name].get("status") == "skipped"  # turned off on purpose
                notes.append(("note" if skipped else "warning", f"{name}: {problem}"))
        self.add("<h2 id='notes'>Notes and warnings</h2>")
        if not notes:
            self.add("<p>None: every stage ran.</p>")
            return
        items = "".join(f"<li><b>{_e(kind)}</b>: {_e(text)}</li>" for kind, text in notes)
        self.add(f"<ul class='notes'>{items}</ul>")

    def link(self, rel: str) -> str:
        """The address of a file of the run in the page: relative to export/, or inlined."""
        if not self.self_contained:
            return _href(rel)
        mime = _MIME_TYPES.get(Path(rel).suffix.lower(), "application/octet-stream")
        return f"data:{mime};base64,{base64.b64encode((self.run_dir / rel).read_bytes()).decode()}"

    def files(self, rels: Sequence[str]) -> str:
        """Links to files of the run (none in a self-contained page: it carries no file beside it)."""
        if self.self_contained:
            return ""
        return " &middot; ".join(f'<a href="{_href(rel)}">{_e(Path(rel).name)}</a>' for rel in rels)

    def figure(self, rel: str, caption: str, width: int | None = None) -> str:
        """An image of the run, linked to itself; `caption` is HTML (escaped by the caller)."""
        style = f' style="width:{width}px"' if width else ""
        image = f'<img src="{self.link(rel)}" alt="{_e(rel)}" style="width:100%">'
        if not self.self_contained:
            image = f'<a href="{_href(rel)}">{image}</a>'
        return f"<figure{style}>{image}<figcaption>{caption}</figcaption></figure>"

    def imported(self) -> bool:
        """Whether the run fits views imported from a folder (`dp360 fit`) rather than a portrait's."""
        source = self.manifest.get("input")
        return isinstance(source, dict) and source.get("kind") == "views"

    def input_and_crop(self) -> None:
        self.add("<h2 id='input'>Input, detection and crop</h2>")
        if self.imported():
            source = self.manifest["input"]
            self.add(
                f"<p>Views imported from <code>{_e(source.get('path'))}</code> (<code>dp360 fit</code>): no portrait, "
                "no detection, no crop.</p>"
            )
            return
        figures = []
        if self.has(layout.INPUT):
            figures.append(self.figure(layout.INPUT, "input", 300))
        problem = self.problem("prepare", (layout.OVERLAY, layout.CROP))
        if problem is None:
            figures.append(self.figure(layout.OVERLAY, "detection, landmarks, crop square and pose", 300))
            figures.append(self.figure(layout.CROP, _e(self._crop_caption()), 300))
        if figures:
            self.add(f"<div class='row'>{''.join(figures)}</div>")
        if problem is not None:
            self.notice(problem)

    def inversion(self) -> None:
        """The PanoHead inversion, where a bad result usually starts: target | inversion, its losses."""
        if self.imported():
            return
        self.add("<h2 id='inversion'>PanoHead inversion (3D-aware noise)</h2>")
        problem = self.problem("noise", (layout.NOISE_FIT,))
        if problem is not None:
            self.notice(problem)
            return
        summary = self.records["noise"].get("summary") or {}

        def pair(key: str) -> str | None:
            values = summary.get(key)
            if isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values):
                return f"{values[0]:.4f} -> {values[1]:.4f}"
            return None

        facts = [
            f"projection loss {pair('projection_loss')}" if pair("projection_loss") else None,
            f"tuning (PTI) loss {pair('pti_loss')}" if pair("pti_loss") else None,
            f"mean absolute error {summary['mean_abs_error']:.4f}"
            if isinstance(summary.get("mean_abs_error"), (int, float))
            else None,
        ]
        caption = "the crop (target) | PanoHead's head fitted to it, at the input's camera"
        self.add(f"<div class='row'>{self.figure(layout.NOISE_FIT, _e(caption), 512)}</div>")
        shown = [fact for fact in facts if fact]
        if shown:
            self.add(f"<p>{_e('; '.join(shown))}. A poor fit here gives views that follow the cameras less well.</p>")

    def _crop_caption(self) -> str:
        pose: Any = None
        try:
            pose = json.loads((self.run_dir / layout.FACE).read_text()).get("pose")
        except (OSError, ValueError, AttributeError):
            pose = (self.records.get("prepare", {}).get("summary") or {}).get("pose")
        if not isinstance(pose, dict):
            return "crop (PanoHead alignment)"
        try:
            yaw, elevation = float(pose["yaw_deg"]), float(pose["elevation_deg"])
        except (KeyError, TypeError, ValueError):
            return "crop (PanoHead alignment)"
        source = f", {pose.get('source')}" if pose.get("source") else ""
        return f"crop; camera yaw {_angle(yaw)}, elevation {_angle(elevation)}{source}"

    def _cameras(self) -> list[tuple[str, float, float]]:
        try:
            found = view_cameras(self.run_dir / layout.TRANSFORMS)
        except (OSError, ValueError, KeyError, TypeError, IndexError, np.linalg.LinAlgError):
            return []
        # only plain file names inside views/ (never a path out of the run)
        return [(name, yaw, elevation) for name, yaw, elevation in found if Path(name).name == name and name]

    def views(self) -> None:
        self.add("<h2 id='back'>Back view</h2>")
        imported = self.imported()
        problem = self.problem("import") if imported else self.problem("views", (layout.BACK_VIEW,))
        views_cameras = self._cameras() if problem is None else []
        if imported:
            self.notice("none: the views were imported, not generated from a portrait")
        elif problem is None:
            settings = self.records["views"].get("settings") or {}
            back = settings.get("back_camera_index")
            caption = "generated back view (model F)"
            if isinstance(back, int) and 0 <= back < len(views_cameras):
                caption += f", camera {back}: yaw {_angle(views_cameras[back][1])}"
            self.add(f"<div class='row'>{self.figure(layout.BACK_VIEW, _e(caption), 300)}</div>")
        else:
            self.notice(problem)

        self.add("<h2 id='views'>Views and their cameras</h2>")
        if problem is not None:
            self.notice(problem)
            return
        shown = [(name, yaw, elevation) for name, yaw, elevation in views_cameras if self.has(f"{layout.VIEWS}/{name}")]
        if not shown:
            self.notice(f"missing: no view images listed in {layout.TRANSFORMS}")
            return
        self.add(
            f"<p>{len(shown)} views on the orbit (radius {cameras.CAMERA_RADIUS}, looking at the head's centre); "
            "yaw 0° is the front, positive towards the subject's left; elevation is above eye level.</p>"
        )
        self.add(f"<div class='row'>{self._orbit_map(shown)}</div>")
        cells = "".join(
            self.figure(
                f"{layout.VIEWS}/{name}",
                f"{_e(Path(name).stem)} &middot; yaw {_angle(yaw)} &middot; elev {_angle(elevation)}",
            )
            for name, yaw, elevation in shown
        )
        self.add(f"<div class='views'>{cells}</div>")
        links = self.files([rel for rel in (layout.GRID, layout.ORBIT, layout.TRANSFORMS) if self.has(rel)])
        if links:
            self.add(f"<p>Files: {links}</p>")

    def _orbit_map(self, shown: list[tuple[str, float, float]]) -> str:
        """A top-down map of the cameras: the head in the middle, the front at the bottom."""
        size, centre, radius = 260, 130, 100
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            'role="img" aria-label="cameras seen from above">',
            f'<circle cx="{centre}" cy="{centre}" r="{radius}" fill="none" stroke="#bbb" stroke-dasharray="3 3"/>',
            f'<ellipse cx="{centre}" cy="{centre}" rx="18" ry="22" fill="#e8e2da" stroke="#999"/>',
            f'<path d="M{centre - 5} {centre + 20} L{centre} {centre + 29} L{centre + 5} {centre + 20}" fill="#999"/>',
            f'<text x="{centre}" y="{size - 4}" text-anchor="middle" font-size="11" fill="#555">front</text>',
            f'<text x="{centre}" y="12" text-anchor="middle" font-size="11" fill="#555">back</text>',
            f'<text x="{size - 2}" y="{centre + 4}" text-anchor="end" font-size="11" fill="#555">left</text>',
            f'<text x="2" y="{centre + 4}" font-size="11" fill="#555">right</text>',
        ]
        for name, yaw, elevation in shown:
            scale = radius * math.cos(math.radians(elevation))
            x = centre + scale * math.sin(math.radians(yaw))
            y = centre + scale * math.cos(math.radians(yaw))
            label = f"{Path(name).stem}: yaw {_angle(yaw)}, elevation {_angle(elevation)}"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="#3868c8"><title>{_e(label)}</title></circle>'
            )
        pose = self._input_pose()
        if pose is not None:
            x = centre + radius * 0.8 * math.sin(math.radians(pose))
            y = centre + radius * 0.8 * math.cos(math.radians(pose))
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#e07020"><title>input camera: yaw {_angle(pose)}</title>'
                "</circle>"
            )
        parts.append("</svg>")
        legend = (
            "<figcaption>cameras seen from above: <span style='color:#3868c8'>&#9679;</span> views"
            + (", <span style='color:#e07020'>&#9679;</span> the input's estimated camera" if pose is not None else "")
            + "</figcaption>"
        )
        return f"<figure>{''.join(parts)}{legend}</figure>"

    def _input_pose(self) -> float | None:
        pose = (self.records.get("prepare", {}).get("summary") or {}).get("pose")
        try:
            return float(pose["yaw_deg"])
        except (KeyError, TypeError, ValueError):
            return None

    def turntable(self) -> None:
        self.add("<h2 id='turntable'>Turntable</h2>")
        problem = self.problem("render", (layout.TURNTABLE,))
        if problem is not None:
            self.notice(problem)
            return
        summary = self.records["render"].get("summary") or {}
        settings = self.records["render"].get("settings") or {}
        details = [
            f"{summary['frames']} frames" if "frames" in summary else None,
            f"{settings['fps']} fps" if "fps" in settings else None,
            f"{summary['resolution']} px" if "resolution" in summary else None,
            f"elevation {settings['elevation']}°" if "elevation" in settings else None,
        ]
        caption = ", ".join(_e(detail) for detail in details if detail)
        width = summary.get("resolution") if isinstance(summary.get("resolution"), int) else 512
        # beside report.html in export/, or inlined
        video = self.link(layout.TURNTABLE) if self.self_contained else _e(quote(Path(layout.TURNTABLE).name))
        self.add(
            f'<div class="row"><figure><video src="{video}" controls loop muted autoplay '
            f'playsinline preload="auto" width="{max(256, min(width, 512))}" data-state="loading" '
            "onloadeddata=\"this.setAttribute('data-state','loaded')\" "
            "onerror=\"this.setAttribute('data-state','broken')\"></video>"
            f"<figcaption>{caption or 'turntable'}</figcaption></figure></div>"
        )

    def mesh(self) -> None:
        self.add("<h2 id='mesh'>Mesh</h2>")
        summary = (self.records.get("export") or {}).get("summary") or {}
        if "splats" in summary and self.problem("export", (layout.SPLATS,)) is None:
            # a splat field (`--field splatfacto`): its Gaussians instead of a mesh
            self.add(
                f"<p>{_e(str(summary['splats']))} Gaussian splats in "
                f"{self.files([layout.SPLATS]) or _e(Path(layout.SPLATS).name)} (the standard 3DGS PLY layout, "
                "which splat viewers open).</p>"
            )
            self.notice(summary.get("mesh") or "not written: a splat field has no density to mesh")
            return
        problem = self.problem("export", (layout.MESH,))
        if problem is not None:
            self.notice(problem)
            return
        try:
            stills = mesh_stills(self.run_dir / layout.MESH)
        except Exception as error:  # a damaged file: the page still shows everything else
            self.notice(f"failed: {layout.MESH} could not be read ({type(error).__name__}: {error})")
            return
        summary = self.records["export"].get("summary") or {}
        facts = [f"{summary[key]} {key}" for key in ("faces", "vertices") if key in summary]
        texture = summary.get("texture")
        colours = "vertex colours" if texture in (None, "vertex colours") else "its UV texture"
        links = self.files(
            [
                rel
                for rel in sorted(self.records["export"].get("outputs") or {})
                if Path(rel).suffix in (".glb", ".obj", ".ply") and self.has(rel)
            ]
        )
        files = f" Files: {links}" if links else ""
        self.add(
            f"<p>{_e(', '.join(facts) or 'mesh')}; stills rendered from {_e(Path(layout.MESH).name)} "
            f"({MESH_ELEVATION:g}° above eye level): {_e(colours)}, then the geometry in grey.{files}</p>"
        )
        if not stills:
            self.notice(f"missing: {layout.MESH} holds no faces")
            return
        cells = []
        for side, colour, grey in stills:
            cells.append(
                f"<figure><img src='{png_data_uri(colour)}' alt='{_e(side)}, {_e(colours)}'>"
                f"<img src='{png_data_uri(grey)}' alt='{_e(side)}, geometry'><figcaption>{_e(side)}</figcaption></figure>"
            )
        self.add(f"<div class='mesh'>{''.join(cells)}</div>")

    def consistency(self) -> None:
        """The view-consistency score (dp360.eval.consistency): the field re-rendered at the views."""
        self.add("<h2 id='consistency'>View consistency</h2>")
        problem = self.problem("consistency")
        if problem is not None:
            self.notice(problem)
            return
        summary = self.records["consistency"].get("summary") or {}

        def number(key: str, digits: int) -> str:
            value = summary.get(key)
            return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"

        self.add(
            f"<p>The fitted field rendered at the {_e(summary.get('views', '?'))} view cameras "
            f"({_e(summary.get('resolution', '?'))} px) against the generated views: PSNR <b>{number('psnr', 2)} dB</b>, "
            f"LPIPS <b>{number('lpips', 3)}</b> (low PSNR and high LPIPS: views that disagree in 3D). Identity "
            f"similarity of the views to the input's front view: CSIM <b>{number('csim', 3)}</b> over "
            f"{_e(summary.get('csim_views', 0))} views with a face. Per view: <code>eval/consistency.json</code>.</p>"
        )
        unavailable = summary.get("unavailable")
        for name, reason in unavailable.items() if isinstance(unavailable, dict) else ():
            self.notice(f"not available: {name.upper()}: {reason}")

    def stages(self) -> None:
        self.add("<h2 id='stages'>Stages</h2>")
        rows = []
        order = [name for name in self.stage_names if name != "report"]
        names = order + [name for name in self.records if name not in order]
        total = 0.0
        for name in names:
            record = self.records.get(name)
            if record is None:
                rows.append(
                    f"<tr><td>{_e(name)}</td><td colspan='4'>not run: not part of the command that made this run"
                    "</td></tr>"
                )
                continue
            status = str(record.get("status"))
            seconds = record.get("seconds")
            if isinstance(seconds, (int, float)) and status == "done":
                total += float(seconds)
            detail = ""
            if status != "done":
                detail = _e(self.problem(name) or "")
            settings = record.get("settings")
            summary = record.get("summary")
            blocks = []
            if settings:
                blocks.append(f"<details><summary>settings</summary>{_json_block(settings)}</details>")
            if summary:
                blocks.append(f"<details><summary>summary</summary>{_json_block(summary)}</details>")
            timing = f"{float(seconds):.2f} s" if isinstance(seconds, (int, float)) else ""
            finished = _e(record.get("finished_at") or "")
            rows.append(
                f"<tr><td>{_e(name)}</td><td>{_e(status)}{'<br>' + detail if detail else ''}</td>"
                f"<td class='num'>{_e(timing)}</td><td>{finished}</td><td>{''.join(blocks)}</td></tr>"
            )
        self.add(
            "<table><thead><tr><th>stage</th><th>status</th><th>time</th><th>finished</th><th>settings and results</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody>"
            f"<tfoot><tr><td>total</td><td></td><td class='num'>{total:.2f} s</td><td colspan='2'></td></tr></tfoot>"
            "</table>"
        )

    def environment(self) -> None:
        environment = self.manifest.get("environment")
        if not environment:
            return
        self.add("<h2 id='environment'>Environment</h2>")
        self.add(f"<details><summary>versions and device</summary>{_json_block(environment)}</details>")

    def render(self) -> str:
        self.header()
        self.notes()
        self.input_and_crop()
        self.inversion()
        self.views()
        self.turntable()
        self.mesh()
        self.consistency()
        self.stages()
        self.environment()
        source = self.manifest.get("input") if isinstance(self.manifest.get("input"), dict) else {}
        title = f"{Path(str(source.get('path') or 'run')).name}: dp360 run report"
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(self.parts)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
        )


def render_report(
    run_dir: str | Path,
    manifest: dict[str, Any] | None = None,
    stage_names: Sequence[str] = (),
    self_contained: bool = False,
) -> str:
    """The page of a run folder, as HTML text (for `export/report.html`: its links are relative
    to `export/`; `self_contained`: every image and the video inlined, one file to send). `stage_names`:
    the stages of this kind of run, in order (`dp360.registry`), so that those the command did not
    run are listed as such; without them, the recorded stages."""
    run_dir = Path(run_dir)
    manifest = read_run(run_dir) if manifest is None else manifest
    return _Page(run_dir, manifest, stage_names, self_contained).render()


def write_report(
    run_dir: str | Path,
    folder: str | Path | None = None,
    stage_names: Sequence[str] = (),
    self_contained: bool = False,
) -> Path:
    """Write the page into `folder` (default RUN_DIR/export/) atomically, as report.html (or, self-
    contained, report-standalone.html); returns its path. The caller holds the run's lock (`dp360
    report` does, and the runner for the stage)."""
    run_dir = Path(run_dir)
    text = render_report(run_dir, stage_names=stage_names, self_contained=self_contained)
    target = Path(folder or run_dir / REPORT_FOLDER) / (STANDALONE_NAME if self_contained else REPORT_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, text.encode("utf-8"))
    return target


def _build(context: StageContext, folder: Path) -> dict[str, Any]:
    path = write_report(context.run_dir, folder, context.stage_names)
    return {"bytes": path.stat().st_size}


REPORT_STAGE = Stage(
    name="report",
    folder=REPORT_FOLDER,
    description="run report (export/report.html)",
    settings=lambda context: {"mesh_still_size": MESH_STILL_SIZE, "mesh_elevation": MESH_ELEVATION},
    inputs=lambda context: report_inputs(context.run_dir),
    build=_build,
    version=2,  # 2: the PanoHead inversion's section
    shared_folder=True,
)
