"""The training loop: split, train epochs, validate, checkpoint, resume exactly, save weights.

Exact resume rests on three rules:
- the data order of an epoch and the augmentation of a step are drawn from generators seeded by
  (seed, epoch[, step]) alone, so they need no saved state;
- everything else that changes (weights, optimiser, EMA, dropout's global RNG, metric sums,
  history, early-stopping state) is in the checkpoint, saved only at step boundaries;
- a checkpoint replaces the previous one by an atomic rename, so a kill -9 at any moment leaves
  the last complete one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imgflow.data import Dataset, Split, channel_stats
from imgflow.data.splits import kfold_split, split_train_val, stratified_subset
from imgflow.errors import MalformedContent, UserError
from imgflow.fileio import atomic_write, atomic_write_text, read_json, write_json
from imgflow.inference import loss_and_accuracy, predict_logits
from imgflow.models import count_params, create_model
from imgflow.precision import autocast, resolve_precision, set_threads
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.text import plural
from imgflow.runs import RunPaths, holds_run, is_finished, load_run_data, read_run_config, state_dict_mismatch
from imgflow.training.augment import (alternating_flips, augment_batch, flip_mask, seeded_generator,
                                      step_generator)
from imgflow.training.batchnorm import has_batchnorm, reestimate_on_training_part
from imgflow.training.config import TrainConfig
from imgflow.training.schedule import lr_at

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
# Fields that may differ between the run that started and the one that resumes it. Another
# thread count can change the order of floating-point sums, so such a resume is warned about:
# it continues the run, but not necessarily bit for bit.
_RESUMABLE_DIFFERENCES = {"threads"}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# data split and order


# Images above this many pixels train at their own size with a warning that suggests --image-size,
# once per data set and size in a process (imgflow tune trains one run per trial).
LARGE_IMAGE_PIXELS = 128 * 128
_warned_large_images: set[tuple[str, int, int]] = set()


def check_classifiable(dataset: Dataset) -> None:
    """UserError unless the data set has the two classes or more a classifier needs."""
    if dataset.num_classes < 2:
        raise UserError(f"{dataset.name} has {dataset.num_classes} class: a classifier needs at least 2 "
                        "(one sub-folder per class)")


def split_for_training(train: Split, config: TrainConfig) -> tuple[Split, Split | None]:
    """The training and validation parts this config trains and validates on."""
    if config.folds:
        train_part, val_part = kfold_split(train, config.folds, config.fold, config.seed)
    else:
        train_part, val_part = split_train_val(train, config.val_split, config.val_mode, config.seed)
    if val_part is not None:
        val_part = stratified_subset(val_part, config.val_subset, config.seed)
    train_part = stratified_subset(train_part, config.train_subset, config.seed)
    if len(train_part) < 2:
        raise UserError(f"only {plural(len(train_part), 'training image')} left after the validation split "
                        "and --train-subset: lower --val-split or raise --train-subset")
    return train_part, val_part


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch, 0x0DE2))


def steps_per_epoch(n: int, batch_size: int) -> int:
    # Keras keeps the last partial batch; we do too, except a batch of one, which BatchNorm
    # cannot normalise in training mode.
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


# ----------------------------------------------------------------------------------------------
# model pieces


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Conv/dense weights with weight decay; BatchNorm parameters and biases without.

    Decaying BatchNorm and biases only hurts. Each group's `lr_scale` multiplies the scheduled
    lr: BatchNorm gets `bn_lr_scale` (airbench trains its BatchNorm biases 64x faster: their
    gradients are small, and they set where each activation bends). airbench's BatchNorm has no
    trainable scale, like the fast family here; in a model whose BatchNorm scales train
    (seed-batchnorm), they get the multiplier too.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay,
               "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if config.bn_lr_scale != 1.0:
        norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
        norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
        groups[1]["params"] = [p for p in groups[1]["params"] if id(p) not in norm]
        groups.append({"params": [p for p in params if id(p) in norm], "weight_decay": 0.0,
                       "lr_scale": config.bn_lr_scale})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps)
    # Keras' Adam has no weight decay; with --weight-decay it is the classic L2 form.
    return torch.optim.Adam(groups, lr=config.lr, eps=config.adam_eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's lr_scale (absent in checkpoints from before it: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class WeightEMA:
    """Exponential moving average of the weights; BatchNorm statistics are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point and not k.endswith(("running_mean", "running_var")):
                self.state[k].lerp_(v, 1.0 - self.decay)
            else:
                self.state[k].copy_(v)


class Lookahead:
    """airbench's lookahead: every `every` steps, a slow copy of the weights moves toward the
    live ones and the live ones jump back to it.

    The slow copy's decay grows as 0.95^every * (step/total)^3: early on it is ~0 (the live
    weights run free); at the end it is 0.77 for every=5, a memory of ~4 updates (~20 steps),
    which smooths the last, small-lr steps of a short run. BatchNorm statistics are averaged the
    same way, so they match the averaged weights. The last step syncs too, so the model ends on
    the slow weights and no step is dropped. (Weights that share storage would be updated twice;
    no registered model ties weights.)
    """

    def __init__(self, model: torch.nn.Module, every: int):
        self.every = every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if v.dtype.is_floating_point}

    def decay_at(self, step: int, total_steps: int) -> float:
        return 0.95 ** self.every * (step / max(total_steps, 1)) ** 3

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].lerp_(v, 1.0 - decay)
                v.copy_(self.state[k])

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """Sync after every `every`-th step and after the last one.

        The first sync takes the live weights as they are (decay 0): the slow copy then never
        holds the initial weights, which a run shorter than `every` steps would otherwise end on
        with weight 0.77. In a run of thousands of steps the first decay is ~1e-9 anyway.
        """
        if step % self.every == 0 or step == total_steps:
            self.update(model, 0.0 if step <= self.every else self.decay_at(step, total_steps))


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors; channels_last conv weights are not.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def prepare_model(config: TrainConfig, dataset: Dataset, train_part: Split, prep: Preprocessing,
                  precision: str) -> torch.nn.Module:
    """Create the model with the seed's initialisation; fit data-dependent layers if any."""
    H, W, C = dataset.image_shape
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=dataset.num_classes, in_channels=C, image_size=(H, W))
    if hasattr(model, "init_whitening"):
        # Fitted on a fixed, seeded sample of the training part (never validation or test).
        n = min(5000, len(train_part))
        idx = np.random.default_rng([config.seed, 0x3417]).choice(len(train_part), n, replace=False)
        model.init_whitening(to_model_input(torch.from_numpy(train_part.images[np.sort(idx)]), prep))
    # channels_last: oneDNN's convolutions run faster on NHWC in fp32 too (1.3x measured on
    # seed-baseline here), and uint8 NHWC batches become NHWC floats without a copy.
    return model.to(memory_format=torch.channels_last)


def preprocessing_for(config: TrainConfig, dataset: Dataset, train_part: Split) -> Preprocessing:
    H, W, C = dataset.image_shape
    if config.normalize == "standardize":
        mean, std = channel_stats(train_part.images)  # training part only: no peeking at val/test
        std = [max(s, 1e-3) for s in std]
    else:
        mean, std = [0.0] * C, [1.0] * C
    return Preprocessing(tuple(mean), tuple(std), (H, W), C)


# ----------------------------------------------------------------------------------------------
# run directory


def _versions() -> dict[str, str]:
    import PIL
    import safetensors
    import sklearn

    from imgflow import __version__

    return {"imgflow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__,
            "safetensors": getattr(safetensors, "__version__", "?")}


def machine_info() -> dict[str, str | int | bool]:
    """CPU model, family and the vector features that decide speed here (results depend on them)."""
    from imgflow.precision import cpu_info, cpu_supports_bf16

    fields = cpu_info()
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_family": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "cpu_count": os.cpu_count() or 1, "avx512": "avx512f" in flags,
            "native_bf16": cpu_supports_bf16(), "platform": platform.platform(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def config_differences(run_dir: Path, config: TrainConfig) -> list[str]:
    """'option=value as started' for each setting of the run in run_dir that `config` changes."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        return []
    saved = read_run_config(run_dir)["train"]
    mine = config.to_dict()
    # An option added after the run started is missing from its config: the run used
    # what is now that option's default.
    defaults = TrainConfig("", "").to_dict()
    if saved.get("threads", defaults["threads"]) != mine["threads"]:
        log.warning("%s was started with --threads %s: continuing with %s may not end on "
                    "bit-identical weights", run_dir, saved.get("threads"), mine["threads"])
    return [f"{k}={saved.get(k, defaults[k])!r}" for k in sorted(mine)
            if k not in _RESUMABLE_DIFFERENCES and saved.get(k, defaults[k]) != mine[k]]


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run; make sure --resume continues the same configuration."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a directory: choose another path")
    if (run_dir / "workflow.json").is_file():  # its report.html and plots/ have a run's names
        raise UserError(f"{run_dir} holds a workflow, not a training run: choose another --out "
                        "(the workflow's own runs are in its runs/ folder)")
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"cannot resume: {run_dir} does not exist (start it without --resume)")
        diff = config_differences(run_dir, config)
        if diff:
            raise UserError(f"{run_dir} was started with {', '.join(diff)}; resume with the same options "
                            "or use --overwrite to start again")
        return
    if holds_run(run_dir) and not overwrite:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")


# --overwrite trains the new run here, inside the run directory (so on its file system: the swap
# is a handful of renames), and moves the old run's files here just before deleting them.
OVERWRITE_STAGING = ".overwrite-new"
OVERWRITE_TRASH = ".overwrite-old"


def _swap_in(staging: Path, run_dir: Path) -> None:
    """Replace the run in run_dir by the finished one in staging.

    Every artifact of the old run goes, the ones made from its model too (export/, metrics,
    report, plots): they would describe a model that no longer exists. Files the user put in
    the directory stay. The old files are renamed aside before the new ones are renamed in, so
    only a crash within these few renames could leave the directory without a run.
    """
    trash = run_dir / OVERWRITE_TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for path in RunPaths(run_dir).artifacts():
        if path.exists() or path.is_symlink():
            os.replace(path, trash / path.name)
    for path in staging.iterdir():
        os.replace(path, run_dir / path.name)
    staging.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


def _train_replacing(config: TrainConfig, run_dir: Path, progress: bool | None,
                     checkpoint_seconds: float, on_epoch: Callable[[dict], None] | None) -> TrainResult:
    """--overwrite: train into a staging directory, and swap it in only once the run has finished.

    Any failure (divergence, bad data, Ctrl-C, a crash) leaves the earlier run as it was. This
    beats moving the old run aside and restoring it on failure: a kill -9 or a power cut runs
    no restore, and would leave the old run hidden and half a new one in its place; here it
    leaves only the staging directory, which the next --overwrite deletes first. The price:
    an interrupted overwrite cannot be resumed; it starts again.
    """
    staging = run_dir / OVERWRITE_STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left behind by a killed overwrite
    try:
        result = _train_into(config, staging, False, progress, checkpoint_seconds, on_epoch)
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise KeyboardInterrupt(f"{run_dir} keeps its earlier run; run the same command again to "
                                "replace it") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, run_dir)
    log.info("replaced the earlier run in %s", run_dir)
    return dataclasses.replace(result, run_dir=run_dir)


def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict]:
    """history.csv as a list of dicts with floats (empty cells -> None); a damaged file (not
    UTF-8, missing columns, cells that are not numbers) is a UserError."""
    if not Path(path).is_file():
        raise UserError(f"history not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in HISTORY_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise MalformedContent(f"its header lacks {', '.join(missing)}")
            return [_history_row(row, reader.line_num) for row in reader]
    except UnicodeDecodeError as exc:
        detail = f"byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8 text"
    except (MalformedContent, csv.Error) as exc:
        detail = str(exc)
    raise UserError(f"{path} is not a valid imgflow history: {detail}; restore it, or train the run "
                    "again (imgflow train ... --overwrite)")


def _history_row(row: dict, line: int) -> dict:
    if None in row or None in row.values():  # csv's markers for extra and for missing cells
        raise MalformedContent(f"line {line} does not have one cell per column")
    try:
        parsed = {k: (float(v) if v != "" else None) for k, v in row.items()}
    except ValueError:
        raise MalformedContent(f"line {line} holds a cell that is not a number") from None
    if parsed["epoch"] is None or not parsed["epoch"].is_integer():
        raise MalformedContent(f"line {line} has no whole epoch number")
    parsed["epoch"] = int(parsed["epoch"])
    return parsed


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


_CHECKPOINT_KEYS = ("model", "optimizer", "rng", "history", "epoch", "step", "global_step", "sums",
                    "best", "elapsed")


def _unreadable_checkpoint(path: Path, detail: str) -> UserError:
    return UserError(f"checkpoint {path} is unreadable ({detail}): delete {Path(path).parent} to start "
                     "the run over, or train again with --overwrite")


def load_checkpoint(path: Path) -> dict:
    # weights_only: the restricted unpickler, tensors and plain containers only. PyTorch's own
    # message on failure spans lines and suggests weights_only=False, which would run any code
    # the file holds: never pass it on.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol ..." on foreign pickles
            checkpoint = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt or foreign file
        raise _unreadable_checkpoint(path, f"truncated, corrupt or not an imgflow checkpoint: "
                                          f"{type(exc).__name__}") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else ["all"]
    if missing or not isinstance(checkpoint["epoch"], int):
        raise _unreadable_checkpoint(path, f"not an imgflow checkpoint: missing {', '.join(missing) or 'epoch'}")
    return checkpoint


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(_clean_state(state), str(tmp), metadata=metadata))


# ----------------------------------------------------------------------------------------------
# the loop


class _StopRequest:
    """Turns the first Ctrl-C into a flag checked between steps, so a checkpoint is consistent."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step; a checkpoint is being saved (Ctrl-C again to abort)")


@contextmanager
def _sigint_as_flag():
    stop = _StopRequest()
    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _recording_divergence(paths: RunPaths):
    """A run stopped by the NaN/inf guard says so in its config.json: `report`, `evaluate` and
    the others then advise retraining with a lower --lr, not a --resume that would diverge again."""
    try:
        yield
    except TrainingDiverged as exc:
        saved = read_json(paths.config, "run config")
        saved["diverged"] = str(exc)
        write_json(paths.config, saved)
        raise


def _evaluate_part(model: torch.nn.Module, part: Split, prep: Preprocessing, precision: str,
                   batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    logits = predict_logits(model, part.images, prep, precision, batch_size)
    model.train(was_training)
    return loss_and_accuracy(logits, part.labels)


class EpochBatches:
    """The training part as uint8 batches: batch (epoch, step) is the same in every process."""

    def __init__(self, part: Split, config: TrainConfig):
        self.images = torch.from_numpy(part.images)
        self.labels = torch.from_numpy(part.labels)
        self.config = config
        self.steps = steps_per_epoch(len(part), config.batch_size)
        self.flip_coins = alternating_flips(len(part), config.seed) if config.flip == "alternate" else None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its order): drawn once per epoch

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (images, labels) of one step, images augmented as the config says."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.labels), self.config.seed, epoch))
        size = self.config.batch_size
        idx = self._order[1][step * size:(step + 1) * size]
        xb, yb = self.images[idx], self.labels[idx]
        if self.config.augment != "none":
            flips = flip_mask(self.flip_coins, idx, epoch) if self.flip_coins is not None else None
            xb = augment_batch(xb, self.config.augment, step_generator(self.config.seed, epoch, step),
                               translate=self.config.translate, cutout=self.config.cutout, flip=flips)
        return xb, yb


class Learner:
    """The model, how its input is prepared, and everything that updates its weights."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, prep: Preprocessing, precision: str,
                 total_steps: int):
        self.model, self.config, self.prep, self.precision = model, config, prep, precision
        self.total_steps = total_steps
        self.optimizer = build_optimizer(model, config)
        self.ema = WeightEMA(model, config.ema) if config.ema > 0 else None
        self.lookahead = Lookahead(model, config.lookahead) if config.lookahead > 0 else None

    def logits_and_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, loss) of a uint8 batch, the loss in fp32 whatever the precision."""
        with autocast(self.precision):
            logits = self.model(to_model_input(images, self.prep, channels_last=True))
        return logits, F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Take optimiser step number `step` (1-based) down `loss`, then the averaging ones."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, step, self.total_steps)

    def all_finite(self) -> bool:
        """True when weights, BatchNorm statistics and the EMA hold no inf or nan."""
        averaged = self.ema.state.values() if self.ema is not None else []
        return all(bool(torch.isfinite(t).all()) for t in [*self.model.state_dict().values(), *averaged]
                   if t.is_floating_point())

    @contextmanager
    def evaluated_weights(self):
        """Put the weights that would be saved (the EMA's, if any) in the model for a while."""
        if self.ema is None:
            yield
            return
        live = _clean_state(self.model.state_dict())
        self.model.load_state_dict(self.ema.state)
        try:
            yield
        finally:
            self.model.load_state_dict(live)

    def final_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state if self.ema is not None else self.model.state_dict()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state if self.ema is not None else None,
                "lookahead": self.lookahead.state if self.lookahead is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.state = state["ema"]
        if self.lookahead is not None:
            self.lookahead.state = state["lookahead"]


def _new_sums() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def _no_best() -> dict:
    return {"val_loss": math.inf, "epoch": None, "state": None, "bad_epochs": 0}


@dataclass
class LoopState:
    """Where the loop is and what it has measured: the checkpoint carries all of it."""

    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    global_step: int = 0  # steps finished in the run: what the lr schedule reads
    sums: dict = field(default_factory=_new_sums)  # running loss, accuracy and seconds of this epoch
    best: dict = field(default_factory=_no_best)  # early stopping: best val_loss, its epoch and weights
    elapsed: float = 0.0  # seconds trained by the processes before this one


def save_training_state(path: Path, learner: Learner, loop: LoopState, seconds_here: float) -> None:
    """Checkpoint the learner and the loop (seconds_here: trained by this process so far)."""
    save_checkpoint(path, {**learner.state_dict(), "rng": torch.get_rng_state(),
                           "history": loop.history, "epoch": loop.epoch, "step": loop.step,
                           "global_step": loop.global_step, "sums": loop.sums, "best": loop.best,
                           "elapsed": loop.elapsed + seconds_here})


def restore_checkpoint(checkpoint: dict, learner: Learner) -> LoopState:
    """Load a checkpoint into the learner and the global RNG; return the loop state it holds."""
    learner.load_state_dict(checkpoint)
    torch.set_rng_state(checkpoint["rng"])
    return LoopState(history=checkpoint["history"], epoch=checkpoint["epoch"], step=checkpoint["step"],
                     global_step=checkpoint["global_step"], sums=checkpoint["sums"], best=checkpoint["best"],
                     elapsed=checkpoint["elapsed"])


def train_one_epoch(learner: Learner, batches: EpochBatches, loop: LoopState,
                    lr_of_step: Callable[[int], float], after_step: Callable[[], None],
                    progress: bool) -> dict[str, float]:
    """Train epoch loop.epoch from step loop.step to its end.

    lr_of_step: the schedule, global step -> lr. after_step: called after every step (it
    checkpoints when due). Returns the whole epoch's {"train_loss", "train_acc"}, steps run by
    an interrupted process included.
    """
    config = learner.config
    epoch, sums = loop.epoch, loop.sums
    t_epoch = time.perf_counter() - sums["seconds"]  # a resumed epoch counts its earlier seconds
    bar = tqdm(total=batches.steps, initial=loop.step, desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    with bar:
        for step in range(loop.step, batches.steps):
            images, labels = batches.batch(epoch, step)
            set_lr(learner.optimizer, lr_of_step(loop.global_step))
            logits, loss = learner.logits_and_loss(images, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: lower --lr "
                    f"(now {config.lr}) and start again with --overwrite")
            _update_or_diverge(learner, loss, loop.global_step + 1, f"epoch {epoch + 1}, step {step + 1}")
            loop.global_step += 1
            loop.step = step + 1
            sums["loss"] += loss.item() * len(labels)
            sums["correct"] += int((logits.argmax(1) == labels).sum())
            sums["seen"] += len(labels)
            sums["seconds"] = time.perf_counter() - t_epoch
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}",
                            acc=f"{sums['correct'] / sums['seen']:.3f}",
                            img_s=f"{sums['seen'] / max(sums['seconds'], 1e-9):.0f}", refresh=False)
            after_step()
    return {"train_loss": sums["loss"] / sums["seen"], "train_acc": sums["correct"] / sums["seen"]}


def _update_or_diverge(learner: Learner, loss: torch.Tensor, step: int, where: str) -> None:
    """learner.update, with a float32 overflow inside the optimiser reported as divergence."""
    try:
        learner.update(loss, step)
    except RuntimeError as exc:
        # PyTorch refuses a scalar (lr x scale, decay) that does not fit the float32 weights.
        if "overflow" not in str(exc):
            raise
        config = learner.config
        raise TrainingDiverged(
            f"the update overflowed float32 at {where}: lower --lr (now {config.lr}), --weight-decay "
            f"(now {config.weight_decay}) or --bn-lr-scale (now {config.bn_lr_scale}) and start again "
            "with --overwrite") from None


def validate_epoch(learner: Learner, val_part: Split | None, loop: LoopState) -> dict:
    """Return the epoch's {"val_loss", "val_acc"} (None without a validation part), measured on
    the weights that would be saved; keep them in loop.best when early stopping wants them."""
    config = learner.config
    if val_part is None:
        return {"val_loss": None, "val_acc": None}
    with learner.evaluated_weights():
        val = _evaluate_part(learner.model, val_part, learner.prep, learner.precision, config.eval_batch_size)
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
                     "state": _clean_state(model.state_dict()), "bad_epochs": 0}
    else:
        loop.best["bad_epochs"] += 1


def finish_epoch(learner: Learner, val_part: Split | None, loop: LoopState, trained: dict,
                 lr_of_step: Callable[[int], float]) -> dict:
    """Close the epoch the loop has just trained: check the weights, validate; return its
    history row (without seconds)."""
    config = learner.config
    if not learner.all_finite():
        raise TrainingDiverged(
            f"the weights became inf/nan in epoch {loop.epoch + 1}: lower --lr (now {config.lr}) "
            "and start again with --overwrite")
    # The lr of the epoch's last step (from the step count: a resume may land after it).
    return {"epoch": loop.epoch + 1, **trained, **validate_epoch(learner, val_part, loop),
            "lr": lr_of_step(loop.global_step - 1)}


def _run_config(config: TrainConfig, dataset: Dataset, train_part: Split, val_part: Split | None,
                prep: Preprocessing, model: torch.nn.Module, precision: str, threads: int) -> dict:
    """The config.json of a run: resolved settings, data, preprocessing, model, machine."""
    H, W, C = dataset.image_shape
    return {
        "train": config.to_dict(),
        "data": {"name": dataset.name, "source": dataset.source, "sha256": dataset.sha256,
                 "classes": dataset.classes, "image_shape": [H, W, C],
                 "num_train": len(train_part), "num_val": len(val_part) if val_part else 0,
                 "num_test": len(dataset.test) if dataset.test is not None else 0,
                 "skipped": len(dataset.skipped)},
        "preprocessing": prep.to_dict(),
        "model": {"name": config.model, "num_classes": dataset.num_classes, "in_channels": C,
                  "image_size": [H, W], **count_params(model)},
        "precision": precision, "threads": threads,
        "steps_per_epoch": steps_per_epoch(len(train_part), config.batch_size),
        "versions": _versions(), "machine": machine_info(),
    }


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
        done["val_accuracy"] = _evaluate_part(model, val_part, learner.prep, learner.precision,
                                              config.eval_batch_size)["accuracy"]
        log.info("BatchNorm statistics re-estimated on %d training images: val accuracy %.4f -> %.4f",
                 images, val_acc, done["val_accuracy"])
    done["seconds"] = round(time.perf_counter() - started, 2)
    return _clean_state(model.state_dict()), done


def _save_final(paths: RunPaths, config: TrainConfig, state: dict, result: dict) -> None:
    """Save the weights the run ends with and add its result to config.json."""
    save_weights(paths.weights, state, {"model": config.model, "format": "imgflow"})
    saved = read_json(paths.config, "run config")
    saved["result"] = result
    saved.pop("diverged", None)  # an earlier attempt's, which this one got past
    write_json(paths.config, saved)
    log.info("saved %s (training took %.1f s)", paths.weights, result["train_seconds"])


def train(config: TrainConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, checkpoint_seconds: float | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train config.model on config.data into run_dir; return the history and where it went.

    checkpoint_seconds: also checkpoint mid-epoch when this long has passed since the last one
    (default: $IMGFLOW_CHECKPOINT_SECONDS, else 60; 0 = after every step).
    on_epoch: called with each epoch's history row once that epoch is checkpointed; an exception
    it raises stops the run there, resumable (`tune` prunes trials this way).
    """
    if checkpoint_seconds is None:
        checkpoint_seconds = float(os.environ.get("IMGFLOW_CHECKPOINT_SECONDS", 60))
    config.validate()
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, config, resume, overwrite)
    if overwrite and not resume and run_dir.is_dir():
        return _train_replacing(config, run_dir, progress, checkpoint_seconds, on_epoch)
    return _train_into(config, run_dir, resume, progress, checkpoint_seconds, on_epoch)


def _train_into(config: TrainConfig, run_dir: Path, resume: bool, progress: bool | None,
                checkpoint_seconds: float, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """train(), once the run directory is known to be free (or resumed): load, train, save."""
    paths = RunPaths(run_dir)
    if progress is None:
        progress = sys.stderr.isatty()
    # A damaged checkpoint is refused before the data set loads (and prints its remarks).
    checkpoint = load_checkpoint(paths.checkpoint) if resume and paths.checkpoint.is_file() else None

    dataset = load_run_data(config.to_dict(), progress=progress, remarks=True)
    check_classifiable(dataset)
    H, W = dataset.image_shape[:2]
    if "translate" in config.augment and config.translate >= min(H, W):  # reflection needs a shift < the side
        raise UserError(f"--translate {config.translate} must be smaller than the images' {H}x{W}: "
                        f"give a shift below {min(H, W)} pixels (the presets use 2)")
    if config.image_size is None and H * W > LARGE_IMAGE_PIXELS and (dataset.name, H, W) not in _warned_large_images:
        _warned_large_images.add((dataset.name, H, W))
        log.warning("training at the data's own %dx%d: each image costs about %.0fx a 32x32 one; "
                    "--image-size 64 or 96 trains far faster (imgflow workflow picks a size for its budget)",
                    H, W, H * W / 1024)
    train_part, val_part = split_for_training(dataset.train, config)
    precision = resolve_precision(config.precision)
    threads = set_threads(config.threads)
    prep = preprocessing_for(config, dataset, train_part)
    model = prepare_model(config, dataset, train_part, prep, precision)
    batches = EpochBatches(train_part, config)
    total_steps = config.epochs * batches.steps
    learner = Learner(model, config, prep, precision, total_steps)
    # At most half the run warms up, so a preset shortened with --epochs still decays.
    warmup_steps = min(int(round(config.warmup_epochs * batches.steps)), total_steps // 2)

    def lr_of_step(step: int) -> float:
        return lr_at(step, total_steps, config.lr, config.schedule, warmup_steps, final_fraction=config.lr_floor)

    # Everything is validated and loaded: only now touch the run directory.
    finished = checkpoint is None or checkpoint["epoch"] >= config.epochs
    if resume and finished and is_finished(run_dir):
        log.info("%s has already finished; nothing to resume", run_dir)
        return TrainResult(run_dir, read_history(paths.history))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = _run_config(config, dataset, train_part, val_part, prep, model, precision, threads)
    if not paths.config.is_file():
        write_json(paths.config, run_config)

    loop = LoopState()
    if checkpoint is not None:
        try:
            loop = restore_checkpoint(checkpoint, learner)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # tensors of another shape, ...
            raise _unreadable_checkpoint(paths.checkpoint, f"it does not fit this run: "
                                                           f"{state_dict_mismatch(exc)}") from None
        log.info("resuming %s at epoch %d, step %d/%d", run_dir, loop.epoch + 1, loop.step, batches.steps)
    log.info("training %s (%s params) on %s: %d train / %d val images, %d epochs of %d steps, %s, %d threads",
             config.model, f"{run_config['model']['params']:,}", dataset.name, len(train_part),
             len(val_part) if val_part else 0, config.epochs, batches.steps, precision, threads)
    t_start = time.perf_counter()
    last_checkpoint = t_start
    model.train()
    with _sigint_as_flag() as stop, _recording_divergence(paths):

        def save_state() -> None:
            nonlocal last_checkpoint
            save_training_state(paths.checkpoint, learner, loop, time.perf_counter() - t_start)
            last_checkpoint = time.perf_counter()

        def stop_if_asked() -> None:
            if stop.requested:
                raise KeyboardInterrupt(f"checkpoint saved; continue with --resume --out {run_dir}")

        def after_step() -> None:
            if stop.requested or time.perf_counter() - last_checkpoint >= checkpoint_seconds:
                save_state()
                stop_if_asked()

        while loop.epoch < config.epochs:
            epoch_started = time.perf_counter() - loop.sums["seconds"]  # earlier when resumed mid-epoch
            trained = train_one_epoch(learner, batches, loop, lr_of_step, after_step, progress)
            row = finish_epoch(learner, val_part, loop, trained, lr_of_step)
            row["seconds"] = round(time.perf_counter() - epoch_started, 3)
            loop.history.append(row)
            log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %s  val_acc %s  lr %.3g  %.1fs",
                     row["epoch"], config.epochs, row["train_loss"], row["train_acc"],
                     "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}",
                     "-" if row["val_acc"] is None else f"{row['val_acc']:.4f}", row["lr"], row["seconds"])
            write_history(paths.history, loop.history)
            loop.epoch, loop.step, loop.sums = loop.epoch + 1, 0, _new_sums()
            if config.early_stopping and loop.best["bad_epochs"] >= config.early_stopping:
                loop.epoch = config.epochs  # nothing left to do on resume
                log.info("early stopping: val_loss has not improved for %d epochs", config.early_stopping)
                save_state()
                break  # finish the run even if Ctrl-C came now: only the weights are left to save
            save_state()
            stop_if_asked()
            if on_epoch is not None:
                on_epoch(row)

    seconds = loop.elapsed + time.perf_counter() - t_start  # training time, as the epochs count it
    # From the history, not a flag: a run resumed after its last checkpoint must say it too.
    stopped_early = len(loop.history) < config.epochs
    state, val_acc = _final_weights(config, learner, loop)
    precise_bn = None
    if config.precise_bn and has_batchnorm(model):
        state, precise_bn = _with_precise_bn(learner, state, train_part, val_part, val_acc)
        val_acc = precise_bn["val_accuracy"]
    elif config.precise_bn:
        log.info("--precise-bn: %s has no BatchNorm layer, nothing to re-estimate", config.model)
    _save_final(paths, config, state, {
        "epochs_run": len(loop.history), "best_epoch": loop.best["epoch"], "stopped_early": stopped_early,
        "train_seconds": round(seconds, 2),
        # Images trained per second of the whole run (validation and checkpoints included).
        "train_images_per_second": round(len(loop.history) * len(train_part) / max(seconds, 1e-9), 1),
        "final_val_accuracy": val_acc,  # of the weights saved
        "precise_bn": precise_bn,
    })
    return TrainResult(run_dir, loop.history, loop.best["epoch"], stopped_early, seconds)
