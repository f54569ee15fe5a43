"""Fitting a field to the views with nerfstudio, used as a library: the field methods dp360 fits
(`FIELD_METHODS`, the one place that registers them), `fit_field` and `load_field`.

The nerf package in layers, each importing only those below it:
- `common.py`: the fit's settings and presets, record and folder names, the views' background;
- `train.py` (the trainer loop and health checks) and `checkpoint.py` (reading a fit back);
- `method.py` (nerfacto for a head, "dp360-head"), `mesh.py`, `render.py`, `texture.py`;
- `splat.py` (splatfacto, "dp360-splat"); then this module; then `stage.py` (the run's stages).

The nerfacto method is defined once in `method.py` (`head_config`) and registered with
nerfstudio by `plugin.py`, so nerfstudio's own commands (`ns-viewer`, `ns-render`, `ns-export`,
`ns-train dp360-head`) work on a run's field.

Run layout (nerfstudio's own, under `nerf/`): `dp360/dp360-head/fit/config.yml` and
`.../nerfstudio_models/step-*.ckpt`, plus our `fit.json` (settings, background, timings). Runs
made before the method was registered used `dp360/nerfacto-head/fit/`; `load_field` still reads
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Dp360Error
from ..layout import RunLayout
from .checkpoint import ConfigBuilder, LoadedField, load_fitted, read_fit_record
from .common import (
    EXPERIMENT,
    FIT_FILE,
    METHOD,
    SPLAT_METHOD,
    TIMESTAMP,
    FitSettings,
    check_views_folder,
    resolve_background,
)
from .train import train, write_fit


@dataclass(frozen=True)
class FieldMethod:
    """One kind of field dp360 fits (`--field`): its nerfstudio method name (recorded in fit.json),
    how its config is built, how a run's fit stage fits it, and whether it needs a CUDA GPU."""

    name: str  # the --field value
    method: str  # nerfstudio's method name, recorded in fit.json and naming the fit's folder
    build_config: ConfigBuilder
    # (run folder, staging folder, settings, device, progress, note) -> the fit stage's summary
    fit_run: Callable[..., dict[str, Any]]
    needs_cuda: bool  # gsplat rasterises on CUDA only
    reads_panohead_depth: bool  # its fit starts from the PanoHead inversion's depth when there is one
    description: str


# nerfstudio's model code loads in seconds (and warns): the builders import it on first use only,
# so that listing the stages, or a command that fits nothing, does not pay for it.
def _nerfacto_config(*args: Any) -> Any:
    from .method import head_config

    return head_config(*args)


def _splatfacto_config(*args: Any) -> Any:
    from .splat import splat_config

    return splat_config(*args)


def _fit_nerfacto_run(run_dir: Path, folder: Path, settings: FitSettings, device: str, progress: bool, note) -> dict:
    from ..gpu import hash_grid_backend

    backend, detail = hash_grid_backend(device)
    if device.startswith("cuda"):  # on the CPU there is no choice to tell about
        note(f"fit: {detail}")
    run = RunLayout(run_dir)
    return {**fit_field(run.views, folder, settings, device, progress, final_dir=run.nerf), "hash_grid": backend}


def _fit_splatfacto_run(run_dir: Path, folder: Path, settings: FitSettings, device: str, progress: bool, note) -> dict:
    from .splat import fit_splat, pick_seed_points

    run = RunLayout(run_dir)
    # read before the staging folder replaces nerf/: a nerfacto field fitted there earlier can seed the splats
    seeds = pick_seed_points(run_dir, settings.seed, device)
    return fit_splat(run.views, folder, settings, device, progress, final_dir=run.nerf, seed_points=seeds)


FIELD_METHODS = {
    item.name: item
    for item in (
        FieldMethod("nerfacto", METHOD, _nerfacto_config, _fit_nerfacto_run, False, False, "radiance field"),
        FieldMethod(
            "splatfacto", SPLAT_METHOD, _splatfacto_config, _fit_splatfacto_run, True, True, "3D Gaussian splats"
        ),
    )
}


def field_method_of(method: str | None) -> FieldMethod:
    """The field method a fit.json's `method` names (a record without one: nerfacto, as before)."""
    return next((item for item in FIELD_METHODS.values() if item.method == method), FIELD_METHODS["nerfacto"])


def fit_field(
    views_dir: Path,
    out_dir: Path,
    settings: FitSettings,
    device: str = "cpu",
    progress: bool = True,
    final_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the field on `views_dir` into `out_dir` (a fresh folder). Returns a summary.

    `final_dir`: where `out_dir` will be moved afterwards (a stage's staging folder), so that
    nerfstudio's config.yml points at the final checkpoint folder."""
    check_views_folder(views_dir)
    background = resolve_background(views_dir, settings.background)
    config = _nerfacto_config(settings, device, Path(views_dir).resolve(), background)
    trainer, timing = train(config, out_dir, settings, device, progress, "radiance field")
    summary = {
        "method": METHOD,
        "iterations": settings.iterations,
        **timing,
        "background": background,
        "config": f"{EXPERIMENT}/{METHOD}/{TIMESTAMP}/config.yml",
    }
    return write_fit(trainer, config, views_dir, out_dir, final_dir, settings, summary)


def load_field(nerf_dir: Path, device: str = "cpu", views_dir: Path | None = None) -> LoadedField:
    """The fitted field of a run's `nerf/` folder, ready to render (eval mode), built by the method
    its record names. Its files are checked before nerfstudio builds anything, and the weights
    must fill the model exactly."""
    nerf_dir = Path(nerf_dir)
    if not (nerf_dir / FIT_FILE).is_file():
        raise Dp360Error(f"{nerf_dir} holds no fitted field ({FIT_FILE} is missing); run `dp360 reconstruct` first.")
    field_method = field_method_of(read_fit_record(nerf_dir / FIT_FILE)[0].get("method"))
    if field_method.needs_cuda:
        from .splat import require_cuda

        require_cuda(
            device,
            f"This run's field ({field_method.description})",
            "use --device cuda on a CUDA GPU, or rerun `dp360 reconstruct` with --field nerfacto",
        )
    return load_fitted(nerf_dir, device, views_dir, field_method.build_config)
