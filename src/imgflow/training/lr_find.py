"""The learning-rate range test (Smith, arXiv 1506.01186): train a throwaway copy of a run's model
for a few steps with an exponentially growing learning rate and suggest one from the loss curve.

It reuses the engine rather than imitating it: `set_up` builds the data split, preprocessing,
model and optimiser exactly as `train` does for the same config, the batches come from the seeded
`EpochBatches`, and every step is `Learner.train_step`. So the curve describes the run that
config would train, the test is deterministic for a seed (same curve, same suggestion), and it
never touches a run directory: nothing has to be restored afterwards (Lightning#6675 restored a
diverged model), because the model it trained is simply dropped.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from imgflow.errors import UserError
from imgflow.fileio import atomic_write_text
from imgflow.progress import interactive, progress_bar
from imgflow.text import plural
from imgflow.training.config import MAX_LR, TrainConfig
from imgflow.training.loop import TrainResult, set_up, train
from imgflow.training.rundir import check_run_dir, started_config
from imgflow.training.step import TrainingDiverged

log = logging.getLogger(__name__)

BETA = 0.98  # loss smoothing: an exponential moving average over about 1 / (1 - BETA) = 50 steps
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its lowest value
LEARNT, LEARNT_STEPS = 0.01, 5  # a loss below 1% of the first one for 5 steps: nothing left to learn
MIN_STEPS = 10  # fewer points cannot show a valley
CLEAR_FALL = 0.05  # a smoothed loss that fell less than this fraction shows no clear valley
RULE = "valley"
VALLEY_EDGE = 0.2  # the valley runs from where the smoothed loss has done this fraction of its fall to 1 - it
VALLEY_POINT = 0.5  # the suggestion's place in the valley, from its top, in log-lr: its geometric middle
SETTLED = 10  # the first debiased averages rest on fewer losses than this (the first on one batch's)


@dataclass(frozen=True)
class RangeTest:
    """The range test's settings: lr grows geometrically from start_lr to end_lr over `steps`."""

    steps: int = 100  # optimiser steps at most (fewer when the loss diverges first)
    start_lr: float = 1e-7  # lr of the first step
    end_lr: float = 10.0  # lr of the last step

    def validate(self) -> "RangeTest":
        """Raise UserError on settings the test cannot run with; return self for chaining."""
        if self.steps < MIN_STEPS:
            raise UserError(f"--steps must be >= {MIN_STEPS} (a curve needs points to show a valley), "
                            f"got {self.steps}")
        if not 0 < self.start_lr < self.end_lr <= MAX_LR:
            raise UserError(f"--start-lr and --end-lr must satisfy 0 < start < end <= {MAX_LR:g}, got "
                            f"{self.start_lr:g} and {self.end_lr:g}")
        return self

    def lr_at(self, step: int) -> float:
        """The lr of step `step` (0-based): equal steps on a log axis, end_lr at the last one."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))


@dataclass(frozen=True)
class LrFind:
    """A finished range test: the curve, the suggestion and the valley it came from."""

    lrs: list[float]  # the lr of each step taken
    losses: list[float]  # each step's training loss (of its batch, before its update)
    smoothed: list[float]  # debiased moving average of `losses` (BETA)
    suggestion: float  # the suggested lr, rounded to 2 significant digits
    valley: tuple[float, float]  # lr at the valley's top and at its bottom
    fell: float  # how far the smoothed loss fell, as a fraction of its highest value
    stopped: str  # why the test ended
    test: RangeTest

    @property
    def rule(self) -> str:
        """How the suggestion was chosen, in words."""
        top, bottom = self.valley
        return (f"{RULE}: lr {top:.1e} to {bottom:.1e}, where the smoothed loss goes from {1 - VALLEY_EDGE:.0%} "
                f"to {VALLEY_EDGE:.0%} of its fall ({self.fell:.0%}); suggestion: their geometric mean")

    def record(self) -> dict:
        """What a run trained at the suggestion keeps in its config.json."""
        return {"suggestion": self.suggestion, "rule": RULE, "valley": list(self.valley),
                "fell": round(self.fell, 4), "steps_taken": len(self.lrs), "stopped": self.stopped,
                **dataclasses.asdict(self.test)}  # steps (at most), start_lr, end_lr


class _Smoother:
    """Debiased exponential moving average: the plain EMA starts at 0, so it is divided by
    1 - beta**n, which makes the first values the mean of the losses so far instead of ~0."""

    def __init__(self, beta: float = BETA):
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, value: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta ** self.count)


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """The debiased moving average of `losses`, point by point."""
    smoother = _Smoother(beta)
    return [smoother.add(loss) for loss in losses]


class Valley(NamedTuple):
    """Where the valley rule found the fall of a smoothed loss curve (indices into the curve)."""

    top: int  # index of the valley's top (its lowest lr)
    bottom: int  # index of its bottom
    fell: float  # how far the smoothed loss fell, from its highest to its lowest, as a fraction


def valley(smoothed: Sequence[float]) -> Valley:
    """The stretch over which the smoothed loss does the middle of its fall.

    The fall runs from the highest point to the lowest one after it; the valley is where the
    curve goes from VALLEY_EDGE (20%) to 1 - VALLEY_EDGE (80%) of the way down: its bottom is the
    first point in the lowest fifth of the fall, its top the last point before it still in the
    highest fifth. Levels, not slopes: the steepest point of a noisy curve moves with every bump
    (Lightning#21141), a level barely does. And not down to the lowest point: the average trails the loss by ~50 steps
    (4 decades of lr at 100 steps), so its minimum sits where the loss is already blowing up.
    The highest point is sought from step SETTLED on, where the average no longer rests on a
    handful of batches (the first point is one batch's loss).
    """
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    first = min(SETTLED, lowest)
    highest = max(smoothed[first:lowest + 1])
    low, fall = smoothed[lowest], highest - smoothed[lowest]
    bottom = next(i for i in range(first, lowest + 1) if smoothed[i] <= low + VALLEY_EDGE * fall)
    top = max(i for i in range(first, bottom + 1) if smoothed[i] >= low + (1 - VALLEY_EDGE) * fall)
    return Valley(top, bottom, float(fall / highest) if highest > 0 else 0.0)


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, Valley]:
    """The valley rule: the lr in the middle of the valley on a log axis, rounded to 2
    significant digits so that the number printed is the number trained with; and the valley.

    The middle rather than 2/3 of the way down, the point fastai's documentation names (its code
    lands mid-valley too): on the tests' data 2/3 reached rates at which some seeds diverged.
    """
    found = valley(smoothed)
    middle = lrs[found.top] * (lrs[found.bottom] / lrs[found.top]) ** VALLEY_POINT
    return float(f"{middle:.2g}"), found


def _run_range_test(config: TrainConfig, test: RangeTest, progress: bool) -> tuple[list, list, list, str]:
    """Train the test's steps on a fresh model; return (lrs, losses, smoothed, why it stopped)."""
    run = set_up(config, progress)
    learner, batches = run.learner, run.batches
    learner.model.train()
    lrs, losses, smoothed, smoother = [], [], [], _Smoother()
    stopped, best = f"ran all {test.steps} steps", math.inf
    with progress_bar(enabled=progress, total=test.steps, desc="lr-find", unit="step", leave=False) as bar:
        for i in range(test.steps):
            lr = test.lr_at(i)
            # Past the end of an epoch the test goes on into the next one, as training would.
            epoch, step = divmod(i, batches.steps)
            images, labels = batches.batch(epoch, step)
            try:
                _, loss = learner.train_step(images, labels, lr, i + 1, f"lr-find step {i + 1}")
            except TrainingDiverged:
                stopped = f"the loss was not finite at lr {lr:.2g}"
                break
            lrs.append(lr)
            losses.append(loss.item())
            smoothed.append(smoother.add(losses[-1]))
            bar.update(1)
            reason = _why_stop(losses, smoothed, best)
            if reason is not None:
                stopped = f"{reason} at lr {lr:.2g}"
                break
            best = min(best, smoothed[-1])
    return lrs, losses, smoothed, stopped


def _why_stop(losses: list[float], smoothed: list[float], best: float) -> str | None:
    """Why the test should end after its latest step, or None.

    Diverged: the smoothed loss passed DIVERGED times its lowest. Learnt by heart: the loss
    stayed near 0 for LEARNT_STEPS steps (tiny or trivial data): there is no gradient left, so
    higher rates would only show the lagging average falling on, which would drag the valley to
    rates at which the model had nothing left to learn.
    """
    if smoothed[-1] > DIVERGED * best:
        return f"the smoothed loss passed {DIVERGED:g}x its lowest"
    if len(losses) >= LEARNT_STEPS and max(losses[-LEARNT_STEPS:]) < LEARNT * losses[0]:
        return f"the loss stayed below {LEARNT:.0%} of its first value for {LEARNT_STEPS} steps (learnt by heart)"
    return None


def lr_find(config: TrainConfig, test: RangeTest = RangeTest(), progress: bool | None = None) -> LrFind:
    """Run the range test on the model, data and settings of `config` (its lr and schedule are
    not used) and suggest a learning rate. Nothing is written: the trained model is dropped."""
    config.validate()
    test.validate()
    lrs, losses, smoothed, stopped = _run_range_test(config, test, interactive() if progress is None else progress)
    if len(lrs) < MIN_STEPS:
        raise UserError(f"lr-find stopped after {plural(len(lrs), 'step')} ({stopped}), too few to show a "
                        f"valley: lower --start-lr (now {test.start_lr:g})")
    suggestion, found = suggest_lr(lrs, smoothed)
    if found.fell <= 0:
        raise UserError(f"the loss never fell during lr-find ({stopped}): widen the rates tried (now "
                        f"--start-lr {test.start_lr:g} to --end-lr {test.end_lr:g}), or check the data's labels")
    if found.fell < CLEAR_FALL:
        log.warning("lr-find: the smoothed loss fell only %.1f%%, so the curve shows no clear valley and the "
                    "suggestion is a guess: look at the plot, or give more --steps", 100 * found.fell)
    log.info("lr-find: %s, %s", plural(len(lrs), "step"), stopped)
    valley_lrs = (lrs[found.top], lrs[found.bottom])
    return LrFind(lrs, losses, smoothed, suggestion, valley_lrs, found.fell, stopped, test)


def save_curve(found: LrFind, out_dir: Path) -> Path:
    """Write the curve to out_dir/lr_find.csv (lr, loss, smoothed_loss), atomically; return its path."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["lr", "loss", "smoothed_loss"])
    writer.writerows(zip(found.lrs, found.losses, found.smoothed))
    path = Path(out_dir) / "lr_find.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text.getvalue())
    return path


def train_at_found_lr(config: TrainConfig, run_dir: Path, test: RangeTest = RangeTest(), resume: bool = False,
                      overwrite: bool = False, progress: bool | None = None,
                      **train_options) -> tuple[TrainResult, LrFind | None]:
    """`train --lr find`: run the range test on `config`, then train it at the suggested lr, with
    the test's record ("lr_find") in config.json beside "train". Returns the run and the test.

    A resumed run that has its config.json does not search again (None for the test): it
    continues at the lr it started with, the one its config.json holds. The run directory is
    checked before the search, so a refusal costs no search and writes nothing.
    train_options: passed on to `train` (checkpoint_seconds, on_epoch).
    """
    run_dir = Path(run_dir)
    started = started_config(run_dir) if resume else None
    if started is not None:
        log.info("%s continues at the lr it was started with (%g): no new search", run_dir, started.lr)
        config = dataclasses.replace(config, lr=started.lr)
        return train(config, run_dir, resume=True, progress=progress, **train_options), None
    check_run_dir(run_dir, config, resume, overwrite)
    found = lr_find(config, test, progress)
    log.info("lr-find suggests lr %.1e (%s)", found.suggestion, found.rule)
    result = train(dataclasses.replace(config, lr=found.suggestion), run_dir, resume=resume, overwrite=overwrite,
                   progress=progress, record={"lr_find": found.record()}, **train_options)
    return result, found
