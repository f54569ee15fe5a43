"""The README's "Using dp360 from Python" snippets run, so that they cannot silently rot.

Convention (stated in the README under the snippets): the section's ```python blocks run in
order, in one namespace, in a temporary working folder that holds `portrait.png` (the bundled
example portrait). After each top-level assignment to a name the `tiny` fixture provides
(`models`, `noise_models`, `view_settings`, `noise_settings`, `field_settings`), the README's value is
checked (same type as the tiny one, and its own `check()` passes where it has one) and the name
is rebound to the tiny value: random tiny models, 2 steps, 8 views, a 30-iteration fit. Every
other line runs as written. The README's relative links and in-page anchors are checked here too.
"""

from __future__ import annotations

import ast
import re
import shutil

import pytest

from ..conftest import ASTRONAUT, REPO

README = REPO / "README.md"
SECTION = "## Using dp360 from Python"
SUBSTITUTE = "_readme_substitute"


def python_blocks(text: str) -> list[str]:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def with_substitutions(source: str, names: set[str]) -> ast.Module:
    """`source` with `name = _readme_substitute("name", name)` after each top-level `name = ...`."""
    tree = ast.parse(source)
    body = []
    for node in tree.body:
        body.append(node)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in names:
                body.append(ast.parse(f"{name} = {SUBSTITUTE}({name!r}, {name})").body[0])
    tree.body = body
    return ast.fix_missing_locations(tree)


@pytest.fixture(scope="module")
def tiny(tiny_weights) -> dict:
    from dp360.diffusion.stage import ViewModels, ViewSettings
    from dp360.nerf.common import FitSettings
    from dp360.nerf.mesh import MeshSettings
    from dp360.nerf.render import TurntableSettings
    from dp360.nerf.stage import FieldStageSettings
    from dp360.panohead.stage import NoiseModels, NoiseSettings

    weights = tiny_weights(8)
    bundles = weights.bundles
    return {
        "models": ViewModels(bundles["main"], bundles["back"], bundles["cameras"]),
        "noise_models": NoiseModels(weights.panohead, weights.backbone),
        "view_settings": ViewSettings(steps=2, views=8),
        "noise_settings": NoiseSettings(invert_steps=2, pti_steps=1),
        "field_settings": FieldStageSettings(
            fit=FitSettings.preset("test", iterations=30, seed=0),
            turntable=TurntableSettings(frames=4, resolution=32),
            mesh=MeshSettings(resolution=32, faces=2000),
        ),
    }


def test_python_snippets_run_on_tiny_models(tiny, tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3, "the README's Python section lost its snippets"
    monkeypatch.chdir(tmp_path)
    shutil.copy(ASTRONAUT, tmp_path / "portrait.png")
    substituted: set[str] = set()

    def substitute(name: str, value):
        replacement = tiny[name]
        assert type(value) is type(replacement), f"README's {name} is a {type(value).__name__}"
        if hasattr(value, "check"):
            value.check()  # the README's own settings are valid
        substituted.add(name)
        return replacement

    namespace: dict = {SUBSTITUTE: substitute, "__name__": "readme"}
    for index, block in enumerate(blocks):
        exec(compile(with_substitutions(block, set(tiny)), f"README.md python block {index + 1}", "exec"), namespace)
    assert substituted == set(tiny), f"the README no longer assigns {sorted(set(tiny) - substituted)}"

    out = tmp_path / namespace["out"]
    assert namespace["summary"].status == "done"
    assert (out / "export" / "head.glb").is_file() and (out / "export" / "turntable.mp4").is_file()
    assert (tmp_path / "crop-only" / "prepared" / "crop.png").is_file()
    assert len(namespace["result"].images) == 8 and (tmp_path / "view-000.png").is_file()


def test_relative_links_and_anchors_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [target for target in targets if not re.match(r"[a-z]+:", target) and not target.startswith("#")]
    assert any(target.endswith(".png") for target in local)
    missing = [target for target in local if not (REPO / target).exists()]
    assert not missing, f"README links to missing files: {missing}"
    slugs = {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in re.findall(r"^#+ (.+)$", text, re.M)
    }
    broken = [target for target in targets if target.startswith("#") and target[1:] not in slugs]
    assert not broken, f"README links to missing headings: {broken}"
