"""Where the networks run: the phase offload plan (--offload), group offloading (--low-vram),
torch.compile (--compile), their validation, and the background writer of the views stage.
Tiny seeded models on the CPU: a recorder stands in for the GPU."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from dp360.diffusion.models.components import BACK_COMPONENTS, MAIN_COMPONENTS
from dp360.diffusion.models.configs import TINY
from dp360.diffusion.models.tiny import tiny_components
from dp360.diffusion.pipelines.offload import (
    LOW_VRAM_LAYOUT,
    PhaseOffload,
    compile_problem,
    parameterised_components,
    plan_gaps,
)
from dp360.diffusion.pipelines.portrait360 import BackViewPipeline, Portrait360Pipeline
from dp360.errors import Dp360Error

PIPELINES = {"main": (Portrait360Pipeline, MAIN_COMPONENTS), "back": (BackViewPipeline, BACK_COMPONENTS)}


def _pipeline(kind):
    cls, names = PIPELINES[kind]
    pipeline = cls(scheduler=DDIMScheduler(**TINY.scheduler), **tiny_components(names))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    make = lambda: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noqa: E731
    return {"front": make(), "back": make(), "cameras": [make() for _ in range(8)], "noise": [make() for _ in range(8)]}


def _call(pipeline, inputs, steps=1):
    generator = torch.Generator().manual_seed(0)
    if isinstance(pipeline, Portrait360Pipeline):
        return pipeline(
            inputs["front"],
            inputs["back"],
            inputs["cameras"],
            inputs["noise"],
            num_inference_steps=steps,
            generator=generator,
            output_type="np",
        ).images
    return pipeline(
        inputs["front"], inputs["cameras"][0], num_inference_steps=steps, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_every_component_is_planned(kind):
    """Every registered component with weights is in a phase of the offload plan and has a
    low-VRAM layout; a component added without a plan is refused."""
    pipeline = _pipeline(kind)
    components = parameterised_components(pipeline)
    assert set(components) == set(PIPELINES[kind][1])
    assert plan_gaps(pipeline) == ([], [])
    assert set(components) <= set(LOW_VRAM_LAYOUT)
    assert set(pipeline.offload_plan["denoise"]) == set(components) - {"vae", "text_encoder"}


class _BackWithExtra(BackViewPipeline):
    """A pipeline that gained a component with weights and no place in the plan."""

    def __init__(self, vae, text_encoder, unet, reference_unet, controlnet, scheduler, extra):
        super().__init__(vae, text_encoder, unet, reference_unet, controlnet, scheduler)
        self.register_modules(extra=extra)


def test_a_component_without_a_plan_is_refused():
    pipeline = _BackWithExtra(
        scheduler=DDIMScheduler(**TINY.scheduler), extra=nn.Linear(2, 2), **tiny_components(BACK_COMPONENTS)
    )
    assert plan_gaps(pipeline) == (["extra"], [])
    with pytest.raises(ValueError, match="unplanned.*extra"):
        pipeline.enable_phase_offload("cpu")
    with pytest.raises(ValueError, match="extra"):
        pipeline.enable_low_vram("cpu")


class RecordingOffload(PhaseOffload):
    """Execution and offload device are both the CPU; where each network "is" is kept here,
    every move is recorded, and each network checks that it is on the device when it runs."""

    def __init__(self, pipeline):
        super().__init__(pipeline, "cpu", "cpu")
        self.offload_device = torch.device("meta")  # a label only: `move` below moves nothing
        self.location = {name: "offload" for name in self.modules}
        self.moves: list[tuple[str, str, str]] = []
        self.misplaced: list[tuple[str, str]] = []
        for name, module in self.modules.items():
            for inner_name, inner in module.named_modules():
                if any(True for _ in inner.parameters(recurse=False)):
                    inner.register_forward_pre_hook(self._checker(name, inner_name))

    def _checker(self, name, inner_name):
        def check(*_):
            if self.location[name] != "device":
                self.misplaced.append((self.phase, f"{name}.{inner_name}"))

        return check

    def where(self, name):
        return self.device if self.location[name] == "device" else self.offload_device

    def move(self, name, device):
        target = "device" if device == self.device else "offload"
        self.location[name] = target
        self.moves.append((self.phase_entering, name, target))

    def enter(self, phase):
        self.phase_entering = phase
        super().enter(phase)


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_phase_offload_has_each_network_on_the_device_when_it_runs(kind, inputs):
    pipeline = _pipeline(kind)
    plain = _call(pipeline, inputs)
    recorder = RecordingOffload(pipeline)
    pipeline._phase_offload = recorder
    assert pipeline._execution_device == torch.device("cpu")
    assert np.array_equal(_call(pipeline, inputs), plain)  # the plan moves weights, not results
    assert recorder.misplaced == []
    denoising = (
        ["unet", "temporal", "reference_unet", "controlnet"]
        if kind == "main"
        else ["unet", "reference_unet", "controlnet"]
    )
    expected = [
        ("prompt", "text_encoder", "device"),
        ("encode", "text_encoder", "offload"),
        ("encode", "vae", "device"),
        ("denoise", "vae", "offload"),
        *[("denoise", name, "device") for name in denoising],
        *[("decode", name, "offload") for name in sorted(denoising, key=list(recorder.modules).index)],
        ("decode", "vae", "device"),
        ("idle", "vae", "offload"),
    ]
    assert recorder.moves == expected  # idle ones leave before the phase's own arrive
    assert set(recorder.location.values()) == {"offload"}  # nothing left on the device after a call
    recorder.moves.clear()
    _call(pipeline, inputs, steps=3)
    assert recorder.moves == expected and recorder.misplaced == []  # nothing moves between steps


class _Onloaded:
    """Which tensors group offloading has on its onload device (both devices are the CPU here)."""

    def __init__(self):
        self.ids: set[int] = set()
        self.misplaced: list[str] = []

    @staticmethod
    def tensors(group):
        found = list(group.parameters) + list(group.buffers)
        for module in group.modules:
            found += list(module.parameters()) + list(module.buffers())
        return found

    def checked(self, forward):
        def run(module, *args, **kwargs):
            own = list(module.parameters(recurse=False))
            if own and not all(id(tensor) in self.ids for tensor in own):
                self.misplaced.append(type(module).__name__)
            return forward(module, *args, **kwargs)

        return run


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_low_vram_has_every_weight_onloaded_when_it_runs(kind, inputs, monkeypatch):
    """Group offloading of every component (onto the CPU here, where it changes nothing): each
    layer's weights are onloaded whenever the layer runs, whatever entry point calls it (VAE
    encode/decode, the temporal modules called from the UNet's hooks, the ControlNet's camera
    embedding called directly), and the result is unchanged."""
    from diffusers.hooks.group_offloading import ModuleGroup

    pipeline = _pipeline(kind)
    plain = _call(pipeline, inputs)
    onloaded = _Onloaded()
    for layer in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
        monkeypatch.setattr(layer, "forward", onloaded.checked(layer.forward))
    original_onload, original_offload = ModuleGroup.onload_, ModuleGroup.offload_

    def onload(group):
        original_onload(group)
        onloaded.ids.update(id(tensor) for tensor in onloaded.tensors(group))

    def offload(group):
        original_offload(group)
        onloaded.ids.difference_update(id(tensor) for tensor in onloaded.tensors(group))

    monkeypatch.setattr(ModuleGroup, "onload_", onload)
    monkeypatch.setattr(ModuleGroup, "offload_", offload)
    pipeline.enable_low_vram("cpu")
    assert onloaded.ids == set()  # everything starts offloaded
    assert np.array_equal(_call(pipeline, inputs), plain)
    assert onloaded.misplaced == []


def test_memory_options_are_validated():
    from dp360.diffusion.stage import ViewModels, check_memory_options

    with pytest.raises(Dp360Error, match="pass one"):
        check_memory_options(True, True, False)
    with pytest.raises(Dp360Error, match="--compile does not combine with --low-vram"):
        check_memory_options(False, True, True)
    with pytest.raises(Dp360Error, match="saves nothing on cpu"):
        check_memory_options(False, True, False, "cpu")
    with pytest.raises(Dp360Error, match="pass one"):
        ViewModels("m", "b", "c", offload=True, low_vram=True)
    check_memory_options(True, False, False, "cpu")  # --offload on the CPU: accepted, moves nothing
    if compile_problem("cpu") is None:
        check_memory_options(False, False, True, "cpu")


def test_low_vram_is_refused_before_any_work(cli, tmp_path, astronaut_path):
    out = tmp_path / "o"
    for extra in (["--low-vram", "--device", "cpu"], ["--low-vram", "--offload"]):
        code, _, stderr = cli(
            "views", astronaut_path, "--out", out, "--detector", "dlib", "--weights-dir", tmp_path / "w", *extra
        )
        assert code == 2 and stderr.startswith("error: ") and "--low-vram" in stderr and "Traceback" not in stderr
        assert not out.exists()
    code, _, stderr = cli("reconstruct", astronaut_path, "--out", out, "--low-vram", "--device", "cpu")
    assert code == 2 and "saves nothing" in " ".join(stderr.split()) and not out.exists()


@pytest.mark.skipif(compile_problem("cpu") is not None, reason="torch.compile cannot run on this CPU")
def test_compiled_networks_give_the_same_views(inputs):
    """--compile on the CPU (dynamo with its eager backend, to keep the test short): the same
    views, and no step after the first compiles again."""
    from torch._dynamo.utils import counters

    pipeline = _pipeline("back")
    plain = _call(pipeline, inputs, steps=2)
    pipeline.enable_compile(backend="eager")
    try:
        compiled = _call(pipeline, inputs, steps=1)
        graphs = counters["stats"]["unique_graphs"]
        assert np.allclose(_call(pipeline, inputs, steps=2), plain, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs and compiled.shape == plain.shape
    finally:
        torch._dynamo.reset()


def test_background_writer_writes_and_propagates_errors(tmp_path):
    from dp360.diffusion.stage import BackgroundWriter
    from dp360.imaging import save_image_atomic

    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    save_image_atomic(tmp_path / "direct.png", image)
    with BackgroundWriter(workers=2) as writer:
        for index in range(5):
            writer.submit(save_image_atomic, tmp_path / f"{index}.png", image)
    assert all((tmp_path / f"{index}.png").read_bytes() == (tmp_path / "direct.png").read_bytes() for index in range(5))

    def fail(path):
        raise OSError(f"disk full writing {path}")

    writer = BackgroundWriter(workers=2)
    writer.submit(save_image_atomic, tmp_path / "ok.png", image)
    writer.submit(fail, tmp_path / "bad.png")
    with pytest.raises(OSError, match="disk full"):
        writer.join()
    assert (tmp_path / "ok.png").is_file()


class _FakePipeline:
    """Stands in for a loaded bundle in the views stage: records how it was set up and called."""

    def __init__(self, kind, device, log):
        self.kind, self.log = kind, log
        log.append((kind, "load", device))

    def enable_phase_offload(self, device):
        self.log.append((self.kind, "phase_offload", device))

    def enable_low_vram(self, device):
        self.log.append((self.kind, "low_vram", device))

    def enable_compile(self):
        self.log.append((self.kind, "compile", None))

    def __call__(self, front, *args, on_decoded=None, **kwargs):
        from types import SimpleNamespace

        from PIL import Image

        if self.kind == "back":
            return SimpleNamespace(images=[Image.new("RGB", (16, 16), (9, 9, 9))])
        views = [Image.new("RGB", (16, 16), (index, 0, 0)) for index in range(len(args[1]))]
        for first in range(0, len(views), 8):
            on_decoded(first, views[first : first + 8])
        return SimpleNamespace(images=views, chunks=[[0]])


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, [("load", "cuda")]),
        ({"offload": True}, [("load", "cpu"), ("phase_offload", "cuda")]),
        ({"low_vram": True}, [("load", "cpu"), ("low_vram", "cuda")]),
        ({"offload": True, "compile_models": True}, [("load", "cpu"), ("phase_offload", "cuda"), ("compile", None)]),
    ],
)
def test_views_stage_sets_up_both_pipelines_and_writes_every_file(tmp_path, monkeypatch, options, expected):
    from PIL import Image

    import dp360.diffusion.models.bundle as bundle
    import dp360.diffusion.stage as stage

    log = []
    monkeypatch.setattr(
        bundle, "load_bundle", lambda path, device, dtype, kind="main": _FakePipeline(path.name, device, log)
    )
    monkeypatch.setattr(stage, "check_memory_options", lambda *args: None)  # no GPU here
    run_dir, views = tmp_path / "run", tmp_path / "views"
    (run_dir / "prepared").mkdir(parents=True)
    views.mkdir()
    Image.new("RGB", (16, 16)).save(run_dir / "prepared" / "crop.png")
    cameras = tmp_path / "cameras"
    cameras.mkdir()
    for index in range(16):
        Image.new("RGB", (16, 16)).save(cameras / f"{index:03d}.png")
    models = stage.ViewModels(tmp_path / "main", tmp_path / "back", cameras, **options)
    summary = models.build_views(run_dir, views, stage.ViewSettings(steps=1, views=16), "cuda", "fp16")
    assert log == [(kind, *step) for kind in ("back", "main") for step in expected]
    assert summary["views"] == 16
    names = sorted(path.name for path in views.iterdir())
    assert names == sorted(
        [f"{k:03d}.png" for k in range(16)] + ["back_ref.png", "grid.png", "orbit.mp4", "transforms.json"]
    )
    assert np.asarray(Image.open(views / "005.png"))[0, 0, 0] == 5
