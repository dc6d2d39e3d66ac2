"""What one training step sees: the split, the seeded order of each epoch, its augmented batches."""
from __future__ import annotations

import logging
import math

import torch

from imgflow.augment import alternating_flips, augment_batch, flip_mask, seeded_generator, step_generator
from imgflow.data import Dataset, Split
from imgflow.data.splits import kfold_split, split_train_val, stratified_subset
from imgflow.device import fits_on_device
from imgflow.errors import UserError
from imgflow.text import plural
from imgflow.training.config import TrainConfig
from imgflow.training.distributed import SINGLE, Ranks

log = logging.getLogger(__name__)


# Images above this many pixels train at their own size with a warning that suggests --image-size,
# once per data set and size in a process (imgflow tune trains one run per trial).
LARGE_IMAGE_PIXELS = 128 * 128
_warned_large_images: set[tuple[str, int, int]] = set()


def check_classifiable(dataset: Dataset) -> None:
    """UserError unless the data set has the two classes or more a classifier needs."""
    if dataset.num_classes < 2:
        raise UserError(f"{dataset.name} has {dataset.num_classes} class: a classifier needs at least 2 "
                        "(one sub-folder per class)")


def check_image_size(dataset: Dataset, config: TrainConfig) -> None:
    """Refuse a --translate the images cannot take; warn once when large images train at their size."""
    H, W = dataset.image_shape[:2]
    if "translate" in config.augment and config.translate >= min(H, W):  # reflection needs a shift < the side
        raise UserError(f"--translate {config.translate} must be smaller than the images' {H}x{W}: "
                        f"give a shift below {min(H, W)} pixels (the presets use 2)")
    if config.image_size is None and H * W > LARGE_IMAGE_PIXELS and (dataset.name, H, W) not in _warned_large_images:
        _warned_large_images.add((dataset.name, H, W))
        log.warning("training at the data's own %dx%d: each image costs about %.0fx a 32x32 one; "
                    "--image-size 64 or 96 trains far faster (imgflow workflow picks a size for its budget)",
                    H, W, H * W / 1024)


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


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps in an epoch of n images, for `world` processes sharing each batch.

    Keras keeps the last partial batch; we do too, unless it would give a process a shard of
    one image, which BatchNorm cannot normalise in training mode (one process: a batch of one).
    """
    steps = math.ceil(n / batch_size)
    last = n - (steps - 1) * batch_size
    return steps - 1 if steps > 1 and last < 2 * world else steps


class EpochBatches:
    """The training part as uint8 batches on `device`: batch (epoch, step) is the same in every
    process and on every device.

    The images live on the device when they fit (`fits_on_device`) and are indexed and augmented
    there, so a GPU never waits for the host; otherwise each batch is assembled in host memory and
    sent over. The order and the augmentation's random draws come from CPU generators either way.
    With several ranks, every rank draws the same global batch, augments it, and keeps its shard
    (`Ranks.shard`): what a step trains on does not depend on the number of processes.
    """

    def __init__(self, part: Split, config: TrainConfig, device: torch.device | None = None,
                 ranks: Ranks = SINGLE, images: torch.Tensor | None = None):
        """images: what to batch instead of part.images, one per image (a frozen backbone's cached
        features: training.features), not augmented."""
        self.device = device or torch.device("cpu")
        labels = torch.from_numpy(part.labels)
        images = torch.from_numpy(part.images) if images is None else images
        on_device = fits_on_device(images.nbytes + labels.nbytes, self.device)
        self.images = images.to(self.device) if on_device else images
        self.labels = labels.to(self.device) if on_device else labels
        self.config, self.ranks = config, ranks
        self.steps = steps_per_epoch(len(part), config.batch_size, ranks.world)
        self.flip_coins = alternating_flips(len(part), config.seed) if config.flip == "alternate" else None
        # What a step trains on: --image-size (photo runs keep their images larger, to crop from).
        self.size = tuple(config.image_size) if config.image_size else tuple(part.images.shape[1:3])
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its order): drawn once per epoch

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (images, labels) of one step, images augmented as the config says."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.labels), self.config.seed, epoch))
        size = self.config.batch_size
        idx = self._order[1][step * size:(step + 1) * size]
        where = idx.to(self.images.device)
        xb, yb = self.images[where], self.labels[where]
        if self.config.augment != "none":
            flips = flip_mask(self.flip_coins, idx, epoch) if self.flip_coins is not None else None
            xb = augment_batch(xb, self.config.augment, step_generator(self.config.seed, epoch, step),
                               translate=self.config.translate, cutout=self.config.cutout, flip=flips,
                               size=self.size, crop_scale=(self.config.crop_scale, 1.0))
        xb, yb = self.ranks.shard(xb), self.ranks.shard(yb)
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
