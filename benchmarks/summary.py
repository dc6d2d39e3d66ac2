"""What the seed-series benchmarks share: runs grouped by what they measured, mean and sample std."""
from __future__ import annotations

import statistics
from typing import Any, Callable, Hashable


def grouped(runs: list[dict], key: Callable[[dict], Hashable]) -> dict[Any, list[dict]]:
    """The runs by `key(run)`, in the order the keys first appear."""
    groups: dict[Any, list[dict]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
