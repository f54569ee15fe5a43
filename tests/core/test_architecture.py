"""The import graph stays layered: no import circle among dp360's and the CLI's modules, imports
inside functions included (TYPE_CHECKING imports are not imports at run time). `make lint` checks
the layers themselves (.importlinter); this test names a circle as soon as one appears."""

from __future__ import annotations

import grimp


def _circles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circles():
    graph = grimp.build_graph("dp360", "cli", exclude_type_checking_imports=True)
    assert len(graph.modules) > 50  # the packages were found
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _circles(graph) == [["a.x", "a.y"]]


def test_every_stage_writes_into_a_folder_the_layout_names():
    from dp360 import layout
    from dp360.pipeline.registry import pipeline_stages, views_run_stages

    folders = {layout.PREPARED, layout.NOISE, layout.VIEWS, layout.NERF, layout.EXPORT, layout.EVAL}
    assert {stage.folder for stage in (*pipeline_stages(), *views_run_stages())} == folders
    run = layout.RunLayout("/runs/head")
    assert run.crop.as_posix() == "/runs/head/prepared/crop.png" and (run / layout.MESH).name == "head.glb"
    assert layout.name_of(layout.SPLATS) == "head.splat.ply" and run.views.parent == run.root


def test_each_command_runs_promises_and_requires_stages_of_its_kind_of_run_in_order():
    from dp360.pipeline.recipes import recipes
    from dp360.pipeline.registry import pipeline_stages, views_run_stages

    portrait_order = [stage.name for stage in pipeline_stages()]
    views_order = [stage.name for stage in views_run_stages()]
    assert set(recipes()) == {"prepare", "views", "reconstruct", "fit"}
    for name, recipe in recipes().items():
        order = views_order if name == "fit" else portrait_order
        assert list(recipe.stages) == [stage for stage in order if stage in recipe.stages], name
        assert set(recipe.require) <= set(recipe.stages) and set(recipe.promised) <= set(recipe.stages), name
    assert recipes()["reconstruct"].missing({"render": {"status": "done"}}) == ["export"]
