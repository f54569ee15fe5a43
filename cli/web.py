"""`dp360 app`: a portrait in, a head out, in the browser (Gradio), as a thin layer over the same
library run as `dp360 reconstruct` (`dp360.run.reconstruct`).

One run at a time on the machine (Gradio's queue, concurrency 1; the others wait with their
position shown). Each portrait gets its own run folder under `--runs` named by its content, so the
same portrait reopens (and resumes) its run. Every option of `reconstruct` is accepted and becomes
the form's (and the API's) default. The app binds 127.0.0.1 unless told otherwise, never opens a
public share link, and says so when it is reachable from other machines.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from cli.console import err_console, user_errors
from cli.options import (
    DEVICE_OPTION,
    FACE_INDEX_OPTION,
    FIELD_GROUPS,
    RUN_GROUPS,
    VIEW_GROUPS,
    FieldKind,
    MeshFormat,
    TextureSource,
    reconstruct_settings,
    view_models,
    with_options,
)
from dp360 import layout

# Every option of `reconstruct`: the form's and the API's defaults.
APP_GROUPS = (*VIEW_GROUPS, FACE_INDEX_OPTION, *FIELD_GROUPS, DEVICE_OPTION, *RUN_GROUPS)
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"
DEFAULT_RUNS = Path("dp360-app-runs")
AUTH_VARIABLE = "DP360_APP_AUTH"  # USER:PASSWORD, as --auth takes it
POLL_SECONDS = 0.5  # how often the page's progress is refreshed while a run works


class StageLog:
    """The run's reporter: what each stage did, for the page (the runner calls it from the run's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lines: list[str] = []
        self.current: tuple[str, str, float] | None = None

    def stage_started(self, name: str, description: str) -> None:
        with self._lock:
            self.current = (name, description, time.monotonic())

    def stage_finished(self, name: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self.current = None
            self.lines.append(f"- **{name}**: {outcome} ({seconds:.1f} s)")

    def note(self, message: str) -> None:
        with self._lock:
            self.lines.append(f"- note: {message}")

    def markdown(self) -> str:
        with self._lock:
            lines = list(self.lines)
            if self.current is not None:
                name, description, started = self.current
                lines.append(f"- **{name}**: {description}, {time.monotonic() - started:.0f} s so far")
        return "\n".join(lines) or "starting"


@dataclass
class Job:
    """One run in its own thread: its result, or the error that ended it."""

    thread: threading.Thread
    log: StageLog
    result: Any = None
    error: BaseException | None = field(default=None)


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in `thread` at its next Python line: Cancel ends a run as Ctrl-C does
    (the running stage is recorded as interrupted, its temporaries go, finished stages are kept)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))


def run_folder_for(runs_dir: Path, image: Path) -> Path:
    """The run folder of a portrait: its name and the start of its content's hash, so that the same
    portrait reopens its run (finished stages are reused) and two portraits never share one."""
    digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(image).stem)[:40] or "portrait"
    return Path(runs_dir) / f"{stem}-{digest}"


def results_of(run_dir: Path) -> dict[str, Any]:
    """What the page shows of a run folder: each file where the run made it, else None."""
    run = layout.RunLayout(run_dir)

    def there(relative: str) -> str | None:
        path = run / relative
        return str(path) if path.is_file() else None

    views = sorted(run.views.glob("[0-9][0-9][0-9].png")) if run.views.is_dir() else []
    angles = _view_angles(run / layout.TRANSFORMS)
    meshes = sorted(run.export.glob(f"{layout.MESH_STEM}.*")) if run.export.is_dir() else []
    glb = there(layout.MESH)
    consistency = run / layout.CONSISTENCY
    score = None
    if consistency.is_file():
        import json

        summary = json.loads(consistency.read_text()).get("summary", {})
        if isinstance(summary, dict) and isinstance(summary.get("psnr"), (int, float)):
            score = f"View consistency: PSNR {summary['psnr']:.2f} dB"
            if isinstance(summary.get("lpips"), (int, float)):  # absent without the LPIPS weights
                score += f", LPIPS {summary['lpips']:.3f}"
    # the files that stand alone (an OBJ needs its MTL and texture: `PortraitApp.obj_zip`)
    downloads = [str(path) for path in meshes if path.suffix in (".glb", ".ply") and path.is_file()]
    if there(layout.TURNTABLE):
        downloads.append(there(layout.TURNTABLE))
    return {
        "crop": there(layout.CROP),
        "overlay": there(layout.OVERLAY),
        "back": there(layout.BACK_VIEW),
        "inversion": there(layout.NOISE_FIT),
        "views": [(str(path), angles.get(path.name, path.stem)) for path in views],
        "turntable": there(layout.TURNTABLE),
        "model": glb,
        "score": score,
        "downloads": downloads,
    }


def _view_angles(transforms: Path) -> dict[str, str]:
    """View file name -> "000 · yaw +11.2° · elev +0.0°", from the views' cameras (none when unreadable)."""
    from dp360.errors import Dp360Error
    from dp360.report import view_cameras

    if not transforms.is_file():
        return {}
    try:
        found = view_cameras(transforms)
    except (Dp360Error, OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: f"{Path(name).stem} · yaw {yaw:+.1f}° · elev {elevation:+.1f}°" for name, yaw, elevation in found}


class PortraitApp:
    """The app's behaviour, apart from its page: checks a request's settings, runs the portrait in
    a thread, and reports progress and results (the page and the tests drive it the same way)."""

    def __init__(self, defaults: SimpleNamespace, runs_dir: Path):
        self.defaults = defaults
        self.runs_dir = Path(runs_dir)

    def settings(self, **changes: Any) -> SimpleNamespace:
        """The defaults (every `reconstruct` option the app was started with) with the form's values."""
        options = SimpleNamespace(**vars(self.defaults))
        for name, value in changes.items():
            if value is not None:
                setattr(options, name, value)
        return options

    def start(self, image: str | Path, options: SimpleNamespace) -> tuple[Job, Path]:
        """Check every setting, then start the run of `image` (one sentence on bad input, nothing written)."""
        from dp360.errors import Dp360Error
        from dp360.panohead.stage import NoiseModels
        from dp360.run import reconstruct as reconstruct_run

        image = Path(image)
        if not image.is_file():
            raise Dp360Error("Upload a portrait first (or press 'Use the example portrait').")
        checked = reconstruct_settings(options)  # as `dp360 reconstruct` checks them
        checked.run.progress = False
        models, noise_models = view_models(options, checked.run_dtype), NoiseModels.locate(options.weights_dir)
        out = run_folder_for(self.runs_dir, image)
        log = StageLog()

        def work() -> None:
            try:
                job.result = reconstruct_run(
                    image,
                    out,
                    checked.prepare,
                    checked.run,
                    log,
                    checked.views,
                    models,
                    checked.noise,
                    noise_models,
                    checked.field,
                )
            except BaseException as error:  # noqa: BLE001 - handed to the page, which says it in one sentence
                job.error = error

        job = Job(threading.Thread(target=work, name=f"dp360-run-{out.name}", daemon=True), log)
        job.thread.start()
        return job, out

    def zip_run(self, out: Path) -> Path:
        """The whole run folder as one zip (its lock and temporaries left out), written atomically
        beside the runs (`RUNS/zips/NAME.zip`): what the API and the page offer to download."""
        import zipfile

        from dp360.atomic import atomic_path, is_dp360_temporary

        target = self.runs_dir / "zips" / f"{Path(out).name}.zip"
        with atomic_path(target) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(out).rglob("*")):
                relative = path.relative_to(out)
                if path.is_symlink() or not path.is_file() or path.name == layout.LOCK:
                    continue
                if any(is_dp360_temporary(part) for part in relative.parts):
                    continue
                archive.write(path, Path(out.name) / relative)
        return target

    def obj_zip(self, out: Path) -> Path | None:
        """The OBJ mesh with its MTL and texture as one zip (`RUNS/zips/NAME-obj.zip`), when the run
        exported one; None otherwise."""
        import zipfile

        from dp360.atomic import atomic_path

        export = layout.RunLayout(out).export
        obj = export / f"{layout.MESH_STEM}.obj"
        if not obj.is_file():
            return None
        parts = [obj, *(export / f"{layout.MESH_STEM}{suffix}" for suffix in (".mtl", ".png"))]
        target = self.runs_dir / "zips" / f"{Path(out).name}-obj.zip"
        with atomic_path(target) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            for part in parts:
                if part.is_file() and not part.is_symlink():
                    archive.write(part, part.name)
        return target

    def standalone_report(self, out: Path) -> Path:
        """The run's report with every image and the video inlined (one file to send), written beside
        the runs (`RUNS/reports/NAME/report-standalone.html`); the run's own report stays in export/."""
        from dp360.pipeline.registry import stage_names_of
        from dp360.report import read_run, write_report

        folder = self.runs_dir / "reports" / Path(out).name
        return write_report(out, folder, stage_names_of(read_run(out)), self_contained=True)

    def run(self, image: str | Path, options: SimpleNamespace) -> Iterator[tuple[str, Path, Job]]:
        """Start the run of `image` and follow it: yields (progress text, run folder, job) while it
        works, then once when it has ended. Closing the iterator early (Cancel, a closed page) ends
        the run as Ctrl-C does."""
        job, out = self.start(image, options)
        try:
            while job.thread.is_alive():
                yield job.log.markdown(), out, job
                job.thread.join(POLL_SECONDS)
        finally:
            if job.thread.is_alive():
                _interrupt(job.thread)
                job.thread.join()
        yield job.log.markdown(), out, job

    def earlier_runs(self) -> list[str]:
        """The run folders under the runs folder that dp360 made (their run.json is dp360's), newest first."""
        from dp360.errors import Dp360Error
        from dp360.manifest import read_manifest

        found = []
        if self.runs_dir.is_dir():
            for folder in self.runs_dir.iterdir():
                record = folder / layout.MANIFEST
                if folder.is_dir() and not folder.is_symlink() and record.is_file():
                    try:
                        read_manifest(record)
                    except Dp360Error:  # not a run of ours: not offered
                        continue
                    found.append((record.stat().st_mtime, folder.name))
        return [name for _, name in sorted(found, reverse=True)]

    def reopen(self, name: str) -> tuple[str, dict[str, Any]]:
        """(status text, results) of an earlier run, by its folder name (one of `earlier_runs`)."""
        from dp360.errors import Dp360Error

        if name not in self.earlier_runs():
            raise Dp360Error(f"There is no finished run named {name!r} in {self.runs_dir}; pick one from the list.")
        import json

        out = self.runs_dir / name
        status = json.loads((out / layout.MANIFEST).read_text()).get("status", "unknown")
        return f"**{status}** (reopened): {out}", results_of(out)

    @staticmethod
    def problem(error: BaseException) -> str:
        """The sentence the page shows for what ended a run."""
        from dp360.atomic import filesystem_error
        from dp360.errors import Dp360Error

        if isinstance(error, KeyboardInterrupt):
            return "Cancelled: finished stages are kept in the run folder; run the same portrait again to resume."
        if isinstance(error, Dp360Error):
            return str(error)
        translated = filesystem_error(error)
        return str(translated) if translated else f"The run failed ({type(error).__name__}: {error})."


def build_page(portrait_app: PortraitApp):
    """The Gradio page over `portrait_app`."""
    import gradio as gr

    defaults = portrait_app.defaults
    with gr.Blocks(title="dp360: a 360-degree head from one portrait") as page:
        gr.Markdown("# dp360\nOne portrait in: 360-degree views, a radiance field, a turntable and a mesh out.")
        with gr.Row():
            portrait = gr.Image(type="filepath", label="Portrait", sources=["upload"])
            with gr.Column():
                example = gr.Button("Use the example portrait")
                views = gr.Slider(8, 128, value=defaults.view_count, step=1, label="Views around the head")
                steps = gr.Slider(1, 999, value=defaults.steps, step=1, label="Denoising steps")
                guidance = gr.Slider(1.0, 30.0, value=defaults.guidance, step=0.5, label="Guidance")
                seed = gr.Number(value=defaults.seed, precision=0, label="Seed (0 to 4294967295)")
                field_kind = gr.Dropdown(
                    [kind.value for kind in FieldKind], value=defaults.field_kind.value, label="Field"
                )
                mesh_format = gr.Dropdown([kind.value for kind in MeshFormat], value="glb", label="Mesh format")
                texture = gr.Dropdown(
                    [kind.value for kind in TextureSource],
                    value=defaults.texture.value,
                    label="Mesh colours (views: UV texture baked from the views)",
                )
                no_crop = gr.Checkbox(value=defaults.no_crop, label="Already cropped (no face detection)")
                with gr.Row():
                    # text, so that "empty: the estimated pose" is a value the API can default to
                    yaw = gr.Textbox(value=_angle_text(defaults.yaw), label="Yaw override (degrees; empty: estimated)")
                    pitch = gr.Textbox(
                        value=_angle_text(defaults.pitch), label="Pitch override (degrees; empty: estimated)"
                    )
                with gr.Row():
                    run = gr.Button("Run", variant="primary")
                    cancel = gr.Button("Cancel")
        status = gr.Markdown()
        with gr.Row():
            crop = gr.Image(label="Crop", interactive=False)
            overlay = gr.Image(label="Detection, landmarks and pose", interactive=False)
            inversion = gr.Image(label="PanoHead inversion: target | inversion", interactive=False)
            back = gr.Image(label="Back view", interactive=False)
        gallery = gr.Gallery(label="Views", columns=8)
        with gr.Row():
            turntable = gr.Video(label="Turntable", interactive=False)
            model = gr.Model3D(label="Mesh")
        score = gr.Markdown()
        downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
        outputs = [status, crop, overlay, inversion, back, gallery, turntable, model, score, downloads]
        with gr.Row():
            earlier = gr.Dropdown(
                portrait_app.earlier_runs(), label="Earlier runs in the runs folder", allow_custom_value=True, scale=3
            )
            refresh = gr.Button("Refresh the list", scale=1)
            reopen = gr.Button("Show this run", scale=1)

        def show(text: str, found: dict[str, Any] | None = None) -> list[Any]:
            found = found or {}
            keys = ("crop", "overlay", "inversion", "back", "views", "turntable", "model", "score", "downloads")
            return [text, *(found.get(key) for key in keys)]

        def form_options(view_count, steps, guidance, seed, field_name, mesh_name, no_crop, yaw, pitch, texture=None):
            return portrait_app.settings(
                view_count=int(view_count),
                steps=int(steps),
                guidance=float(guidance),
                seed=int(seed) if seed is not None else None,
                field_kind=FieldKind(field_name),
                mesh_format=[MeshFormat(mesh_name)],
                texture=TextureSource(texture) if texture else None,
                no_crop=bool(no_crop),
                yaw=_angle(yaw, "Yaw"),
                pitch=_angle(pitch, "Pitch"),
            )

        def follow(image, *form):
            """The run of `image` with the form's values: (progress, run folder, job) as it goes; a bad
            input or a failed run is the page's one sentence."""
            from dp360.errors import Dp360Error

            try:
                steps = portrait_app.run(image or "", form_options(*form))
                for update in steps:
                    yield update
            except Dp360Error as error:
                raise gr.Error(str(error)) from None
            job = update[2]
            if job.error is not None:
                raise gr.Error(PortraitApp.problem(job.error))

        def reconstruct_page(image, *form):
            for text, out, job in follow(image, *form):
                if job.thread.is_alive():
                    yield show(text, results_of(out))
            found = results_of(out)
            extras = [path for path in (portrait_app.obj_zip(out), portrait_app.zip_run(out)) if path is not None]
            if (out / layout.MANIFEST).is_file():
                extras.append(portrait_app.standalone_report(out))
            found["downloads"] = [*found["downloads"], *map(str, extras)]
            yield show(f"**{job.result.status}**: {out}\n\n{text}", found)

        def reconstruct_api(image, *form):
            """The portrait first; every other input defaults to the command line's. Returns the
            turntable MP4, the GLB and the whole run folder as a zip."""
            *_, (_, out, _) = follow(image, *form)  # to the end: the run has ended
            found = results_of(out)
            return found["turntable"], found["model"], str(portrait_app.zip_run(out))

        def show_earlier(name):
            from dp360.errors import Dp360Error

            try:
                text, found = portrait_app.reopen(name or "")
            except Dp360Error as error:
                raise gr.Error(str(error)) from None
            return show(text, found)

        refresh.click(
            lambda: gr.Dropdown(choices=portrait_app.earlier_runs()), outputs=earlier, api_visibility="private"
        )
        reopen.click(show_earlier, inputs=earlier, outputs=outputs, api_name="reopen")
        example.click(lambda: str(EXAMPLE), outputs=portrait)
        inputs = [portrait, views, steps, guidance, seed, field_kind, mesh_format, no_crop, yaw, pitch, texture]
        # one run at a time on the machine, from the page and the API alike
        shared = dict(concurrency_id="run", concurrency_limit=1)
        event = run.click(
            reconstruct_page, inputs=inputs, outputs=outputs, api_name="run", api_visibility="undocumented", **shared
        )
        cancel.click(None, cancels=[event])
        with gr.Row(visible=False):
            api_trigger = gr.Button()
            # a file, not an image: the API's caller gets dp360's sentence for what is not a portrait
            # (an Image input would refuse it in Gradio's own words first)
            api_portrait = gr.File(label="portrait", file_count="single", type="filepath")
            api_outputs = [gr.File(label="turntable"), gr.File(label="mesh"), gr.File(label="run folder")]
        api_inputs = [api_portrait, *inputs[1:]]
        api_trigger.click(reconstruct_api, inputs=api_inputs, outputs=api_outputs, api_name="reconstruct", **shared)
    return page.queue(default_concurrency_limit=1)


def _angle_text(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _angle(text: str | None, name: str) -> float | None:
    """A pose override from the form: empty is none (the estimated pose); anything else a number."""
    from dp360.errors import Dp360Error

    if text is None or not str(text).strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise Dp360Error(
            f"{name} must be a number of degrees, or empty for the estimated pose, not {text!r}."
        ) from None


def _auth(value: str | None) -> tuple[str, str] | None:
    from dp360.errors import Dp360Error

    value = value or os.environ.get(AUTH_VARIABLE)
    if not value:
        return None
    if Path(value).is_file():  # a file holding USER:PASSWORD keeps the password out of the process list
        lines = Path(value).read_text().splitlines()
        value = lines[0].strip() if lines else ""
    user, colon, password = value.partition(":")
    if not (colon and user and password):
        raise Dp360Error(
            f"--auth (or {AUTH_VARIABLE}) must be USER:PASSWORD, both non-empty, or a file whose first line is that."
        )
    return user, password


@with_options(*APP_GROUPS)
def serve_app(
    runs: Annotated[
        Path, typer.Option("--runs", help="Folder of the app's run folders (one per portrait; created).")
    ] = DEFAULT_RUNS,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on, 1 to 65535 (0 picks a free one).")] = 7860,
    auth: Annotated[
        Optional[str],
        typer.Option(
            "--auth",
            help=f"USER:PASSWORD asked of every visitor, or a file holding it (or ${AUTH_VARIABLE}).",
            show_default=False,
        ),
    ] = None,
    *,
    options: SimpleNamespace,
) -> None:
    """Serve the web app: upload a portrait (or take the example), follow each stage, get the views,
    turntable, mesh (3D view) and downloads. Every option of `reconstruct` sets the form's defaults.

    Prints the URL on stdout and serves until Ctrl-C. One run at a time; the others queue.
    """
    from dp360.serving import check_address

    with user_errors():
        credentials = _auth(auth)
        address = check_address(host, port)  # before anything loads: a bad or taken address is one sentence
        runs.mkdir(parents=True, exist_ok=True)
        page = build_page(PortraitApp(options, runs))
    note = address.network_note("the app")
    if note:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    page.launch(
        server_name=address.host,
        server_port=address.port,
        share=False,
        auth=credentials,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        allowed_paths=[str(runs.resolve()), str(EXAMPLE.parent)],
    )
    typer.echo(address.url)
    err_console.print("Serving the app; press Ctrl-C to stop.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
