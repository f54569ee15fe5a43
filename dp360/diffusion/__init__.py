"""The DiffPortrait360 subsystem: models/ (reference attention, camera ControlNet wiring,
view-consistency modules, official checkpoint conversion), pipelines/ (BackViewPipeline,
Portrait360Pipeline, diffusers-style) and stage.py (back view + 360 views of a run)."""
