"""Portrait preparation: face detection, PanoHead crop, head pose -> camera label."""

from .stage import PrepareResult, PrepareSettings, prepare_portrait

__all__ = ["PrepareResult", "PrepareSettings", "prepare_portrait"]
