"""Learning-rate schedules as pure functions of the optimiser step."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str = "constant",
          warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Learning rate for optimiser step `step` (0-based) of `total_steps`.

    constant: peak_lr throughout (warmup, if any, still ramps up linearly).
    onecycle: linear warmup to peak_lr, then linear decay to final_fraction * peak_lr.
    cosine:   linear warmup, then half a cosine down to final_fraction * peak_lr.
    """
    assert 0 <= step < max(total_steps, 1), f"step {step} outside [0, {total_steps})"
    if warmup_steps > 0 and step < warmup_steps:
        # Ramp from peak/warmup (not 0) so the first step is not wasted.
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    floor = final_fraction * peak_lr
    if schedule == "onecycle":
        return floor + (peak_lr - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
