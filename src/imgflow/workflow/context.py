"""What the steps share while the workflow runs: its settings, the clock, the typed state, and
the data as the evaluation protocol splits it (loaded once per invocation)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from imgflow.workflow.record import WorkflowState


@dataclasses.dataclass
class Context:
    """What the steps share while the workflow runs (rebuilt on resume from workflow.json)."""

    data: str
    out: Path
    seed: int
    budget_seconds: float
    started: float  # time.perf_counter() at this invocation's start
    elapsed_before: float  # seconds spent by earlier, interrupted invocations
    progress: bool
    state: WorkflowState  # decisions later steps need; saved in workflow.json
    save: Callable[[], None] = lambda: None  # writes workflow.json with the state so far
    threads: int | None = None  # CPU threads for training (None: one per core, or $OMP_NUM_THREADS)
    # Where every run trains and every probe measures (--device). Not a plan's setting: a workflow
    # continued on another device continues its plans there (train warns that it may not be bit
    # for bit the same).
    device: str = "auto"
    backbone: str | None = None  # --backbone as given (hf:<directory or hub id>); None: the default, if cached
    backbone_dir: str | None = None  # the local directory its weights are read from
    # The loaded data set, keyed by its test hold-out, so the steps decode/read it once.
    loaded: tuple[float, Any] | None = dataclasses.field(default=None, repr=False)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def remaining(self) -> float:
        return max(self.budget_seconds - self.elapsed(), 0.0)


def dataset(ctx: Context):
    """The data set with the workflow's test hold-out, loaded once per invocation."""
    from imgflow.runs import load_run_data

    test_split = ctx.state.test_split or 0.0
    if ctx.loaded is None or ctx.loaded[0] != test_split:
        loaded = load_run_data({"data": ctx.data, "test_split": test_split, "image_size": ctx.state.image_size},
                               progress=ctx.progress)
        ctx.loaded = (test_split, loaded)
    return ctx.loaded[1]


def train_part(ctx: Context):
    """The training split: all the exploration steps may see (the test split stays untouched)."""
    return dataset(ctx).train


def protocol_split(ctx: Context):
    """(training part, validation part) as the exploration runs see them; fold 0 under k-fold."""
    from imgflow.data.splits import kfold_split, split_train_val, stratified_subset

    train = train_part(ctx)
    protocol = ctx.state.protocol
    if protocol.k_fold:
        return kfold_split(train, protocol.folds, 0, ctx.seed)
    part, val = split_train_val(train, protocol.val_split, "stratified", ctx.seed)
    return part, stratified_subset(val, protocol.val_subset or 0, ctx.seed)


def base_settings(ctx: Context) -> dict[str, Any]:
    """The training settings every exploration run shares: seed, data, protocol, threads."""
    protocol = ctx.state.protocol
    settings = dict(seed=ctx.seed, normalize="standardize", test_split=ctx.state.test_split or 0.0,
                    precision="auto", threads=ctx.threads, image_size=ctx.state.image_size)
    if protocol.k_fold:
        settings.update(folds=protocol.folds, fold=0)
    else:
        settings.update(val_split=protocol.val_split, val_mode="stratified", val_subset=protocol.val_subset or 0)
    return settings
