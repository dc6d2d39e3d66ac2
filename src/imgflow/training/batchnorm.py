"""Precise BatchNorm: re-estimate a trained model's BatchNorm statistics from its final weights.

BatchNorm layers keep running averages of batch statistics for inference. With Keras' momentum
0.99 they average roughly the last 100 steps, computed by weights that kept moving: after a
run at a constant, large learning rate (the reference notebook's Adam 1e-3) they lag the final
weights. On seed-batchnorm in its 11th epoch (seed 0, 2,000 validation images), validation
accuracy read 0.74 to 0.80 depending on the step the running averages stopped at, and 0.83
once they were re-estimated from the weights (README, "The reference notebook reproduced").
Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021) call this PreciseBN.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from imgflow.data import Split
from imgflow.inference import model_device
from imgflow.precision import autocast
from imgflow.preprocess import Preprocessing, to_model_input


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: np.ndarray, prep: Preprocessing,
                         precision: str = "fp32", batch_size: int = 500, dropout: bool = False) -> None:
    """Replace every BatchNorm layer's running mean and variance by their average over `images`
    (uint8, N x H x W x C, N >= 2), computed with the model's current weights.

    The images go in as the model sees them at inference: unaugmented, dropout off (dropout=True,
    for comparison, keeps it on and draws from torch's global RNG). Weights are untouched; the
    model comes back in the mode it was in (num_batches_tracked then counts the re-estimation's
    batches).
    """
    assert images.dtype == np.uint8, f"expected uint8 images, got {images.dtype}"
    assert len(images) >= 2, f"BatchNorm statistics need at least 2 images, got {len(images)}"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.to(memory_format=torch.channels_last)  # as in training and predict_logits: same kernels
    model.train(dropout)
    device = model_device(model)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches instead of an exponential one
            m.train()
        # Near-equal batches: the cumulative average weighs every batch alike, and a last batch
        # of one image would break BatchNorm1d.
        for batch in np.array_split(images, math.ceil(len(images) / batch_size)):
            with autocast(precision, device.type):
                model(to_model_input(torch.from_numpy(batch).to(device), prep, channels_last=True))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def batchnorm_sample(n_images: int, count: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of `count` of `n_images` training images (all if fewer), in
    random order: a training part may be ordered by class, and a batch of one class would give
    within-class variances."""
    return np.random.default_rng([seed, 0xB4]).permutation(n_images)[:count]


def reestimate_on_training_part(model: nn.Module, train_part: Split, count: int, seed: int,
                                prep: Preprocessing, precision: str, batch_size: int) -> int:
    """Re-estimate the model's BatchNorm statistics on a seeded sample of `count` training
    images; return how many it used."""
    idx = batchnorm_sample(len(train_part), count, seed)
    reestimate_batchnorm(model, train_part.images[idx], prep, precision, batch_size)
    return len(idx)
