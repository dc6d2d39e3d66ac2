"""--freeze-backbone on cached features: the frozen backbone's output for each training and
validation image is computed once, and the head trains on those instead of on the images.

The backbone never changes in such a run (its BatchNorm statistics included: models.backbone), so
the head sees the same numbers either way, and a CPU spends an epoch on a linear layer instead of a
whole network. Only without augmentation: a flipped or shifted image has other features each
epoch. The model itself is the whole network, so what the run saves (model.safetensors, the
checkpoint) is as in any run: the backbone and the trained head.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgflow.data import Split
from imgflow.inference import loss_and_accuracy, predict_logits
from imgflow.precision import autocast
from imgflow.preprocess import Preprocessing
from imgflow.training.batches import EpochBatches
from imgflow.training.config import TrainConfig
from imgflow.training.distributed import Ranks
from imgflow.training.step import Learner

log = logging.getLogger(__name__)

# How close the head's logits on cached features must be to the whole model's on the same images
# for caching to go ahead: a model whose head is more than a function of its input (two heads
# averaged, a distillation token) trains through the backbone instead.
_CHECK_IMAGES = 8
_CHECK_TOLERANCE = 1e-3


def caches_features(config: TrainConfig, ranks: Ranks) -> bool:
    """Whether this run trains its head on cached features; says in one line why not when it could."""
    if not config.freeze_backbone:
        return False
    if config.augment != "none":
        log.info("--freeze-backbone: the backbone's features are not cached, as --augment %s changes the "
                 "images every epoch (--augment none computes them once, far faster on a CPU)", config.augment)
        return False
    if ranks.several:
        log.info("--freeze-backbone: the backbone's features are not cached with several processes")
        return False
    return True


class _Features(nn.Module):
    """The input of `model`'s head (`head_modules()[0]`) for a batch: what predict_logits returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = self.model.head_modules()[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            self.model(x)
        finally:
            hook.remove()
        return seen[0]


def backbone_features(model: nn.Module, images: np.ndarray, prep: Preprocessing, precision: str,
                      batch_size: int, progress: bool = False) -> torch.Tensor:
    """float32 features the head reads, for uint8 images (N, H, W, C): in eval mode, on the model's
    device, returned on the CPU."""
    was_training = model.training
    model.eval()
    try:
        return predict_logits(_Features(model).eval(), images, prep, precision, batch_size,
                              progress=progress, desc="features")
    finally:
        model.train(was_training)


class HeadLearner(Learner):
    """A Learner whose batches are cached features: a step runs the head alone. Validation uses the
    validation images' cached features."""

    def __init__(self, *args, val_part: Split | None = None, val_features: torch.Tensor | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.val_part, self.val_features = val_part, val_features

    def logits_and_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.precision, self.device.type):
            logits = self.model.head_logits(features)
        return logits, F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def evaluate(self, part: Split) -> dict[str, float]:
        if part is not self.val_part or self.val_features is None:
            return super().evaluate(part)
        was_training = self.model.training
        self.model.eval()
        logits = []
        with torch.no_grad():
            for chunk in self.val_features.split(self.config.eval_batch_size):
                with autocast(self.precision, self.device.type):
                    logits.append(self.model.head_logits(chunk.to(self.device)).float().cpu())
        self.model.train(was_training)
        return loss_and_accuracy(torch.cat(logits), part.labels)


def on_cached_features(learner: Learner, train_part: Split, val_part: Split | None, device: torch.device,
                       progress: bool) -> tuple[HeadLearner, EpochBatches] | None:
    """(a learner of the head, batches of the training part's features) for `learner`'s run; None
    when the model's head turns out not to be a function of the features alone (said in one line)."""
    model, config = learner.model, learner.config
    started = time.perf_counter()
    model.freeze_backbone(True)  # BatchNorm in eval mode either way; no gradients to keep
    args = (learner.prep, learner.precision, config.eval_batch_size)
    if not _head_reads_features(model, train_part.images[:_CHECK_IMAGES], *args):
        log.info("--freeze-backbone: the backbone's features are not cached: %s's logits are not its head's "
                 "output on them", config.model)
        return None
    features = backbone_features(model, train_part.images, *args, progress=progress)
    val_features = backbone_features(model, val_part.images, *args, progress=progress) if val_part else None
    log.info("--freeze-backbone: the backbone's features of %d training and %d validation images computed "
             "once (%.1f s); the head trains on them", len(train_part), len(val_part) if val_part else 0,
             time.perf_counter() - started)
    head = HeadLearner(model, config, learner.prep, learner.precision, learner.total_steps, learner.ranks,
                       val_part=val_part, val_features=val_features)
    return head, EpochBatches(train_part, config, device, images=features)


def _head_reads_features(model: nn.Module, images: np.ndarray, prep: Preprocessing, precision: str,
                         batch_size: int) -> bool:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole = predict_logits(model, images, prep, precision, batch_size)
            features = backbone_features(model, images, prep, precision, batch_size)
            device = next(model.parameters()).device
            with autocast(precision, device.type):  # as the head will train: in the run's precision
                from_head = model.head_logits(features.to(device)).float().cpu()
    finally:
        model.train(was_training)
    return whole.shape == from_head.shape and torch.allclose(whole, from_head, atol=_CHECK_TOLERANCE,
                                                              rtol=_CHECK_TOLERANCE)
