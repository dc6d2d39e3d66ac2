"""The lr-find figure: training loss against learning rate, the valley and the suggestion marked.

Like every figure here it takes plain lists and numbers (what lr_find.csv holds plus the
suggestion), never the objects of a live range test, and shares the reports' style.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from imgflow.reports.figures import MUTED, TRAIN, VAL, WRONG, _figure


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float,
                   valley: tuple[float, float], path: Path, title: str = "lr-find") -> Path:
    """Loss per step (faint) and its smoothed curve against lr on a log axis, the valley shaded
    and the suggested lr marked; written to `path` as a PNG, atomically. Returns `path`."""
    with _figure(path, 7, 4.2) as fig:
        ax = fig.subplots()
        ax.plot(lrs, losses, color=TRAIN, alpha=0.3, linewidth=1, label="loss of each step")
        ax.plot(lrs, smoothed, color=TRAIN, label="smoothed loss")
        ax.axvspan(*valley, color=VAL, alpha=0.15, label=f"valley: lr {valley[0]:.1e} to {valley[1]:.1e}")
        at = float(np.interp(np.log(suggestion), np.log(lrs), smoothed))
        ax.axvline(suggestion, color=WRONG, linestyle="--", linewidth=1.2)
        ax.plot([suggestion], [at], "o", color=WRONG, markersize=7, label=f"suggested lr {suggestion:.1e}")
        ax.set_xscale("log")
        ax.set_ylim(*_loss_limits(losses, smoothed))
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.legend(loc="lower left", labelcolor=MUTED)  # low rates: the loss is still high there
    return Path(path)


def _loss_limits(losses: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float]:
    """y limits that show the fall: a diverging loss reaches 1e8 and would flatten everything
    before it, so the top is a little above the smoothed curve before its lowest point."""
    lowest = int(np.argmin(smoothed))
    top = 1.15 * max(max(smoothed[:lowest + 1]), float(np.median(losses[:lowest + 1])))
    bottom = min(min(losses[:lowest + 1]), min(smoothed))
    return bottom - 0.05 * (top - bottom), top



def range_test_figure(found, path: Path, title: str) -> Path:
    """lr_find_figure of what imgflow.training.lr_find.lr_find returned (read by attribute)."""
    return lr_find_figure(found.lrs, found.losses, found.smoothed, found.suggestion, found.valley, path, title)
