"""`eval/metrics.png`: the metrics against yaw around the orbit (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (key, label) per panel: the truth metrics, then the consistency score's
_TRUTH_PANELS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("csim", "CSIM (front)"))
_CONSISTENCY_PANELS = (("psnr", "field vs view PSNR (dB)"), ("lpips", "field vs view LPIPS"), ("csim", "CSIM vs input"))


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = sorted((row["yaw"], row[key]) for row in rows if isinstance(row.get(key), (int, float)))
    return [yaw for yaw, _ in points], [value for _, value in points]


def plot_metrics(path: str | Path, truth: dict[str, Any] | None, consistency: dict[str, Any] | None) -> Path | None:
    """Write the plot; None when there is nothing to plot."""
    # A bare Figure (no pyplot): no global backend switch in the caller's process, no display.
    from matplotlib.figure import Figure

    from ..atomic import atomic_path

    panels = []
    if truth:
        panels += [(f"truth: {label}", truth["frames"], key) for key, label in _TRUTH_PANELS]
    if consistency:
        panels += [(f"consistency: {label}", consistency["views"], key) for key, label in _CONSISTENCY_PANELS]
    if not panels:
        return None
    columns = 4 if truth else 3
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(3.4 * columns, 2.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (title, data, key) in zip(axes.flat, panels):
        axis.axvspan(-180, -90, color="#eeeeee")
        axis.axvspan(90, 180, color="#eeeeee")  # the back (|yaw| > 90)
        yaws, values = _series(data, key)
        if values:
            axis.plot(yaws, values, "o-", markersize=3, linewidth=1, color="#3868c8")
        else:
            axis.text(0, 0.5, "not available", ha="center", va="center", transform=axis.get_xaxis_transform())
        axis.set_xlim(-180, 180)
        axis.set_xticks([-180, -90, 0, 90, 180])
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("yaw (degrees; grey: back)", fontsize=8)
        axis.tick_params(labelsize=7)
    label = truth["candidate"] if truth else None
    figure.suptitle(f"dp360 eval{': ' + label if label else ''}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    return path
