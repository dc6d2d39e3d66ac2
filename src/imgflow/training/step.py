"""One training step, and the model and input preparation it runs on.

`Learner` is the only place a step is taken: the loop, the workflow's throughput probe and the
throughput benchmark all time this same code.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgflow.data import Dataset, Split, channel_stats
from imgflow.errors import UserError
from imgflow.inference import loss_and_accuracy, model_device, predict_logits
from imgflow.models import create_model
from imgflow.models.backbone import load_run_weights
from imgflow.models.hf import hf_preprocessing, hf_source, is_hf
from imgflow.precision import autocast, grad_scaler
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.training.averaging import Lookahead, WeightEMA
from imgflow.training.config import TrainConfig, eval_crop
from imgflow.training.distributed import SINGLE, Ranks
from imgflow.training.optim import build_optimizer, set_lr
from imgflow.weights import detached_copy


log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def prepare_model(config: TrainConfig, dataset: Dataset, train_part: Split, prep: Preprocessing,
                  precision: str, device: torch.device | None = None) -> torch.nn.Module:
    """Create the model with the seed's initialisation, fit data-dependent layers if any, and
    move it to `device` (default the CPU).

    Both happen on the CPU first, whatever the device: the initial weights are then the same
    numbers on every device and in every process of a distributed run."""
    (H, W), C = prep.image_size, prep.channels
    torch.manual_seed(config.seed)
    hf = {"weights": config.weights, "pretrained": config.pretrained} if is_hf(config.model) else {}
    model = create_model(config.model, num_classes=dataset.num_classes, in_channels=C, image_size=(H, W), **hf)
    if hasattr(model, "init_whitening"):
        # Fitted on a fixed, seeded sample of the training part (never validation or test).
        n = min(5000, len(train_part))
        idx = np.random.default_rng([config.seed, 0x3417]).choice(len(train_part), n, replace=False)
        model.init_whitening(to_model_input(torch.from_numpy(train_part.images[np.sort(idx)]), prep))
    if config.weights is not None and not is_hf(config.model):  # another imgflow run's, whitening stem too
        load_run_weights(model, config.model, config.weights)
    # channels_last: oneDNN's convolutions run faster on NHWC in fp32 too (1.3x measured on
    # seed-baseline here), as do cuDNN's with tensor cores; and uint8 NHWC batches become NHWC
    # floats without a copy.
    return model.to(device=device or torch.device("cpu"), memory_format=torch.channels_last)


def preprocessing_for(config: TrainConfig, dataset: Dataset, train_part: Split) -> Preprocessing:
    """How this run's model input is made: the hf: model's normalisation or --normalize's, at
    --image-size (else the data's own size), centre-cropped at evaluation for photo runs."""
    C = dataset.image_shape[2]
    H, W = config.image_size or dataset.image_shape[:2]
    own = hf_preprocessing(hf_source(config.model), config.weights, config.pretrained) if is_hf(config.model) else {}
    if "image_size" in own and tuple(own["image_size"]) != (H, W):
        log.warning("%s was pretrained on %dx%d images, the data is %dx%d: --image-size %d may serve it better",
                    config.model, *own["image_size"], H, W, own["image_size"][0])
    if "mean" in own and len(own["mean"]) == C:
        # A pretrained model's features expect the normalisation it was trained with.
        mean, std = own["mean"], own["std"]
    elif config.normalize == "standardize":
        mean, std = channel_stats(train_part.images)  # training part only: no peeking at val/test
        std = [max(s, 1e-3) for s in std]
    else:
        mean, std = [0.0] * C, [1.0] * C
    return Preprocessing(tuple(mean), tuple(std), (H, W), C, eval_crop(config.to_dict()))


def evaluate_part(model: torch.nn.Module, part: Split, prep: Preprocessing, precision: str,
                  batch_size: int, ranks: Ranks = SINGLE) -> dict[str, float]:
    """Loss and accuracy of `model` on `part`. With several ranks each predicts a run of whole
    batches of it, the same batches one process would, and they pool the logits: every rank gets
    the numbers one process gets (the ranks' models must be the same: `Ranks.broadcast_buffers`)."""
    was_training = model.training
    model.eval()
    batches = math.ceil(len(part) / batch_size)
    per_rank = math.ceil(batches / ranks.world) * batch_size
    start, stop = ranks.rank * per_rank, (ranks.rank + 1) * per_rank
    logits = predict_logits(model, part.images[start:stop], prep, precision, batch_size)
    if ranks.several:
        logits = torch.cat([chunk for chunk in ranks.gather(logits) if len(chunk)])
    model.train(was_training)
    return loss_and_accuracy(logits, part.labels)


@dataclass
class Step:
    """What one training step did, over the whole global batch (every rank's shard of it)."""

    logits: torch.Tensor  # of this rank's shard
    loss: torch.Tensor  # mean loss of the global batch, fp32
    loss_sum: float  # the loss summed over the global batch's images
    correct: int  # its images classified right (top-1, before the update)
    seen: int  # its images

    def __iter__(self):
        """`logits, loss = learner.train_step(...)`, as callers that need no sums write it."""
        return iter((self.logits, self.loss))


class Learner:
    """The model, how its input is prepared, and everything that updates its weights.

    The model is on its device already (`prepare_model`); batches are moved there. With several
    ranks each step's batch is this rank's shard of the global batch, and the model trains inside
    DistributedDataParallel, which averages the gradients over the ranks (`net`; `model` is the
    module itself, whose state is saved).
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, prep: Preprocessing, precision: str,
                 total_steps: int, ranks: Ranks = SINGLE):
        self.model, self.config, self.prep, self.precision = model, config, prep, precision
        self.device = model_device(model)
        self.ranks = ranks
        self.net = model  # DistributedDataParallel(model) once `distribute` has run
        self.total_steps = total_steps
        self.optimizer = build_optimizer(model, config)
        self.scaler = grad_scaler(precision, self.device.type)  # fp16 only
        self.ema = WeightEMA(model, config.ema) if config.ema > 0 else None
        self.lookahead = Lookahead(model, config.lookahead) if config.lookahead > 0 else None

    def distribute(self) -> None:
        """With several ranks, train through DistributedDataParallel from now on. Every rank calls
        this together (it is a collective), once all of them have built their learner."""
        if not self.ranks.several:
            return
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers (the default): rank 0's BatchNorm statistics go to every rank before
        # each forward; each rank then updates them from its own shard (per-rank BatchNorm).
        self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                           if self.device.type == "cuda" else None)

    def logits_and_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, loss) of a uint8 batch, the loss in fp32 whatever the precision."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.precision, self.device.type):
            logits = self.net(to_model_input(images, self.prep, channels_last=True))
        return logits, F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float, step: int,
                   where: str = "") -> Step:
        """Train optimiser step number `step` (1-based) on a uint8 batch (this rank's shard of
        the global batch) at `lr`; return what it did (unpacks as (logits, loss)). A loss or
        update that is not finite raises TrainingDiverged on every rank (`where` names the step
        in its message)."""
        set_lr(self.optimizer, lr)
        logits, loss = self.logits_and_loss(images, labels)
        n = len(labels)
        correct = int((logits.argmax(1) == labels.to(self.device)).sum())
        # The sums are pooled before the update, so every rank sees the same loss and agrees on
        # stopping (a rank stopping alone would leave the others waiting in the gradient sum).
        loss_sum, correct, seen = self.ranks.sum([loss.item() * n, correct, n])
        mean = loss_sum / seen
        if not math.isfinite(mean):
            raise TrainingDiverged(f"loss became {mean if self.ranks.several else loss.item()} at "
                                   f"{where or f'step {step}'}: lower --lr (now {self.config.lr}) and start "
                                   "again with --overwrite")
        if self.ranks.several:
            # DistributedDataParallel averages the ranks' gradients; weighting each rank's mean
            # loss by its share of the global batch makes that the gradient of the global mean,
            # whatever the shards' sizes: a step means the same at any number of processes.
            loss = loss * (n * self.ranks.world / seen)
        update_or_diverge(self, loss, step, where or f"step {step}")
        global_loss = torch.tensor(mean, dtype=torch.float32) if self.ranks.several else loss
        return Step(logits, global_loss, loss_sum, int(correct), int(seen))

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Take optimiser step number `step` (1-based) down `loss`, then the averaging ones."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # fp16: a scaled loss; a step whose gradients overflowed is skipped, the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, step, self.total_steps)

    def evaluate(self, part: Split) -> dict[str, float]:
        """Loss and accuracy of the model as it is on `part` (`evaluate_part`)."""
        return evaluate_part(self.model, part, self.prep, self.precision, self.config.eval_batch_size, self.ranks)

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
        live = detached_copy(self.model.state_dict())
        self.model.load_state_dict(self.ema.state)
        try:
            yield
        finally:
            self.model.load_state_dict(live)

    def final_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state if self.ema is not None else self.model.state_dict()

    def state_dict(self) -> dict:
        """Everything that updates the weights, as it is (on the device: the checkpoint copies it)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state if self.ema is not None else None,
                "lookahead": self.lookahead.state if self.lookahead is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Load a state saved on any device (the optimiser moves its own state to the weights')."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        on_device = lambda tensors: {k: v.to(self.device) for k, v in tensors.items()}  # noqa: E731
        if self.ema is not None:
            self.ema.state = on_device(state["ema"])
        if self.lookahead is not None:
            self.lookahead.state = on_device(state["lookahead"])
        if self.scaler is not None and state.get("scaler"):  # none in checkpoints before fp16
            self.scaler.load_state_dict(state["scaler"])


def update_or_diverge(learner: Learner, loss: torch.Tensor, step: int, where: str) -> None:
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
