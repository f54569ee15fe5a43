"""The pipeline, in layers: the stage interface and the model cache (`stage`), the one list of
stages and the run's configuration (`registry`), what each command runs and promises (`recipes`),
and the generic runner (`runner`). The library's runs (reconstruct, views, prepare, fit_views) are
in `dp360.run`. This file imports nothing, so the stages can import `stage` from below the rest."""
