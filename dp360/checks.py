"""The settings checks every layer shares: one sentence naming the option and its allowed range.
The bottom layer: it knows no stage."""

from __future__ import annotations

import math
from typing import Any

from .errors import Dp360Error

# The seed feeds torch, numpy and Python's random: numpy's generator takes 32-bit seeds.
SEED_MAX = 2**32 - 1


def check_int(option: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Dp360Error(f"{option} must be a whole number from {low} to {high}, not {value!r}.")


def check_float(option: str, value: Any, low: float, high: float) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not low <= number <= high:
        raise Dp360Error(f"{option} must be a finite number from {low:g} to {high:g}, not {value!r}.")


def check_seed(seed: Any) -> None:
    check_int("--seed", seed, 0, SEED_MAX)
