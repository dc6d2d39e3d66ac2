"""The training loop: train epochs, validate, checkpoint, resume exactly, save the final weights.

Exact resume rests on three rules:
- the data order of an epoch and the augmentation of a step are drawn from generators seeded by
  (seed, epoch[, step]) alone, so they need no saved state;
- everything else that changes (weights, optimiser, EMA, dropout's global RNG, metric sums,
  history, early-stopping state) is in the checkpoint, saved only at step boundaries;
- a checkpoint replaces the previous one by an atomic rename, so a kill -9 at any moment leaves
  the last complete one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgflow.data import Dataset, Split
from imgflow.device import configure_for_training, describe_device, out_of_memory_as_user_error, resolve_device
from imgflow.errors import UserError
from imgflow.fileio import write_json
from imgflow.history import read_history, write_history
from imgflow.precision import resolve_precision, set_threads
from imgflow.progress import interactive, progress_bar
from imgflow.runs import RunPaths, is_finished, load_run_data, state_dict_mismatch
from imgflow.text import plural
from imgflow.training.batches import EpochBatches, check_classifiable, check_image_size, split_for_training
from imgflow.training.batchnorm import has_batchnorm, reestimate_on_training_part
from imgflow.training.checkpoint import (LoopState, load_checkpoint, new_sums, restore_checkpoint, rng_state,
                                         save_training_state, unreadable_checkpoint)
from imgflow.training.config import TrainConfig
from imgflow.training.features import caches_features, on_cached_features
from imgflow.training.distributed import SINGLE, Ranks, join_torchrun
from imgflow.training.rundir import (OVERWRITE_STAGING, check_run_dir, recording_divergence, run_config,
                                     save_final, swap_in, warn_if_device_changed)
from imgflow.training.schedule import lr_at
from imgflow.training.optim import apply_freezing, apply_whitening_bias
from imgflow.training.step import Learner, TrainingDiverged, evaluate_part, prepare_model, preprocessing_for
from imgflow.weights import detached_copy

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


class _StopRequest:
    """Turns the first Ctrl-C into a flag checked between steps, so a checkpoint is consistent.

    SIGTERM (handled under torchrun only) sets the same flag and never aborts: it is what the
    launcher's death and schedulers send, and each worker may get it more than once.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if not self.requested:
            log.warning("stopping after this step; a checkpoint is being saved (Ctrl-C again to abort)")
        self.requested = True


@contextmanager
def _sigint_as_flag(sigterm: bool = False):
    """Ctrl-C (and with `sigterm`, SIGTERM) as a stop request for the duration."""
    stop = _StopRequest()
    signals = [signal.SIGINT, signal.SIGTERM] if sigterm else [signal.SIGINT]
    try:
        previous = {s: signal.signal(s, stop) for s in signals}
    except ValueError:  # not the main thread: leave signals alone
        yield stop
        return
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_one_epoch(learner: Learner, batches: EpochBatches, loop: LoopState,
                    lr_of_step: Callable[[int], float], after_step: Callable[[], None],
                    progress: bool) -> dict[str, float]:
    """Train epoch loop.epoch from step loop.step to its end.

    lr_of_step: the schedule, global step -> lr. after_step: called after every step (it
    checkpoints when due). Returns the whole epoch's {"train_loss", "train_acc"}, steps run by
    an interrupted process included (and, with several ranks, the images of every rank).
    """
    config = learner.config
    epoch, sums = loop.epoch, loop.sums
    t_epoch = time.perf_counter() - sums["seconds"]  # a resumed epoch counts its earlier seconds
    bar = progress_bar(enabled=progress, total=batches.steps, initial=loop.step,
                       desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)
    with bar:
        for step in range(loop.step, batches.steps):
            images, labels = batches.batch(epoch, step)
            done = learner.train_step(images, labels, lr_of_step(loop.global_step), loop.global_step + 1,
                                      f"epoch {epoch + 1}, step {step + 1}")
            loop.global_step += 1
            loop.step = step + 1
            sums["loss"] += done.loss_sum
            sums["correct"] += done.correct
            sums["seen"] += done.seen
            sums["seconds"] = time.perf_counter() - t_epoch
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}",
                            acc=f"{sums['correct'] / sums['seen']:.3f}",
                            img_s=f"{sums['seen'] / max(sums['seconds'], 1e-9):.0f}", refresh=False)
            after_step()
    return {"train_loss": sums["loss"] / sums["seen"], "train_acc": sums["correct"] / sums["seen"]}


def validate_epoch(learner: Learner, val_part: Split | None, loop: LoopState) -> dict:
    """Return the epoch's {"val_loss", "val_acc"} (None without a validation part), measured on
    the weights that would be saved; keep them in loop.best when early stopping wants them."""
    config = learner.config
    if val_part is None:
        return {"val_loss": None, "val_acc": None}
    with learner.evaluated_weights():
        learner.ranks.broadcast_buffers(learner.model)  # rank 0's BatchNorm statistics: one model
        val = learner.evaluate(val_part)
        if not math.isfinite(val["loss"]):
            raise TrainingDiverged(
                f"validation loss became {val['loss']} after epoch {loop.epoch + 1}: lower --lr (now "
                f"{config.lr}) and start again with --overwrite")
        if config.early_stopping:
            _record_for_early_stopping(loop, val["loss"], learner.model)
    return {"val_loss": val["loss"], "val_acc": val["accuracy"]}


def _record_for_early_stopping(loop: LoopState, val_loss: float, model: torch.nn.Module) -> None:
    if val_loss < loop.best["val_loss"]:
        loop.best = {"val_loss": val_loss, "epoch": loop.epoch + 1,
                     "state": detached_copy(model.state_dict()), "bad_epochs": 0}
    else:
        loop.best["bad_epochs"] += 1


def finish_epoch(learner: Learner, val_part: Split | None, loop: LoopState, trained: dict,
                 lr_of_step: Callable[[int], float]) -> dict:
    """Close the epoch the loop has just trained: check the weights, validate; return its
    history row (without seconds)."""
    config = learner.config
    if learner.ranks.any(not learner.all_finite())[0]:
        raise TrainingDiverged(
            f"the weights became inf/nan in epoch {loop.epoch + 1}: lower --lr (now {config.lr}) "
            "and start again with --overwrite")
    # The lr of the epoch's last step (from the step count: a resume may land after it).
    return {"epoch": loop.epoch + 1, **trained, **validate_epoch(learner, val_part, loop),
            "lr": lr_of_step(loop.global_step - 1)}


def _final_weights(config: TrainConfig, learner: Learner, loop: LoopState) -> tuple[dict, float | None]:
    """(state, its validation accuracy) the run ends with: the best epoch's, the EMA's, or the last."""
    if config.early_stopping and loop.best["state"] is not None:
        log.info("restoring the best weights, from epoch %d (val_loss %.4f)", loop.best["epoch"],
                 loop.best["val_loss"])
        return loop.best["state"], loop.history[loop.best["epoch"] - 1]["val_acc"]
    return learner.final_state(), loop.history[-1]["val_acc"] if loop.history else None


def _with_precise_bn(learner: Learner, state: dict, train_part: Split, val_part: Split | None,
                     val_acc: float | None) -> tuple[dict, dict]:
    """`state` with BatchNorm statistics re-estimated on config.precise_bn training images;
    and what that did ({"images", "seconds", "val_accuracy_before", "val_accuracy"})."""
    config, model = learner.config, learner.model
    started = time.perf_counter()
    model.load_state_dict(state)
    images = reestimate_on_training_part(model, train_part, config.precise_bn, config.seed, learner.prep,
                                         learner.precision, config.eval_batch_size)
    done = {"images": images, "seconds": None, "val_accuracy_before": val_acc, "val_accuracy": None}
    if val_part is not None:
        done["val_accuracy"] = evaluate_part(model, val_part, learner.prep, learner.precision,
                                             config.eval_batch_size, learner.ranks)["accuracy"]
        log.info("BatchNorm statistics re-estimated on %d training images: val accuracy %.4f -> %.4f",
                 images, val_acc, done["val_accuracy"])
    done["seconds"] = round(time.perf_counter() - started, 2)
    return detached_copy(model.state_dict()), done


def train(config: TrainConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, checkpoint_seconds: float | None = None,
          on_epoch: Callable[[dict], None] | None = None, record: dict | None = None) -> TrainResult:
    """Train config.model on config.data into run_dir; return the history and where it went.

    progress: show progress bars (None: in a terminal or a notebook; each epoch's line is logged
    either way). checkpoint_seconds: also checkpoint mid-epoch when this long has passed since the
    last one (default: $IMGFLOW_CHECKPOINT_SECONDS, else 60; 0 = after every step).
    on_epoch: called with each epoch's history row once that epoch is checkpointed; an exception
    it raises stops the run there, resumable (`tune` prunes trials this way). With several
    ranks, rank 0's is called, and what it raises stops every rank at that epoch.
    record: more top-level entries for config.json, beside "train", written when the run starts
    (how its settings were chosen: `train --lr find` records the range test's "lr_find" here).

    Started by torchrun as one of several processes, this process trains its rank's share of the
    run (training/distributed.py); only rank 0 writes files and shows progress.
    """
    if checkpoint_seconds is None:
        checkpoint_seconds = float(os.environ.get("IMGFLOW_CHECKPOINT_SECONDS", 60))
    if progress is None:
        progress = interactive()
    config.validate()
    ranks, device = join_torchrun(config.device)
    progress = progress and ranks.main
    run_dir = Path(run_dir)
    ranks.on_main(lambda: check_run_dir(run_dir, config, resume, overwrite))
    if overwrite and not resume and ranks.on_main(run_dir.is_dir):
        return _train_replacing(config, run_dir, progress, checkpoint_seconds, on_epoch, record,
                                _Where(ranks, device))
    return _train_into(config, run_dir, resume, progress, checkpoint_seconds, on_epoch, record,
                       _Where(ranks, device))


@dataclass(frozen=True)
class _Where:
    """Which process of how many trains, and on what device (`distributed.join_torchrun`)."""

    ranks: Ranks = SINGLE
    device: str | None = None  # a spec for resolve_device; None: the config's


def _train_replacing(config: TrainConfig, run_dir: Path, progress: bool,
                     checkpoint_seconds: float, on_epoch: Callable[[dict], None] | None,
                     record: dict | None = None, where: _Where = _Where()) -> TrainResult:
    """--overwrite: train into a staging directory, and swap it in only once the run has finished.

    Any failure (divergence, bad data, Ctrl-C, a crash) leaves the earlier run as it was. This
    beats moving the old run aside and restoring it on failure: a kill -9 or a power cut runs
    no restore, and would leave the old run hidden and half a new one in its place; here it
    leaves only the staging directory, which the next --overwrite deletes first. The price:
    an interrupted overwrite cannot be resumed; it starts again.
    """
    staging = run_dir / OVERWRITE_STAGING
    main = where.ranks.main
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left behind by a killed overwrite
    try:
        result = _train_into(config, staging, False, progress, checkpoint_seconds, on_epoch, record, where)
    except KeyboardInterrupt:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise KeyboardInterrupt(f"{run_dir} keeps its earlier run; run the same command again to "
                                "replace it") from None
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    where.ranks.on_main(lambda: swap_in(staging, run_dir))
    log.info("replaced the earlier run in %s", run_dir)
    return dataclasses.replace(result, run_dir=run_dir)


@dataclass
class Run:
    """What a run trains with, all built before its directory is touched."""

    config: TrainConfig
    dataset: Dataset
    train_part: Split
    val_part: Split | None
    batches: EpochBatches
    learner: Learner
    threads: int
    ranks: Ranks = SINGLE

    def lr_of_step(self, step: int) -> float:
        """The schedule: global step -> lr. At most half the run warms up, so a preset shortened
        with --epochs still decays."""
        config, total = self.config, self.learner.total_steps
        warmup_steps = min(int(round(config.warmup_epochs * self.batches.steps)), total // 2)
        return lr_at(step, total, config.lr, config.schedule, warmup_steps, final_fraction=config.lr_floor)


def set_up(config: TrainConfig, progress: bool, resumed: Path | None = None, ranks: Ranks = SINGLE,
           device_spec: str | None = None) -> Run:
    """Load and check the data, split it, build the model and its learner.

    resumed: the run directory when continuing a run (its data missing is then data that moved).
    ranks, device_spec: this process's rank, and its device (`distributed.join_torchrun`: under torchrun
    each process on a GPU machine takes its own); None: config.device.
    """
    if ranks.several and config.batch_size < 2 * ranks.world:
        raise UserError(f"--batch-size {config.batch_size} is too small for {ranks.world} processes: each "
                        "takes its share of every batch, and BatchNorm needs 2 images or more of it")
    device = resolve_device(device_spec or config.device)  # before the data loads: --device cuda without CUDA is quick
    if config.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; leave it out, and each "
                        "process keeps BatchNorm statistics of its own share of the batch (the default)")
    dataset = load_run_data(config.to_dict(), progress=progress, remarks=True, run_dir=resumed)
    check_classifiable(dataset)
    check_image_size(dataset, config)
    train_part, val_part = split_for_training(dataset.train, config)
    configure_for_training(device)
    precision = resolve_precision(config.precision, device)
    threads = set_threads(config.threads)
    prep = preprocessing_for(config, dataset, train_part)
    model = prepare_model(config, dataset, train_part, prep, precision, device)
    if config.sync_bn and ranks.several:  # the same parameters and buffers, in modules that sync
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ranks.rank > 0:  # every rank starts from the same weights; dropout draws are each rank's own
        torch.manual_seed(ranks.seed(config.seed))
    batches = EpochBatches(train_part, config, device, ranks)
    learner = Learner(model, config, prep, precision, config.epochs * batches.steps, ranks)
    if caches_features(config, ranks):  # --freeze-backbone: the head trains on the backbone's features
        learner, batches = on_cached_features(learner, train_part, val_part, device, progress) or (learner, batches)
    return Run(config, dataset, train_part, val_part, batches, learner, threads, ranks)


def _train_into(config: TrainConfig, run_dir: Path, resume: bool, progress: bool,
                checkpoint_seconds: float, on_epoch: Callable[[dict], None] | None = None,
                record: dict | None = None, where: _Where = _Where()) -> TrainResult:
    """train(), once the run directory is known to be free (or resumed): load, train, save.

    With several ranks, rank 0 reads the checkpoint and hands it to the others, and alone
    writes; every rank loads the data and builds the model, and a failure on any stops all."""
    paths, ranks = RunPaths(run_dir), where.ranks
    # A damaged checkpoint is refused before the data set loads (and prints its remarks).
    checkpoint = ranks.on_main(lambda: load_checkpoint(paths.checkpoint)
                               if resume and paths.checkpoint.is_file() else None)
    run = ranks.everywhere(lambda: set_up(config, progress, run_dir if resume else None, ranks, where.device))
    run.learner.distribute()
    finished = checkpoint is None or checkpoint["epoch"] >= config.epochs
    if resume and finished and ranks.on_main(lambda: is_finished(run_dir)):
        log.info("%s has already finished; nothing to resume", run_dir)
        return TrainResult(run_dir, ranks.on_main(lambda: read_history(paths.history)))
    device = describe_device(run.learner.device)
    described = run_config(config, run.dataset, run.train_part, run.val_part, run.learner.prep,
                           run.learner.model, run.learner.precision, run.threads, device, ranks.world)
    described.update(record or {})
    # Everything is validated and loaded: only now touch the run directory.
    ranks.on_main(lambda: _start_run_dir(paths, described, device, checkpoint, ranks.world))
    loop = _restored(checkpoint, run, paths) if checkpoint is not None else LoopState()
    log.info("training %s (%s params) on %s: %s / %s, %s of %s, %s, %s, %s", config.model,
             f"{described['model']['params']:,}", run.dataset.name, plural(len(run.train_part), "train image"),
             plural(len(run.val_part) if run.val_part else 0, "val image"), plural(config.epochs, "epoch"),
             plural(run.batches.steps, "step"), _device_words(device, ranks.world), run.learner.precision,
             plural(run.threads, "thread"))
    started = time.perf_counter()
    # Out of memory: the last checkpoint stays (one saved now could hold a half-taken step).
    advice = (f"train again with a smaller --batch-size (now {config.batch_size}) and --overwrite, or free "
              f"the GPU's memory and continue with --resume --out {run_dir}")
    with _sigint_as_flag(sigterm=ranks.several) as stop, recording_divergence(paths) if ranks.main else nullcontext(), \
            out_of_memory_as_user_error(run.learner.device, advice):
        checkpointer = _Checkpointer(paths, run.learner, loop, checkpoint_seconds, stop)
        _train_epochs(run, loop, checkpointer, progress, on_epoch)
    return _finish(run, loop, paths, seconds=loop.elapsed + time.perf_counter() - started)


def _start_run_dir(paths: RunPaths, described: dict, device: dict, checkpoint: dict | None, world: int) -> None:
    """Create the run directory and its config.json, or say what changed since it started."""
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.config.is_file():
        write_json(paths.config, described)
        return
    warn_if_device_changed(paths.root, device)
    started_with = checkpoint.get("world_size", 1) if checkpoint is not None else world
    if started_with != world:
        log.warning("%s was trained by %s: continuing with %d. Every step trains on the same images, but "
                    "BatchNorm statistics and dropout are per process, so the weights may not be those of "
                    "an uninterrupted run", paths.root, plural(started_with, "process", "processes"), world)


def _device_words(device: dict, world: int = 1) -> str:
    """'cpu', 'cuda:0 (NVIDIA H200)', or '2 processes on cpu' for the log line a run starts with."""
    words = device["device"] if device["gpu"] is None else f"{device['device']} ({device['gpu']})"
    return words if world == 1 else f"{world} processes on {words}"


def _restored(checkpoint: dict, run: Run, paths: RunPaths) -> LoopState:
    try:
        loop = restore_checkpoint(checkpoint, run.learner)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # tensors of another shape, ...
        raise unreadable_checkpoint(paths.checkpoint, f"it does not fit this run: "
                                                      f"{state_dict_mismatch(exc)}") from None
    log.info("resuming %s at epoch %d, step %d/%d", paths.root, loop.epoch + 1, loop.step, run.batches.steps)
    return loop


class _Checkpointer:
    """Saves the checkpoint when due (every `interval` seconds, at each epoch's end, on Ctrl-C)."""

    def __init__(self, paths: RunPaths, learner: Learner, loop: LoopState, interval: float, stop: _StopRequest):
        self.paths, self.learner, self.loop, self.interval, self.stop = paths, learner, loop, interval, stop
        self.started = self.last = time.perf_counter()

    def save(self) -> None:
        """Save the checkpoint (with several ranks: every rank calls this together, rank 0 writes)."""
        ranks = self.learner.ranks
        states = ranks.gather(rng_state(self.learner.device)) if ranks.several else None
        if ranks.main:
            save_training_state(self.paths.checkpoint, self.learner, self.loop,
                                time.perf_counter() - self.started, states)
        self.last = time.perf_counter()

    def stop_if_asked(self) -> None:
        if self.learner.ranks.any(self.stop.requested)[0]:  # Ctrl-C seen by any rank stops all
            raise KeyboardInterrupt(f"checkpoint saved; continue with --resume --out {self.paths.root}")

    def after_step(self) -> None:
        stop, due = self.learner.ranks.any(self.stop.requested, time.perf_counter() - self.last >= self.interval)
        if stop or due:
            self.save()
        if stop:
            raise KeyboardInterrupt(f"checkpoint saved; continue with --resume --out {self.paths.root}")


def _train_epochs(run: Run, loop: LoopState, checkpointer: _Checkpointer, progress: bool,
                  on_epoch: Callable[[dict], None] | None) -> None:
    """Train the epochs left, checkpointing and writing history.csv after each."""
    config, paths = run.config, checkpointer.paths
    run.learner.model.train()
    while loop.epoch < config.epochs:
        apply_freezing(run.learner.model, config, loop.epoch)
        apply_whitening_bias(run.learner.optimizer, config, loop.epoch)
        epoch_started = time.perf_counter() - loop.sums["seconds"]  # earlier when resumed mid-epoch
        trained = train_one_epoch(run.learner, run.batches, loop, run.lr_of_step, checkpointer.after_step,
                                  progress)
        row = finish_epoch(run.learner, run.val_part, loop, trained, run.lr_of_step)
        row["seconds"] = round(time.perf_counter() - epoch_started, 3)
        loop.history.append(row)
        log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %s  val_acc %s  lr %.3g  %.1fs",
                 row["epoch"], config.epochs, row["train_loss"], row["train_acc"],
                 "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}",
                 "-" if row["val_acc"] is None else f"{row['val_acc']:.4f}", row["lr"], row["seconds"])
        if run.ranks.main:
            write_history(paths.history, loop.history)
        loop.epoch, loop.step, loop.sums = loop.epoch + 1, 0, new_sums()
        if config.early_stopping and loop.best["bad_epochs"] >= config.early_stopping:
            loop.epoch = config.epochs  # nothing left to do on resume
            log.info("early stopping: val_loss has not improved for %s", plural(config.early_stopping, "epoch"))
            checkpointer.save()
            return  # finish the run even if Ctrl-C came now: only the weights are left to save
        checkpointer.save()
        checkpointer.stop_if_asked()
        if on_epoch is not None or run.ranks.several:  # rank 0's: what it raises stops every rank here
            run.ranks.on_main(lambda: on_epoch(row) if on_epoch is not None else None)


def _finish(run: Run, loop: LoopState, paths: RunPaths, seconds: float) -> TrainResult:
    """Save the weights the run ends with (best, averaged, BatchNorm re-estimated) and its result."""
    config = run.config
    # From the history, not a flag: a run resumed after its last checkpoint must say it too.
    stopped_early = len(loop.history) < config.epochs
    state, val_acc = _final_weights(config, run.learner, loop)
    precise_bn = None
    if config.precise_bn and has_batchnorm(run.learner.model):
        state, precise_bn = _with_precise_bn(run.learner, state, run.train_part, run.val_part, val_acc)
        val_acc = precise_bn["val_accuracy"]
    elif config.precise_bn:
        log.info("--precise-bn: %s has no BatchNorm layer, nothing to re-estimate", config.model)
    if not run.ranks.main:
        return TrainResult(paths.root, loop.history, loop.best["epoch"], stopped_early, seconds)
    save_final(paths, config, state, {
        "epochs_run": len(loop.history), "best_epoch": loop.best["epoch"], "stopped_early": stopped_early,
        "train_seconds": round(seconds, 2),
        # Images trained per second of the whole run (validation and checkpoints included).
        "train_images_per_second": round(len(loop.history) * len(run.train_part) / max(seconds, 1e-9), 1),
        "final_val_accuracy": val_acc,  # of the weights saved
        "precise_bn": precise_bn,
    })
    return TrainResult(paths.root, loop.history, loop.best["epoch"], stopped_early, seconds)
