"""The generic runner and the stage interface: each stage sees only its own config, configs are
checked before any work, and loaded models live in a model cache that a run frees and a batch
worker keeps."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from dp360.errors import Dp360Error
from dp360.imaging import load_portrait
from dp360.pipeline.registry import RunConfig, pipeline_stages, portrait_config, views_run_config, views_run_stages
from dp360.pipeline.runner import Run, RunOptions, check_run_settings, run_stages
from dp360.pipeline.stage import ModelCache, Stage, StageContext


@dataclass
class Colour:
    """A stage config of a test: checks itself, refusing a negative value."""

    value: int
    checked_on: list[str]

    def check(self, device: str) -> None:
        self.checked_on.append(device)
        if self.value < 0:
            raise Dp360Error(f"The colour must be at least 0, not {self.value}.")


def _writer(name: str, seen: dict) -> Stage:
    def build(context: StageContext, folder):
        seen[name] = context.config
        (folder / f"{name}.txt").write_text(str(context.config.value if context.config else None))
        return {"wrote": name}

    return Stage(
        name=name,
        folder=name,
        description=f"the {name} stage of a test",
        config={"first": "red", "second": "red", "third": "blue", "plain": None}[name],
        settings=lambda context: {"value": context.config.value if context.config else None},
        inputs=lambda context: {},
        build=build,
    )


def _portrait(tmp_path):
    path = tmp_path / "portrait.png"
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(path)
    return load_portrait(path)


def test_each_stage_sees_its_own_config_only_and_the_runner_names_no_stage(tmp_path):
    seen: dict = {}
    checks: list[str] = []
    red, blue = Colour(1, checks), Colour(2, checks)
    stages = tuple(_writer(name, seen) for name in ("first", "second", "third", "plain"))
    config = RunConfig({"red": red, "blue": blue})
    options = RunOptions(device="cpu", progress=False)
    device, dtype = check_run_settings(options, stages, config)
    assert checks == ["cpu", "cpu"]  # each config once, though two stages share "red"
    run = Run(tmp_path / "run", options)
    context = StageContext(tmp_path / "run", None, device, dtype, False, None)
    summary = run_stages(run, _portrait(tmp_path), stages, context, config)
    assert summary.status == "done"
    assert seen == {"first": red, "second": red, "third": blue, "plain": None}
    assert (tmp_path / "run" / "third" / "third.txt").read_text() == "2"
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["stages"]["third"]["settings"] == {"value": 2}


def test_a_bad_config_is_refused_before_any_work_and_a_missing_one_is_named(tmp_path):
    stages = tuple(_writer(name, {}) for name in ("first", "third"))
    with pytest.raises(Dp360Error, match="at least 0, not -3"):
        check_run_settings(RunOptions(device="cpu"), stages, RunConfig({"red": Colour(-3, []), "blue": Colour(1, [])}))
    with pytest.raises(Dp360Error, match="no 'blue' configuration, which the third stage reads"):
        RunConfig({"red": Colour(1, [])}).of(stages[1])
    assert not (tmp_path / "run").exists()


def test_every_stage_reads_a_config_its_kind_of_run_provides():
    portrait, imported = portrait_config(), views_run_config()
    for stage in pipeline_stages():
        assert stage.config is None or stage.config in portrait.configs, stage.name
    for stage in views_run_stages():
        assert stage.config is None or stage.config in imported.configs, stage.name
    # the noise stage follows the views' view count and --no-3d-noise, without reading their config
    from dp360.diffusion.stage import ViewSettings

    config = portrait_config(views=ViewSettings(views=16, use_3d_noise=False))
    assert config.configs["noise"].settings.views == 16 and config.configs["noise"].enabled is False
    # the run's seed is the views' and the inversion's; the caller's settings are left as they were
    mine = ViewSettings(views=16, seed=1)
    config = portrait_config(seed=7, views=mine)
    assert config.configs["views"].settings.seed == config.configs["noise"].settings.seed == 7
    assert mine.seed == 1 and config.configs["views"].settings.views == 16


def test_the_model_cache_loads_once_when_it_keeps_and_at_every_use_otherwise():
    loaded = []

    def load():
        loaded.append(object())
        return loaded[-1]

    fresh = ModelCache()
    first, second = fresh.model("main", ("bundle", "cpu"), load), fresh.model("main", ("bundle", "cpu"), load)
    assert first is not second and fresh.loads == {"main": 2}
    kept = ModelCache(keep=True)
    first, second = kept.model("main", ("bundle", "cpu"), load), kept.model("main", ("bundle", "cpu"), load)
    other = kept.model("main", ("bundle", "cuda"), load)
    assert first is second and other is not first and kept.loads == {"main": 2}
    calls = []
    assert fresh.value(("cameras", 16), lambda: calls.append(1) or "dir") == "dir"
    assert fresh.value(("cameras", 16), lambda: calls.append(1) or "other") == "dir" and calls == [1]
    assert fresh.known(("cameras", 16)) == "dir" and fresh.known(("cameras", 8)) is None
