"""The workflow's training runs under OUT/runs: planned once, trained (or continued), scored."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from imgflow.errors import UserError
from imgflow.history import run_history
from imgflow.workflow.context import Context, train_part
from imgflow.workflow.record import Plan


def plan_once(ctx: Context, name: str, make: Callable[[], Plan]) -> Plan:
    """The plan of run `name` (its settings and what they were based on), made only once.

    The plan is saved before the run starts: an interrupted workflow continues that run with
    the same settings, instead of re-planning from a new throughput probe and the budget left
    (which would change the epochs and make the run unresumable).
    """
    if name not in ctx.state.plans:
        ctx.state.plans[name] = make()
        ctx.save()
    return ctx.state.plans[name]


def train_run(ctx: Context, name: str, settings: dict[str, Any]) -> tuple[Path, list[dict]]:
    """Train one run under OUT/runs/NAME (continuing it if an earlier invocation was
    interrupted); return its directory and history."""
    from imgflow.training.config import resolve_config
    from imgflow.training.crew import together
    from imgflow.training.loop import train
    from imgflow.training.rundir import config_differences

    run_dir = ctx.out / "runs" / name
    config = resolve_config(ctx.data, {**settings, "device": ctx.device})
    if diff := config_differences(run_dir, config):
        # Only a workflow.json from before plans were saved can get here.
        raise UserError(f"{run_dir} was started with other settings ({', '.join(diff)}): delete that "
                        "directory and run the same command again to redo this step")
    # Under torchrun every rank trains it (`training.crew`); rank 0 alone shows progress.
    together(train, config, run_dir, resume=run_dir.is_dir(), local={"progress": ctx.progress})
    return run_dir, run_history(run_dir)


def last_val_acc(history: list[dict]) -> float:
    return history[-1]["val_acc"] if history and history[-1]["val_acc"] is not None else float("nan")


def val_score(ctx: Context, run_dir: Path, history: list[dict]) -> float:
    """The run's validation score by the measure of success step 2 chose.

    Accuracy comes from the run's history; balanced accuracy (mean per-class recall) needs the
    predictions, so the saved model classifies the run's own validation part once more.
    """
    if ctx.state.metric == "accuracy":
        return last_val_acc(history)
    from sklearn.metrics import balanced_accuracy_score

    from imgflow.inference import predict_logits
    from imgflow.preprocess import Preprocessing
    from imgflow.runs import load_trained_model
    from imgflow.training.batches import split_for_training
    from imgflow.training.config import TrainConfig

    model, config = load_trained_model(run_dir, ctx.device)
    _, val = split_for_training(train_part(ctx), TrainConfig.from_dict(config["train"]))
    logits = predict_logits(model, val.images, Preprocessing.from_dict(config["preprocessing"]))
    return float(balanced_accuracy_score(val.labels, logits.argmax(1).numpy()))
