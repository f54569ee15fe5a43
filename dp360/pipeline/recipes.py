"""What each command runs and promises, declared once: the stages it runs (in the registry's order),
those that must be able to run (else it stops before any work), and those whose results make the
run complete (else it ends `incomplete`, exit status 3). The runner's library calls, the CLI's
summaries and batch's portraits all read them here."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import pipeline_stages, views_run_stages


@dataclass(frozen=True)
class Recipe:
    name: str  # the command: prepare, views, reconstruct, fit
    stages: tuple[str, ...]
    require: tuple[str, ...]
    promised: tuple[str, ...]

    def missing(self, stage_records: dict) -> list[str]:
        """The promised stages that did not end `done` in a run's stage records."""
        return [name for name in self.promised if stage_records.get(name, {}).get("status") != "done"]


def recipes() -> dict[str, Recipe]:
    """Command name -> its recipe."""
    every_stage = tuple(stage.name for stage in pipeline_stages())
    views_run = tuple(stage.name for stage in views_run_stages())
    return {
        recipe.name: recipe
        for recipe in (
            Recipe("prepare", ("prepare",), ("prepare",), ("prepare",)),
            Recipe("views", ("prepare", "noise", "views"), ("prepare", "views"), ("views",)),
            Recipe("reconstruct", every_stage, ("prepare",), ("render", "export")),
            Recipe("fit", views_run, ("import",), ("render", "export")),
        )
    }


def recipe(name: str) -> Recipe:
    return recipes()[name]
