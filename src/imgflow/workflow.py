"""`imgflow workflow DATA`: the universal workflow of machine learning, step by step, in a time budget.

Each step records what was done, what was decided and why, with its numbers, in
OUT/workflow.json; a step that finished is not redone when the same command runs again.
The test split is touched exactly once, in the last step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgflow.errors import UserError
from imgflow.fileio import read_json, write_json

log = logging.getLogger(__name__)

STEP_NAMES = [
    "define the problem and assemble the data",
    "choose a measure of success",
    "decide an evaluation protocol",
    "prepare the data",
    "beat a common-sense baseline",
    "scale up until it overfits",
    "regularise and tune",
    "test once and deploy",
]
BALANCE_LIMIT = 1.5  # max/min class count up to which plain accuracy is a fair measure
HOLDOUT_MIN_PER_CLASS = 50  # fewer training images in a class -> k-fold (a 20% hold-out would leave < 10)
K_FOLDS = 5
TEST_HOLDOUT = 0.2  # share of the data held out as the test split when the source has none
# Share of the budget each exploration step (5-7) may spend. They take up to 37%; the final
# run gets whatever they leave, less what its test evaluation and the reports need
# (final_reserve_seconds; "final" is only its floor, a quarter of it, when earlier steps
# overran). What the user deploys gains more from a further epoch than the exploration does
# from more images. One seed each (0), CIFAR-10 in 15 minutes: the earlier
# 0.08/0.22/0.35 gave the final run 3 epochs and 0.8193; these give it 4, and 0.8299 once step 7
# chose augmentation (0.8158 in a run that kept 'none' on a 0.0002 lead, before the
# one-standard-error rule). Fashion-MNIST in 5 minutes: 0.9147 -> 0.9231 (noisy: an earlier
# version with the old shares also reached 0.9231 once). Then, on a Zen 5 with bf16 (ten times
# the pace), 0.06/0.16/0.26 -> 0.05/0.12/0.20 gave the final run 10 epochs of fast-large
# instead of 12 of fast-medium, and CIFAR-10 0.8953 -> 0.9003 (seed 0).
BUDGET_SHARE = {"baseline": 0.05, "overfit": 0.12, "tune": 0.20, "final": 0.25}
SMALL_MODEL = "seed-baseline"
SCALED_MODELS = ("fast-large", "fast-medium", "fast-small")  # largest first: take what the budget allows
MAX_EPOCHS = {"baseline": 4, "overfit": 30}  # the baseline only has to beat guessing
MIN_EPOCHS_TO_SEE_OVERFITTING = 6
VALIDATION_SPEEDUP = 3  # a validation image costs a third of a training one (no backward pass)
RUN_OVERHEAD_SECONDS = 3.0  # per training run: loading the cached data, building, saving
VALIDATION_CAP = 5000  # held-out images scored per exploration epoch (std error <= 0.71 points)
FINAL_RESERVE = 0.06  # budget share step 6 expects the test evaluation and the reports to take
# After the final run: the test evaluation, TTA_VIEWS views per test image at inference speed,
# and REPORT_SECONDS for the two reports. CIFAR-10 with TTA took ~45 s on the Zen 1 with
# fast-small (this gives 43 s) and ~20 s on the Zen 5 with fast-large (31 s), where the fixed
# 6% reserve of earlier versions kept 54 s back and the final run lost an epoch to it.
TTA_VIEWS = 4
REPORT_SECONDS = 15.0
FINAL_UNUSED_LIMIT = 0.1  # most of its time the final run may leave unused to train whole epochs on all images
# Step 6 scales up to the largest model whose final run the budget can still give this many
# epochs on all the training images (the final run is what the user deploys); it explores on a
# subset when it must. The budget share the final run can expect: what steps 5-7 and the
# reserve leave.
FINAL_MIN_EPOCHS = 8
EXPECTED_FINAL_SHARE = 1 - BUDGET_SHARE["baseline"] - BUDGET_SHARE["overfit"] - BUDGET_SHARE["tune"] - FINAL_RESERVE
# The final run may train up to this many times the validated epochs when the budget pays for
# them: it sees all the images (step 6 often only a subset), and a one-cycle schedule stretched
# over more steps gains (Li et al., "Budgeted training", ICLR 2020).
FINAL_EPOCHS_FACTOR = 3


# A folder of large images (photos) trains at a smaller working size: training cost grows with
# the pixel count, and at full size a budget buys a fraction of an epoch (240 photos of 300x400
# at a 2-minute budget: the final run trained 1 epoch on 76 of them and tested 0.55 on a task
# its validation had solved). The largest longer side on this ladder wins at which the whole
# budget still pays for PASSES_PER_IMAGE training passes over every training image, at
# fast-small's pace measured at 32x32 and scaled by the pixel count: at 15 minutes, 96 px for
# 1,000 images and 32 px for 10,000 on the README's Zen 1 (470 images/s), 128 and 64 px on its
# Zen 5 (2,900 images/s). `--image-size` overrides.
WORKING_SIDES = (32, 48, 64, 96, 128)
PASSES_PER_IMAGE = 40
SIZE_SAMPLE = 100  # image headers read to learn a folder's typical size


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
    state: dict[str, Any]  # decisions later steps need; saved in workflow.json
    save: Callable[[], None] = lambda: None  # writes workflow.json with the state so far
    threads: int | None = None  # CPU threads for training (None: one per core, or $OMP_NUM_THREADS)
    # The loaded data set, keyed by its test hold-out, so the steps decode/read it once.
    loaded: tuple[float, Any] | None = dataclasses.field(default=None, repr=False)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def remaining(self) -> float:
        return max(self.budget_seconds - self.elapsed(), 0.0)


# ----------------------------------------------------------------------------------------------
# helpers


def _dataset(ctx: Context):
    """The data set with the workflow's test hold-out, loaded once per invocation."""
    from imgflow.runs import load_run_data

    test_split = ctx.state.get("test_split", 0.0)
    if ctx.loaded is None or ctx.loaded[0] != test_split:
        dataset = load_run_data({"data": ctx.data, "test_split": test_split,
                                 "image_size": ctx.state.get("image_size")}, progress=ctx.progress)
        ctx.loaded = (test_split, dataset)
    return ctx.loaded[1]


def _train_part(ctx: Context):
    """The training split: all the exploration steps may see (the test split stays untouched)."""
    return _dataset(ctx).train


def _protocol_split(ctx: Context):
    """(training part, validation part) as the exploration runs see them; fold 0 under k-fold."""
    from imgflow.data.splits import kfold_split, split_train_val, stratified_subset

    train = _train_part(ctx)
    protocol = ctx.state["protocol"]
    if protocol["kind"] == "k-fold":
        return kfold_split(train, protocol["folds"], 0, ctx.seed)
    part, val = split_train_val(train, protocol["val_split"], "stratified", ctx.seed)
    return part, stratified_subset(val, protocol.get("val_subset", 0), ctx.seed)


def _base_settings(ctx: Context) -> dict[str, Any]:
    protocol = ctx.state["protocol"]
    settings = dict(seed=ctx.seed, normalize="standardize", test_split=ctx.state.get("test_split", 0.0),
                    precision="auto", threads=ctx.threads, image_size=ctx.state.get("image_size"))
    if protocol["kind"] == "k-fold":
        settings.update(folds=protocol["folds"], fold=0)
    else:
        settings.update(val_split=protocol["val_split"], val_mode="stratified",
                        val_subset=protocol.get("val_subset", 0))
    return settings


def _measure_throughput(ctx: Context, model: str, batch_size: int) -> float:
    """Training images per second of `model` on this machine: a few timed steps on real images."""
    train = _train_part(ctx)
    return probe_throughput(model, train.images[:batch_size], train.labels[:batch_size],
                            int(train.labels.max()) + 1, ctx.threads)


def probe_throughput(model: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     threads: int | None) -> float:
    """Training images per second of `model` on one batch of uint8 NHWC `images` (3 timed steps)."""
    import torch
    import torch.nn.functional as F

    from imgflow.models import create_model
    from imgflow.precision import autocast, resolve_precision, set_threads

    H, W, C = images.shape[1:]
    set_threads(threads)
    precision = resolve_precision("auto")
    torch.manual_seed(0)
    net = create_model(model, num_classes=num_classes, in_channels=C,
                       image_size=(H, W)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
    y = torch.from_numpy(labels)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        with autocast(precision):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return len(images) / float(np.median(times[1:]))


def working_image_size(sample, budget_seconds: float, images_per_second_32: Callable[[], float],
                       available_bytes: int | None) -> dict[str, Any]:
    """The size to train at, by the rule at WORKING_SIDES, from a `folder.SizeSample`.

    Returns {"image_size": [H, W] or None (the data's own size), ...the facts behind it}.
    `images_per_second_32` probes fast-small at 32x32; it runs only when the images are larger.
    """
    from collections import Counter

    from imgflow.models.registry import MIN_IMAGE_SIZE

    if not sample.sizes:
        return {"image_size": None}
    H, W = Counter(sample.sizes).most_common(1)[0][0]
    longer = max(H, W)
    facts: dict[str, Any] = {"typical_size": [H, W], "sampled": len(sample.sizes),
                             "train_files": sample.train_files}
    if longer <= WORKING_SIDES[0]:
        return {"image_size": None, **facts}
    # Photos of one shape keep it; a mix of shapes is stretched to squares, as Keras does.
    same_shape = all(abs(h * W - w * H) <= 0.05 * H * w for h, w in sample.sizes)
    ips = images_per_second_32()
    n = max(sample.train_files, 1)

    def size(side: int) -> tuple[int, int]:
        if side >= longer:
            return H, W
        if not same_shape:
            return side, side
        # The models need MIN_IMAGE_SIZE pixels a side: a very long, thin shape gets stretched.
        return (max(MIN_IMAGE_SIZE, round(side * H / longer)), max(MIN_IMAGE_SIZE, round(side * W / longer)))

    def passes(hw: tuple[int, int]) -> float:
        return budget_seconds * ips * 32 * 32 / (hw[0] * hw[1]) / n

    def fits(hw: tuple[int, int]) -> bool:  # decoded uint8 RGB, with room for a copy while stacking
        return available_bytes is None or 2 * n * hw[0] * hw[1] * 3 <= 0.8 * available_bytes

    sides = [side for side in WORKING_SIDES if side < longer] + ([longer] if longer <= WORKING_SIDES[-1] else [])
    chosen, limit = sides[0], "smallest"  # when no rung is affordable
    for k in range(len(sides) - 1, -1, -1):
        hw = size(sides[k])
        if passes(hw) >= PASSES_PER_IMAGE and fits(hw):
            larger = size(sides[k + 1]) if k + 1 < len(sides) else None
            chosen = sides[k]
            limit = "top" if larger is None else "budget" if passes(larger) < PASSES_PER_IMAGE else "memory"
            break
    hw = size(chosen)
    return {"image_size": None if hw == (H, W) else list(hw), **facts, "same_shape": same_shape,
            "images_per_second_32x32": round(ips, 1), "passes_per_image": round(passes(hw), 1), "limit": limit}


def _decide_image_size(data: str, budget_seconds: float, threads: int | None,
                       option: tuple[int, int] | None) -> dict[str, Any]:
    """Before anything is decoded: --image-size if given, else the working size for DATA."""
    from imgflow.data.decode import available_memory
    from imgflow.data.folder import sample_image_sizes
    from imgflow.data.load import named_source
    from imgflow.models.registry import MIN_IMAGE_SIZE

    if option is not None:
        if min(option) < MIN_IMAGE_SIZE:
            raise UserError(f"--image-size {option[0]}x{option[1]} is too small: the workflow's models need at "
                            f"least {MIN_IMAGE_SIZE} pixels a side")
        return {"image_size": list(option), "chosen_by": "--image-size"}
    path = Path(data).expanduser()
    if named_source(data) or not path.exists():  # named sets are small; a bad path fails in loading
        return {"image_size": None}
    sample = sample_image_sizes(path, SIZE_SAMPLE)

    def probe() -> float:  # the speed does not depend on what the pixels show
        images = np.random.default_rng(0).integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8)
        return probe_throughput(SCALED_MODELS[-1], images, np.arange(128) % 2, 2, threads)

    return working_image_size(sample, budget_seconds, probe, available_memory())


def _observed_throughput(ctx: Context, run: str) -> float | None:
    """Training images per second that run `run` (relative to OUT) sustained, by _plan_epochs' cost model.

    A finished run's median epoch time counts everything a probe leaves out (batch assembly,
    augmentation, the optimiser on every step, validation), and a median is not thrown by a
    moment's load on a shared machine the way a probe of a few steps is: on CIFAR-10 at the
    15-minute budget, probes of fast-small read 429-505 images/s, its runs 437-470.
    """
    from imgflow.history import read_history

    run_dir = ctx.out / run
    try:
        data = read_json(run_dir / "config.json", "run config")["data"]
        seconds = float(np.median([r["seconds"] for r in read_history(run_dir / "history.csv")]))
    except (UserError, KeyError, TypeError, ValueError):  # no such run, or one without timings
        return None
    if not seconds > 0:
        return None
    return (data["num_train"] + data["num_val"] / VALIDATION_SPEEDUP) / seconds


def _plan_epochs(seconds: float, images_per_second: float, n_train: int, n_val: int,
                 max_epochs: int, min_epochs: int = 1) -> tuple[int, int]:
    """(epochs, train_subset) that fit `seconds`; train on a subset when not even min_epochs fit.

    An epoch costs n_train training images plus n_val validation images at VALIDATION_SPEEDUP times the speed.
    """
    seconds = max(seconds - RUN_OVERHEAD_SECONDS, 0.0)
    per_epoch = (n_train + n_val / VALIDATION_SPEEDUP) / images_per_second
    epochs = int(seconds // max(per_epoch, 1e-9))
    if epochs >= min_epochs:
        return min(epochs, max_epochs), 0
    affordable = seconds / min_epochs * images_per_second - n_val / VALIDATION_SPEEDUP
    subset = int(max(affordable, 0))
    return min_epochs, max(subset, min(n_train, 64))


def _plan_once(ctx: Context, name: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The plan of run `name` (its settings and what they were based on), made only once.

    The plan is saved before the run starts: an interrupted workflow continues that run with
    the same settings, instead of re-planning from a new throughput probe and the budget left
    (which would change the epochs and make the run unresumable).
    """
    plans = ctx.state.setdefault("plans", {})
    if name not in plans:
        plans[name] = make()
        ctx.save()
    return plans[name]


def _train(ctx: Context, name: str, settings: dict[str, Any]):
    """Train one run under OUT/runs/NAME (continuing it if an earlier invocation was interrupted)."""
    from imgflow.training.config import resolve_config
    from imgflow.history import read_history
    from imgflow.training.loop import train
    from imgflow.training.rundir import config_differences

    run_dir = ctx.out / "runs" / name
    config = resolve_config(ctx.data, settings)
    if diff := config_differences(run_dir, config):
        # Only a workflow.json from before plans were saved can get here.
        raise UserError(f"{run_dir} was started with other settings ({', '.join(diff)}): delete that "
                        "directory and run the same command again to redo this step")
    train(config, run_dir, resume=run_dir.is_dir(), progress=ctx.progress)
    history = read_history(run_dir / "history.csv")
    return run_dir, history


def _last_val_acc(history: list[dict]) -> float:
    return history[-1]["val_acc"] if history and history[-1]["val_acc"] is not None else float("nan")


def _val_score(ctx: Context, run_dir: Path, history: list[dict]) -> float:
    """The run's validation score by the measure of success step 2 chose.

    Accuracy comes from the run's history; balanced accuracy (mean per-class recall) needs the
    predictions, so the saved model classifies the run's own validation part once more.
    """
    if ctx.state["metric"] == "accuracy":
        return _last_val_acc(history)
    from sklearn.metrics import balanced_accuracy_score

    from imgflow.inference import predict_logits
    from imgflow.preprocess import Preprocessing
    from imgflow.runs import load_trained_model
    from imgflow.training.config import TrainConfig
    from imgflow.training.batches import split_for_training

    model, config = load_trained_model(run_dir)
    _, val = split_for_training(_train_part(ctx), TrainConfig.from_dict(config["train"]))
    logits = predict_logits(model, val.images, Preprocessing.from_dict(config["preprocessing"]))
    return float(balanced_accuracy_score(val.labels, logits.argmax(1).numpy()))


def _metric_name(ctx: Context) -> str:
    return ctx.state["metric"].replace("_", " ")


def _step(name: str, decision: str, why: str, metrics: dict | None = None, **extra) -> dict:
    return {"name": name, "decision": decision, "why": why, "metrics": metrics or {}, **extra}


# ----------------------------------------------------------------------------------------------
# the eight steps


def step_data(ctx: Context) -> dict:
    from imgflow.data.card import inspect

    size = ctx.state.get("image_size")
    card = inspect(ctx.data, out_dir=ctx.out, image_size=tuple(size) if size else None)
    counts = card["splits"]["train"]["per_class"]
    n_min, n_max = min(counts.values()), max(counts.values())
    ctx.state["test_split"] = 0.0 if card["splits"].get("test") else TEST_HOLDOUT
    ctx.state["balance_ratio"] = n_max / max(n_min, 1)
    ctx.state["classes"] = card["classes"]
    held = (f"; the source has no test split, so {TEST_HOLDOUT:.0%} of each class is held out as one "
            "and not looked at until the last step") if ctx.state["test_split"] else ""
    test_count = card["splits"]["test"]["count"] if card["splits"].get("test") else None
    return _step(
        STEP_NAMES[0],
        f"{len(card['classes'])} classes, {card['splits']['train']['count']} training images of shape "
        f"{card['image_shape']}{_resized_from(ctx)}{held}",
        "Single-label image classification: each image gets one of the folder/class names. "
        f"Class counts range from {n_min} to {n_max}; {len(card['skipped'])} unreadable files were skipped.",
        {"classes": len(card["classes"]), "train_images": card["splits"]["train"]["count"],
         "test_images": test_count, "min_per_class": n_min, "max_per_class": n_max,
         "skipped_files": len(card["skipped"])},
        card=card, figures={"examples": "examples.png"})


def step_metric(ctx: Context) -> dict:
    ratio = ctx.state["balance_ratio"]
    metric = "accuracy" if ratio <= BALANCE_LIMIT else "balanced_accuracy"
    ctx.state["metric"] = metric
    return _step(
        STEP_NAMES[1], f"measure success by {metric.replace('_', ' ')}",
        f"The largest class is {ratio:.2f}x the smallest. Up to {BALANCE_LIMIT}x plain accuracy is fair; "
        "beyond it a model could score well by favouring big classes, and balanced accuracy (mean "
        "per-class recall) would be used instead. "
        + ("Here plain accuracy is fair. " if metric == "accuracy" else
           "Here it is beyond that, so balanced accuracy decides. ")
        + "Per-class precision/recall/F1 and the confusion matrix are always reported.",
        {"balance_ratio": round(ratio, 3), "rule_max_over_min": BALANCE_LIMIT})


def step_protocol(ctx: Context) -> dict:
    from imgflow.data.splits import split_train_val

    train = _train_part(ctx)
    n_min = int(np.bincount(train.labels).min())
    if n_min >= HOLDOUT_MIN_PER_CLASS:
        protocol = {"kind": "hold-out", "val_split": 0.2}
        decision = "hold-out validation: a stratified 20% of the training images"
        why = (f"Every class has at least {HOLDOUT_MIN_PER_CLASS} training images ({n_min} in the "
               "smallest), so a 20% hold-out gives a usable validation estimate at the cost of one training run.")
        n_val = len(split_train_val(train, protocol["val_split"], "stratified", ctx.seed)[1])
        if n_val > VALIDATION_CAP:
            protocol["val_subset"] = VALIDATION_CAP
            decision += f" (of {n_val}, each epoch is scored on the same stratified {VALIDATION_CAP})"
            why += (f" Scoring every epoch on {VALIDATION_CAP} of the {n_val} held-out images keeps the "
                    "accuracy's standard error at most 0.71 points and leaves the time to training; "
                    "the other held-out images are used by no run but the final one.")
    else:
        folds = max(2, min(K_FOLDS, n_min))
        protocol = {"kind": "k-fold", "folds": folds}
        decision = f"{folds}-fold cross-validation (stratified)"
        why = (f"The smallest class has only {n_min} training images (< {HOLDOUT_MIN_PER_CLASS}): a "
               f"single hold-out would be too noisy, so each candidate is scored on {folds} folds.")
    ctx.state["protocol"] = protocol  # first: the hold-out split below reads it from the state
    protocol["scored_per_class"] = _scored_per_class(ctx, protocol)
    return _step(STEP_NAMES[2], decision + "; the test split is used once, at the end", why,
                 {"smallest_class_train_images": n_min, **protocol})


def _resized_from(ctx: Context) -> str:
    """' (resized from HxW, ...)' when the workflow trains at another size than the data's, else ''."""
    resize = ctx.state.get("resize") or {}
    if not ctx.state.get("image_size"):
        return ""
    if resize.get("chosen_by") == "--image-size":
        return " (resized as --image-size asked)"
    H, W = resize["typical_size"]
    return f" (resized from {H}x{W}, the most common size, for the time budget: step 4)"


def _resize_decision(ctx: Context) -> tuple[str, str]:
    """Step 4's words on the image size: (decision prefix, why), both '' when nothing was resized."""
    resize = ctx.state.get("resize") or {}
    size = ctx.state.get("image_size")
    if not size:
        return "", ""
    h, w = size
    if resize.get("chosen_by") == "--image-size":
        return f"images resized to {h}x{w} (--image-size); ", ""
    H, W = resize["typical_size"]
    shape = ("keeping their shape" if resize["same_shape"] else
             "stretched to squares, as the sampled images come in several shapes")
    rungs, passes = ", ".join(map(str, WORKING_SIDES)), f"{resize['passes_per_image']:.0f}"
    if resize.get("limit") == "smallest":
        rule = (f"The rule takes the largest longer side of {rungs} px at which it pays for at least "
                f"{PASSES_PER_IMAGE}; none does, so the smallest is used ({passes} at {h}x{w})")
    elif resize.get("limit") == "memory":
        rule = (f"{h}x{w} is the largest of {rungs} px (longer side) that pays for at least "
                f"{PASSES_PER_IMAGE} ({passes}) and whose decoded images fit in memory")
    else:
        rule = (f"The working size is the largest longer side of {rungs} px at which it pays for at "
                f"least {PASSES_PER_IMAGE} ({passes} at {h}x{w})")
    why = (f"Training time grows with the pixels: at {H}x{W} (the most common size of "
           f"{resize['sampled']} images sampled) the budget would pay for about "
           f"{resize['passes_per_image'] * h * w / (H * W):.1f} passes over each of the "
           f"{resize['train_files']} training images. {rule}, at "
           f"{resize['images_per_second_32x32']:.0f} images/s measured at 32x32 and scaled by the pixel count. "
           "More time, or --image-size, buys more detail; predictions resize new images the same way. ")
    return f"images resized to {h}x{w} from {H}x{W} ({shape}); ", why


def step_prepare(ctx: Context) -> dict:
    from imgflow.data import channel_stats

    part, _ = _protocol_split(ctx)
    mean, std = channel_stats(part.images)
    resized, resize_why = _resize_decision(ctx)
    metrics = {"channel_mean": [round(m, 4) for m in mean], "channel_std": [round(s, 4) for s in std],
               "images_used_for_statistics": len(part)}
    if ctx.state.get("image_size"):
        metrics["image_size"] = ctx.state["image_size"]
    return _step(
        STEP_NAMES[3], resized + "pixels scaled to [0, 1], then standardised per channel with the training part's mean and std",
        resize_why + "Statistics come from the training part only, never validation or test, so no information "
        "leaks into the evaluation. Images stay uint8 in memory and are converted per batch.",
        metrics)


def step_baseline(ctx: Context) -> dict:
    part, val = _protocol_split(ctx)
    majority = int(np.bincount(part.labels).argmax())
    majority_acc = float((val.labels == majority).mean())
    random_acc = 1.0 / len(ctx.state["classes"])

    def plan() -> dict[str, Any]:
        batch_size = 64 if len(part) < 5000 else 128
        ips = _measure_throughput(ctx, SMALL_MODEL, batch_size)
        epochs, subset = _plan_epochs(BUDGET_SHARE["baseline"] * ctx.budget_seconds, ips, len(part), len(val),
                                      MAX_EPOCHS["baseline"], min_epochs=2)
        return {"images_per_second": ips,
                "settings": {**_base_settings(ctx), "model": SMALL_MODEL, "epochs": epochs, "train_subset": subset,
                             "optimizer": "adam", "lr": 1e-3, "batch_size": batch_size}}

    planned = _plan_once(ctx, "5-baseline", plan)
    settings, ips = planned["settings"], planned["images_per_second"]
    epochs, subset = settings["epochs"], settings["train_subset"]
    run_dir, history = _train(ctx, "5-baseline", settings)
    score = _val_score(ctx, run_dir, history)
    # Balanced accuracy gives every constant or random guess 1/classes.
    balanced = ctx.state["metric"] != "accuracy"
    majority_score = random_acc if balanced else majority_acc
    beats = score > max(majority_score, random_acc)
    verdict = ("beats both" if beats else
               "DOES NOT BEAT the common-sense baseline: check the labels and the data before going further")
    metrics = {"majority_baseline_val_acc": majority_acc, "random_baseline_val_acc": random_acc,
               "small_model_val_acc": _last_val_acc(history), "epochs": epochs, "train_subset": subset,
               "train_images_per_second": round(ips, 1), "beats_baseline": beats}
    if balanced:
        metrics.update(metric=ctx.state["metric"], majority_baseline_val_score=majority_score,
                       random_baseline_val_score=random_acc, small_model_val_score=score)
    return _step(
        STEP_NAMES[4],
        f"{SMALL_MODEL} reaches {score:.3f} validation {_metric_name(ctx)} in {epochs} epochs: {verdict}",
        f"Always predicting the most common class ('{ctx.state['classes'][majority]}') scores "
        f"{majority_score:.3f}, guessing at random {random_acc:.3f}"
        + (f" (by {_metric_name(ctx)}; plain accuracy of the majority guess: {majority_acc:.3f})" if balanced else "")
        + ". A model must clear these before it means anything.",
        metrics, runs=[str(run_dir.relative_to(ctx.out))])


OVERFIT_PATIENCE = 2  # epochs validation loss must rise in a row, while training loss falls, to call it overfitting


def detect_overfitting(history: list[dict], patience: int = OVERFIT_PATIENCE) -> int | None:
    """The epoch after which validation loss rose for `patience` epochs while training loss fell.

    Returns that best epoch (1-based), or None when the curves show no overfitting.
    """
    val = [r["val_loss"] for r in history]
    if len(val) < patience + 1 or any(v is None for v in val):
        return None
    best = int(np.argmin(val))
    after = history[best + 1:]
    if len(after) < patience:
        return None
    train_falls = after[-1]["train_loss"] < history[best]["train_loss"]
    return best + 1 if train_falls and all(r["val_loss"] > val[best] for r in after[:patience]) else None


# Training accuracy this far above validation accuracy, without regularisation, is the model
# fitting its training images' particulars: capacity to spare, even before validation loss turns.
MEMORISATION_GAP = 0.10


def overfit_verdict(model: str, epochs: int, best_epoch: int | None, train_acc: float,
                    val_acc: float) -> tuple[str, str, bool]:
    """(decision, why, memorises) of step 6, from the curves' turn and the last epoch's accuracies."""
    if best_epoch:
        return (f"{model} overfits: validation loss is lowest at epoch {best_epoch} and rises after "
                "it while training loss keeps falling",
                "Capacity is now enough to memorise the training data, which is what regularisation "
                "needs to work on.", True)
    gap = train_acc - val_acc
    if gap >= MEMORISATION_GAP:
        return (f"{model} memorises its training images (training accuracy {train_acc:.3f}, validation "
                f"{val_acc:.3f}), though its validation loss had not turned up within {epochs} epochs",
                f"A gap of {100 * gap:.0f} points between training and validation accuracy, without any "
                "regularisation, is capacity to spare: the model learns its training images' particulars. "
                "The curves did not show the turn this step looks for (validation loss rising for "
                f"{OVERFIT_PATIENCE} epochs while training loss falls), but regularisation has enough to work on.",
                True)
    return (f"{model} did not overfit within {epochs} epochs",
            f"Training and validation accuracy ended {100 * gap:.0f} points apart and validation loss did "
            "not turn up: more epochs or a larger model (more budget) would be the next move. "
            "Regularisation is tuned on this model anyway.", False)


def _scaled_model_and_plan(ctx: Context, n_train: int, n_val: int) -> tuple[str, int, int, float, str]:
    """(model, epochs, train_subset, images/s, why) of step 6: the largest fast model whose final run
    the budget pays for FINAL_MIN_EPOCHS epochs of all the images, explored on what step 6's share
    buys; why is "final run affords it", or "smallest" when none does."""
    seconds = BUDGET_SHARE["overfit"] * ctx.budget_seconds
    final_images = EXPECTED_FINAL_SHARE * ctx.budget_seconds  # x images/s = images the final run sees
    n_all = len(_train_part(ctx))

    def plan(model: str, batch_size: int) -> tuple[int, int, float]:
        ips = _measure_throughput(ctx, model, batch_size)
        return *_plan_epochs(seconds, ips, n_train, n_val, MAX_EPOCHS["overfit"],
                             min_epochs=MIN_EPOCHS_TO_SEE_OVERFITTING), ips

    batch_size = _fast_recipe(n_train)["batch_size"]
    for model in SCALED_MODELS:
        epochs, subset, ips = plan(model, batch_size)
        affords = final_images * ips >= FINAL_MIN_EPOCHS * n_all
        if affords or model == SCALED_MODELS[-1]:
            trained_batch = _fast_recipe(subset or n_train)["batch_size"]
            if trained_batch != batch_size:  # a small subset trains with small batches, at another speed
                epochs, subset, ips = plan(model, trained_batch)
            return model, epochs, subset, ips, "final run affords it" if affords else "smallest"
    raise AssertionError("unreachable")


def _fast_recipe(n_train: int) -> dict[str, Any]:
    """SGD-Nesterov with a one-cycle schedule, as the fast family is tuned for (no regularisation).

    Batch 128, not 256: step 6 trains ~200 steps at 256 (6 epochs of ~9,000 images), and there
    lr 0.2 blew up in epoch 2 (CIFAR-10, seed 0: validation loss 1.91 -> 4.99, ending at 0.602;
    a twice longer warm-up or lr 0.1 at 256 still spiked). At 128 with lr 0.1, twice the steps
    each half as large, the same run did not and validated 0.656; its epochs took as long.
    Batch 32 only below 2,048 images (16 steps of 128 per epoch): the final run inherits the
    batch, and at 32 a CPU trains a third slower (Fashion-MNIST at 5 minutes explores on ~3,000
    images; with the limit at 4,096 its final run got batch 32 and 2 epochs on 85% of the data).
    With airbench's BatchNorm lr x64 and lookahead every 5 steps: fast-large for 8 epochs with
    the first candidate's regularisation (CIFAR-10, 45k images, seed 0) validated 0.8908 with
    them and alternating flips, 0.8848 without, for 2% more time.
    """
    batch = 128 if n_train >= 2048 else 32
    return {"optimizer": "sgd", "momentum": 0.9, "lr": 0.2 * batch / 256, "batch_size": batch,
            "schedule": "onecycle", "warmup_epochs": 0.0, "bn_lr_scale": 64.0, "lookahead": 5}


def step_overfit(ctx: Context) -> dict:
    part, val = _protocol_split(ctx)

    def plan() -> dict[str, Any]:
        model, epochs, subset, ips, rule = _scaled_model_and_plan(ctx, len(part), len(val))
        settings = {**_base_settings(ctx), **_fast_recipe(subset or len(part)), "model": model,
                    "epochs": epochs, "train_subset": subset, "warmup_epochs": round(0.2 * epochs, 2),
                    "augment": "none", "weight_decay": 0.0, "label_smoothing": 0.0}
        return {"images_per_second": ips, "settings": settings, "model_rule": rule}

    planned = _plan_once(ctx, "6-overfit", plan)
    settings, ips = planned["settings"], planned["images_per_second"]
    model, epochs, subset = settings["model"], settings["epochs"], settings["train_subset"]
    run_dir, history = _train(ctx, "6-overfit", settings)
    best_epoch = detect_overfitting(history)
    score = max(r["val_acc"] for r in history)
    ctx.state["scaled"] = {"model": model, "epochs": epochs, "train_subset": subset,
                           "best_epoch": best_epoch, "settings": settings,
                           "run": str(run_dir.relative_to(ctx.out)),
                           "final_val_acc": history[-1]["val_acc"], "final_val_loss": history[-1]["val_loss"],
                           "final_val_score": _val_score(ctx, run_dir, history),
                           "seconds_per_epoch": float(np.median([r["seconds"] for r in history]))}
    decision, why, memorises = overfit_verdict(model, epochs, best_epoch, history[-1]["train_acc"],
                                               history[-1]["val_acc"])
    return _step(STEP_NAMES[5], decision, why,
                 {"model": model, "model_rule": planned.get("model_rule"),
                  "epochs": epochs, "train_subset": subset, "best_val_acc": score,
                  "overfit_epoch": best_epoch, "memorises": memorises, "train_images_per_second": round(ips, 1),
                  "final_train_acc": history[-1]["train_acc"], "final_val_acc": history[-1]["val_acc"]},
                 runs=[str(run_dir.relative_to(ctx.out))])


# (name, description, changes to the step-6 settings, how much it regularises). The last field
# ranks candidates for the one-standard-error rule (choose_candidate): "none", the step-6 run, is
# 0; each regulariser added counts, a learning-rate change does not (with weight decay coupled
# to the learning rate, halving it even halves the decay per step).
# The order matters: a small budget trains only the first one or two. First comes the whole
# recipe the fast models are tuned with (the `fast` preset's augmentation, label smoothing and
# weight decay), then augmentation alone, then smoothing and decay alone for data that flips and
# shifts do not suit (Fashion-MNIST's garments are centred and upright), then a lower learning rate.
# Weight decay 1.7e-3 at step 6's lr 0.1 per 128 images and momentum 0.9 decays each weight per
# image as much as the `fast` preset's 1.33e-3 at lr 0.75 per 512 and momentum 0.85
# (lr * decay / (1 - momentum) / batch); step 6 scales lr with the batch, so it holds at any batch.
# Flips alternate (airbench): each image is mirrored in every other epoch, from a random start,
# so a short run sees both views of every image equally often.
AUGMENTATION = {"augment": "flip+translate", "flip": "alternate"}
SMOOTHING_AND_DECAY = {"label_smoothing": 0.2, "weight_decay": 1.7e-3}
RECIPE_REGULARISATION = {**AUGMENTATION, **SMOOTHING_AND_DECAY}
CANDIDATES = [
    ("augment+smooth+decay", "flip + 2-pixel translations, label smoothing 0.2, weight decay 1.7e-3",
     RECIPE_REGULARISATION, 3),
    ("augment", "flip + 2-pixel translations", AUGMENTATION, 1),
    ("smooth+decay", "label smoothing 0.2, weight decay 1.7e-3, no augmentation",
     {**SMOOTHING_AND_DECAY, "augment": "none"}, 2),
    ("augment+smooth+decay+half-lr", "the first candidate at half the learning rate",
     {**RECIPE_REGULARISATION, "lr_scale": 0.5}, 3),
]


def _train_candidate(ctx: Context, name: str, label: str, settings: dict[str, Any], regularisation: int,
                     trained: dict[int, str] | None = None) -> dict:
    """Train one candidate (on every fold under k-fold) and score it on validation.

    trained: fold -> run directory (relative to OUT) of a fold already trained with these settings.
    """
    from imgflow.history import read_history

    trained = trained or {}
    accs, scores, losses, runs = [], [], [], []
    for fold in range(settings.get("folds") or 1):  # k-fold: every fold validates once
        if fold in trained:
            run_dir = ctx.out / trained[fold]
            history = read_history(run_dir / "history.csv")
        else:
            fold_settings = {**settings, "fold": fold} if settings.get("folds") else settings
            suffix = f"-fold{fold}" if settings.get("folds") else ""
            run_dir, history = _train(ctx, f"7-{name}{suffix}", fold_settings)
        accs.append(_last_val_acc(history))
        scores.append(_val_score(ctx, run_dir, history))
        losses.append(history[-1]["val_loss"])
        runs.append(str(run_dir.relative_to(ctx.out)))
    return {"name": name, "description": label, "settings": settings, "regularisation": regularisation,
            "val_acc": float(np.mean(accs)), "val_acc_std": float(np.std(accs)),
            "val_score": float(np.mean(scores)), "val_score_std": float(np.std(scores)),
            "val_loss": float(np.mean(losses)), "runs": runs, "run": runs[0]}


def _scored_class_counts(ctx: Context) -> list[int]:
    """Images per class that a candidate's validation score averages over (step 3 records them)."""
    protocol = ctx.state["protocol"]
    if "scored_per_class" not in protocol:  # a workflow.json from before step 3 recorded it
        protocol["scored_per_class"] = _scored_per_class(ctx, protocol)
    return protocol["scored_per_class"]


def _scored_per_class(ctx: Context, protocol: dict) -> list[int]:
    # Hold-out scores the same validation images every time; k-fold every training image once.
    labels = _train_part(ctx).labels if protocol["kind"] == "k-fold" else _protocol_split(ctx)[1].labels
    return np.bincount(labels, minlength=len(ctx.state.get("classes") or [])).tolist()


def score_standard_error(score: float, class_counts: list[int], balanced: bool) -> float:
    """Sampling standard error of a validation accuracy, or of a balanced accuracy (mean of recalls).

    Binomial, with the Agresti-Coull adjustment ((k + 2) / (n + 4)) so that a score of 0 or 1 is
    not taken as exact. A balanced accuracy averages C recalls over n_c images each: its variance
    is p(1 - p) / C * mean(1 / n_c), larger than accuracy's p(1 - p) / n when classes are uneven.
    """
    counts = np.asarray([c for c in class_counts if c > 0], dtype=float)
    n = float(counts.sum())
    if n == 0:
        return 0.0
    p = (score * n + 2) / (n + 4)
    if not balanced:
        return math.sqrt(p * (1 - p) / n)
    return math.sqrt(p * (1 - p) * float(np.mean(1 / counts)) / len(counts))


def choose_candidate(results: list[dict], standard_error: Callable[[float], float]) -> tuple[dict, dict, float]:
    """(chosen, best-scoring, standard error of the best score): the one-standard-error rule.

    Hastie, Tibshirani & Friedman, The Elements of Statistical Learning, 7.10: a candidate at most
    one standard error below the best score is as good as far as the validation data can tell,
    and among those the one that regularises most is the safer choice. ESL takes the standard
    error from the spread across folds; a single hold-out has no such spread, so here it is the
    score's sampling error on the images it averages over (the same for every candidate).
    Ties in regularisation go to the better score, then the lower validation loss.
    """
    best = max(results, key=lambda r: (r["val_score"], -r["val_loss"]))
    se = standard_error(best["val_score"])
    tied = [r for r in results if r["val_score"] >= best["val_score"] - se] or [best]  # NaN ties with nothing
    chosen = max(tied, key=lambda r: (r.get("regularisation", 0), r["val_score"], -r["val_loss"]))
    return chosen, best, se


def _reference_score(ctx: Context, scaled: dict) -> float:
    """The step-6 run's validation score (recomputed for a workflow.json from before it was kept)."""
    if "final_val_score" in scaled:
        return scaled["final_val_score"]
    from imgflow.history import read_history

    run_dir = ctx.out / scaled["run"]
    return _val_score(ctx, run_dir, read_history(run_dir / "history.csv"))


def step_tune(ctx: Context) -> dict:
    scaled = ctx.state["scaled"]
    folds = ctx.state["protocol"].get("folds", 1)
    # Candidates train exactly like the step-6 run (same model, data, epochs) but for the
    # regularisation, so they are compared fairly with it and with each other. The budget
    # decides how many of them run.
    epochs = scaled["epochs"]
    seconds_per_run = RUN_OVERHEAD_SECONDS + epochs * scaled["seconds_per_epoch"]
    # The unregularised reference is the step-6 run; under k-fold that run is its fold 0 and
    # its other folds come out of this step's budget too, unless not even one candidate fits
    # beside them: then nothing more is trained and step 6's configuration goes on unchanged.
    reference_runs = (folds - 1) * seconds_per_run
    affordable = int((BUDGET_SHARE["tune"] * ctx.budget_seconds - reference_runs) // (seconds_per_run * folds))
    n_candidates = max(0, min(len(CANDIDATES), affordable))
    results = []
    if folds == 1 or n_candidates == 0:  # the step-6 run is the reference, already trained and scored
        results.append({"name": "none", "description": "no regularisation (the step-6 run)",
                        "settings": scaled["settings"], "regularisation": 0, "val_acc": scaled["final_val_acc"],
                        "val_acc_std": 0.0, "val_score": _reference_score(ctx, scaled), "val_score_std": 0.0,
                        "val_loss": scaled["final_val_loss"], "runs": [scaled["run"]], "run": scaled["run"]})
    else:
        results.append(_train_candidate(ctx, "none", "no regularisation (fold 0 is the step-6 run)",
                                        scaled["settings"], 0, trained={0: scaled["run"]}))
    for name, label, changes, regularisation in CANDIDATES[:n_candidates]:
        changes = dict(changes)
        lr_scale = changes.pop("lr_scale", 1.0)
        settings = {**scaled["settings"], **changes, "lr": scaled["settings"]["lr"] * lr_scale}
        results.append(_train_candidate(ctx, name, label, settings, regularisation))
    counts = _scored_class_counts(ctx)
    balanced = ctx.state["metric"] != "accuracy"
    best, top, se = choose_candidate(results, lambda score: score_standard_error(score, counts, balanced))
    ctx.state["chosen"] = best
    table = {r["name"]: round(r["val_score"], 4) for r in results}
    skipped = len(CANDIDATES) - n_candidates
    if n_candidates == 0:
        left = BUDGET_SHARE["tune"] * ctx.budget_seconds - reference_runs
        why = (f"NO regularised candidate fitted the budget: one would take {seconds_per_run * folds:.0f} s "
               f"({folds} fold{'s' if folds > 1 else ''} of {epochs} epochs), and the step had "
               f"{max(left, 0):.0f} s" + (f" beside the reference's other {folds - 1} folds" if folds > 1 else "")
               + ". The step-6 configuration is retrained as it is; a larger --budget-minutes would "
               "compare candidates.")
    else:
        why = (f"{n_candidates} regularised candidate{'s' if n_candidates > 1 else ''} trained like the step-6 "
               f"run ({epochs} epochs) and compared with it on validation only"
               + (f"; {skipped} more did not fit the budget" if skipped else "") + ".")
        if best is not top:
            why += (f" '{top['name']}' scored best ({top['val_score']:.4f}), but '{best['name']}' is at most "
                    f"one standard error ({se:.4f} on {sum(counts)} images) behind it and regularises more: "
                    "a difference that small is noise, so the one-standard-error rule takes the more "
                    "regularised candidate.")
    return _step(
        STEP_NAMES[6],
        f"chose '{best['name']}' ({best['description']}): validation {_metric_name(ctx)} {best['val_score']:.4f}",
        why,
        {"candidates": table, "metric": ctx.state["metric"], "epochs": epochs,
         "standard_error": round(se, 4), "scored_images": sum(counts)},
        runs=[run for r in results for run in r["runs"]], candidates=results)


def final_reserve_seconds(n_test: int, images_per_second: float) -> float:
    """Seconds to keep back after the final run, which trains at `images_per_second`, for testing
    `n_test` images with TTA and writing the reports."""
    return TTA_VIEWS * n_test / (VALIDATION_SPEEDUP * images_per_second) + REPORT_SECONDS


def plan_final_run(seconds: float, images_per_second: float, n_train: int, validated_epochs: int,
                   max_epochs: int | None = None) -> tuple[int, int]:
    """(epochs, train_subset) of the final retrain within `seconds`.

    When the validated epochs on all the images fit, as many whole epochs as the time pays for,
    up to `max_epochs` (default: the validated ones). Otherwise the run uses at least
    1 - FINAL_UNUSED_LIMIT of its time: the largest whole number of epochs on all the images if
    that does, else one epoch more, each on as many images as the time pays for. E.g. 3.3
    epochs' worth -> 3 on all the images (9% unused), 1.5 -> 2 on 75% of them (1 on all would
    leave a third unused), 0.4 -> 1 on 40%. Fewer epochs come before fewer images, as for a
    fixed budget more distinct images beat more passes over fewer (Li et al., "Budgeted
    training", ICLR 2020); but time left unused buys nothing (Fashion-MNIST, 5-minute budget,
    seed 0: 2 epochs on 85% of the images tested 0.9209, 1 on all of them 0.9077).
    """
    affordable = max(seconds - RUN_OVERHEAD_SECONDS, 0.0) * images_per_second  # images it can see
    if affordable >= validated_epochs * n_train:
        return max(validated_epochs, min(int(affordable // max(n_train, 1)), max_epochs or 0)), 0
    worth = affordable / max(n_train, 1)  # epochs' worth of time
    epochs = math.floor(worth)
    if epochs < 1 or worth - epochs > FINAL_UNUSED_LIMIT * worth:
        epochs += 1
    epochs = min(epochs, validated_epochs)
    per_epoch = int(affordable / epochs)
    return epochs, 0 if per_epoch >= n_train else max(per_epoch, min(n_train, 64))


def step_final(ctx: Context) -> dict:
    from imgflow.evaluation import evaluate_run

    chosen = ctx.state["chosen"]
    validated = chosen["settings"]["epochs"]
    train = _train_part(ctx)

    def plan() -> dict[str, Any]:
        settings = {k: v for k, v in chosen["settings"].items() if k not in ("folds", "fold")}
        # The chosen candidate's own run trained this model at this batch with this augmentation:
        # its pace predicts the final run's better than a probe does.
        ips = (_observed_throughput(ctx, chosen["run"])
               or _measure_throughput(ctx, settings["model"], settings["batch_size"]))
        test = _dataset(ctx).test
        seconds = max(ctx.remaining() - final_reserve_seconds(len(test) if test is not None else 0, ips),
                      0.25 * BUDGET_SHARE["final"] * ctx.budget_seconds)
        epochs, subset = plan_final_run(seconds, ips, len(train), validated, FINAL_EPOCHS_FACTOR * validated)
        if epochs != validated:
            # The schedule keeps its shape: the same fraction of the run warms up.
            settings["warmup_epochs"] = round(settings.get("warmup_epochs", 0.0) * epochs / validated, 2)
        settings.update(epochs=epochs, val_split=0.0, val_subset=0, train_subset=subset, early_stopping=0)
        return {"images_per_second": ips, "settings": settings}

    settings = _plan_once(ctx, "8-final", plan)["settings"]
    epochs, subset = settings["epochs"], settings["train_subset"]
    run_dir, history = _train(ctx, "8-final", settings)
    trained_on = read_json(run_dir / "config.json", "run config")["data"]["num_train"]  # a stratified subset rounds per class
    # A model trained on mirrored and shifted images is tested on those views too, averaged.
    tta = "flip" in settings.get("augment", "none")
    metrics = evaluate_run(run_dir, tta=tta, progress=ctx.progress)
    metric = ctx.state["metric"]
    ctx.state["final_run"] = str(run_dir)
    ctx.state["test_accuracy"] = metrics["accuracy"]
    try:
        from imgflow.reports import report_run

        report_run(run_dir)
    except ImportError:  # reports are optional for the workflow's numbers
        log.warning("reports module unavailable: no report for the final run")
    usage = (f"imgflow predict {run_dir} IMAGE.jpg [IMAGE ...]   # top classes per image\n"
             f"imgflow export {run_dir} --format onnx            # deploy without imgflow")
    return _step(
        STEP_NAMES[7],
        f"retrained '{chosen['name']}' on "
        + (f"{trained_on} of the {len(train)} training images" if subset else f"all {len(train)} training images")
        + f" for {epochs} epoch{'s' if epochs != 1 else ''}"
        + (f" ({validated} validated; what the rest of the budget paid for)" if epochs != validated or subset else "")
        + "; "
        f"test {metric.replace('_', ' ')} {metrics[metric]:.4f}" + (" with test-time augmentation" if tta else "")
        + f" (majority baseline {metrics['majority_baseline_accuracy']:.4f})",
        "The chosen configuration is retrained with the validation images added back, then evaluated "
        "once on the untouched test split: this number was not used for any decision."
        + (" It trained on mirrored and shifted images, so each test image is classified by the "
           "average of four views: itself, its mirror and both shifted by a pixel." if tta else ""),
        {"test_accuracy": metrics["accuracy"], "tta": tta, "test_balanced_accuracy": metrics["balanced_accuracy"],
         "test_macro_f1": metrics["macro_f1"], "test_loss": metrics["loss"],
         "majority_baseline_accuracy": metrics["majority_baseline_accuracy"], "epochs": epochs,
         "validated_epochs": validated, "train_subset": trained_on if subset else 0},
        runs=[str(run_dir.relative_to(ctx.out))], usage=usage)


STEPS: list[Callable[[Context], dict]] = [step_data, step_metric, step_protocol, step_prepare,
                                          step_baseline, step_overfit, step_tune, step_final]


# ----------------------------------------------------------------------------------------------
# driver


def _record_to_continue(record_path: Path, data: str, seed: int, budget_minutes: float,
                        progress: bool, threads: int | None = None,
                        image_size: tuple[int, int] | None = None) -> dict:
    """The workflow.json to continue (the same DATA, seed, budget and --image-size), or a new one."""
    from imgflow.runs import holds_run
    from imgflow.training.config import absolute_if_path

    out = record_path.parent
    option = list(image_size) if image_size else None
    record = {"data": data, "seed": seed, "budget_minutes": budget_minutes, "image_size": option,
              "steps": [], "state": {}, "elapsed_minutes": 0.0}
    if not record_path.is_file():
        from imgflow.data import load_dataset
        from imgflow.training.batches import check_classifiable

        if holds_run(out):  # its report.html and plots would be replaced by the workflow's
            raise UserError(f"{out} holds a training run, not a workflow: choose another --out")
        # The working size is chosen before decoding: a folder of photos is never held at full size.
        resize = _decide_image_size(data, budget_minutes * 60, threads, image_size)
        record["state"].update(image_size=resize["image_size"], resize=resize)
        # A bad DATA fails here, before anything is written.
        size = tuple(resize["image_size"]) if resize["image_size"] else None
        check_classifiable(load_dataset(data, image_size=size, progress=progress))
        return record
    from imgflow.reports.workflow_report import read_workflow_record

    saved = read_workflow_record(record_path, to_continue=True)
    # ./data, data and /abs/path/data are the same folder: paths compare resolved.
    same_data = absolute_if_path(str(saved.get("data"))) == absolute_if_path(data)
    if not same_data or saved.get("seed") != seed:
        raise UserError(f"{out} holds a workflow for data {saved.get('data')!r} seed {saved.get('seed')}: "
                        "use the same DATA and --seed to continue it, or another --out")
    saved_budget = saved.get("budget_minutes", budget_minutes)
    if saved_budget != budget_minutes:  # the plans so far were cut to the first budget
        raise UserError(f"{out} holds a workflow with a {saved_budget:g}-minute budget: "
                        f"continue it with --budget-minutes {saved_budget:g}, or use another --out")
    if saved.get("image_size") != option:  # every run so far trained at the first size
        given = "x".join(map(str, saved["image_size"])) if saved.get("image_size") else None
        raise UserError(f"{out} holds a workflow " + (f"run with --image-size {given}: continue it with that"
                        if given else "run without --image-size: continue it without one")
                        + ", or use another --out")
    record.update(steps=saved["steps"], state=saved["state"], elapsed_minutes=saved["elapsed_minutes"])
    if len(record["steps"]) < len(STEPS):
        log.info("continuing the workflow in %s after step %d", out, len(record["steps"]))
    return record


def run_workflow(data: str, out: Path, budget_minutes: float = 15.0, seed: int = 0,
                 progress: bool | None = None, threads: int | None = None,
                 image_size: tuple[int, int] | None = None) -> dict:
    """Run (or continue) the eight steps into `out`; return the workflow.json content.

    image_size: (H, W) to train at; None lets step 1 choose (the data's own size, or a smaller
    working size for large images: see WORKING_SIDES).
    """
    from imgflow.training.config import check_seed_and_threads

    if not 0 < budget_minutes < math.inf:
        raise UserError(f"--budget-minutes must be a number > 0, got {budget_minutes}")
    check_seed_and_threads(seed, threads)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another path")
    if progress is None:
        progress = sys.stderr.isatty()
    record_path = out / "workflow.json"
    record = _record_to_continue(record_path, data, seed, budget_minutes, progress, threads, image_size)
    out.mkdir(parents=True, exist_ok=True)

    ctx = Context(data=data, out=out, seed=seed, budget_seconds=budget_minutes * 60,
                  started=time.perf_counter(), elapsed_before=record["elapsed_minutes"] * 60,
                  progress=progress, threads=threads, state=record["state"])

    def save() -> None:
        record["state"] = ctx.state
        record["elapsed_minutes"] = round(ctx.elapsed() / 60, 3)
        write_json(record_path, record)

    ctx.save = save
    ran = False  # a finished workflow run again only rewrites its report: its time is not added
    for index, step in enumerate(STEPS):
        if index < len(record["steps"]):
            continue
        log.info("step %d/%d: %s", index + 1, len(STEPS), STEP_NAMES[index])
        ran = True
        t0 = time.perf_counter()
        try:
            result = step(ctx)
        except BaseException:
            # Ctrl-C or an error: the time spent still counts against the budget when the
            # same command continues (after a kill -9, the time since the last save is lost).
            # A failure before anything was decided leaves no record tying --out to this run.
            if record["steps"] or ctx.state.get("plans"):
                save()
            raise
        result["seconds"] = round(time.perf_counter() - t0, 1)
        record["steps"].append(result)
        save()
        log.info("  -> %s", result["decision"])

    record.update(final_run=ctx.state.get("final_run"), test_accuracy=ctx.state.get("test_accuracy"),
                  budget_minutes=budget_minutes)
    if ran:
        record["elapsed_minutes"] = round(ctx.elapsed() / 60, 3)
    write_json(record_path, record)
    try:
        from imgflow.reports.workflow_report import write_workflow_report

        record["report"] = str(write_workflow_report(out))
        if ran:  # the wall time includes the report (which quotes the time up to the last step)
            record["elapsed_minutes"] = round(ctx.elapsed() / 60, 3)
        write_json(record_path, record)
    except ImportError:
        log.warning("reports module unavailable: no workflow report")
    return record


def format_summary(record: dict) -> str:
    lines = []
    for i, step in enumerate(record["steps"], 1):
        lines.append(f"{i}. {step['name']}: {step['decision']}")
    lines.append("")
    if record.get("test_accuracy") is not None:
        lines.append(f"test accuracy {record['test_accuracy']:.4f} in {record['elapsed_minutes']:.1f} min "
                     f"(budget {record['budget_minutes']:g} min)")
        if record["elapsed_minutes"] > 1.1 * record["budget_minutes"]:
            lines.append("over budget: loading data, speed probes, evaluation and reports take a fixed "
                         "time that a budget this small cannot absorb; see the report's budget section")
    if record["steps"] and "usage" in record["steps"][-1]:
        lines.append(record["steps"][-1]["usage"])
    if record.get("report"):
        lines.append(f"report: {record['report']}")
    return "\n".join(lines)
