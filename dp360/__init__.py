"""dp360: one portrait to 32 consistent 360-degree head views (DiffPortrait360), a radiance field,
a turntable video and a mesh. Everything the `dp360` command does is callable from here."""

__version__ = "0.1.0"
