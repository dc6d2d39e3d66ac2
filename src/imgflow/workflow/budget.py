"""The time budget: each step's share, and the plans of epochs and images that fit a share.

Pure arithmetic on seconds and images per second: the steps measure the speed, these functions
say what it buys. Nothing here trains or reads a file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
SCALED_MODELS = ("fast-large", "fast-medium", "fast-small")  # largest first: take what the budget allows
MAX_EPOCHS = {"baseline": 4, "overfit": 30}  # the baseline only has to beat guessing
MIN_EPOCHS_TO_SEE_OVERFITTING = 6
VALIDATION_SPEEDUP = 3  # a validation image costs a third of a training one (no backward pass)
RUN_OVERHEAD_SECONDS = 3.0  # per training run: loading the cached data, building, saving
FINAL_RESERVE = 0.06  # budget share step 6 expects the test evaluation and the reports to take
# After the final run: the test evaluation, TTA_VIEWS views per test image at inference speed,
# and REPORT_SECONDS for the two reports. CIFAR-10 with TTA took ~45 s on the Zen 1 with
# fast-small (this gives 43 s) and ~20 s on the Zen 5 with fast-large (31 s), where the fixed
# 6% reserve of earlier versions kept 54 s back and the final run lost an epoch to it.
TTA_VIEWS = 6  # airbench94's (inference.tta_views)
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


def plan_epochs(seconds: float, images_per_second: float, n_train: int, n_val: int,
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


def plan_backbone(seconds: float, images_per_second: float, n_train: int, n_val: int, folds: int,
                  frozen_epochs: int, max_epochs: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((epochs, train_subset) frozen, (epochs, train_subset) fine-tuned) of a pretrained backbone
    that trains at `images_per_second`, within `seconds` for both, on each of `folds` folds.

    The frozen candidate costs one pass of the backbone over its training and validation images
    (its features, cached; at inference speed) and the head's epochs on them next to nothing; the
    fine-tuned one trains whole epochs in what that leaves (at least 2: the head alone, then all).
    """
    per_fold = seconds / max(folds, 1)
    frozen = RUN_OVERHEAD_SECONDS + (n_train + n_val) / (VALIDATION_SPEEDUP * images_per_second)
    return (frozen_epochs, 0), plan_epochs(per_fold - frozen, images_per_second, n_train, n_val, max_epochs,
                                           min_epochs=2)


def images_per_second_of_run(n_train: int, n_val: int, seconds_per_epoch: float) -> float | None:
    """The training pace an epoch of n_train + n_val images in `seconds_per_epoch` shows, by
    plan_epochs' cost model (None for an epoch without a time)."""
    if not seconds_per_epoch > 0:
        return None
    return (n_train + n_val / VALIDATION_SPEEDUP) / seconds_per_epoch


@dataclass(frozen=True)
class TuneBudget:
    """How many of step 7's candidates its share of the budget pays for, and what they cost."""

    seconds: float  # the step's share of the budget
    seconds_per_run: float  # one training run like the step-6 run's
    folds: int  # runs per candidate: 1 on a hold-out, k under k-fold
    candidates: int  # candidates that fit (0: none; then nothing at all is trained)
    scratch_share: float = 1.0  # the part of `seconds` they had (the rest: a pretrained backbone's)

    @property
    def per_candidate(self) -> float:
        return self.seconds_per_run * self.folds

    @property
    def reference_seconds(self) -> float:
        """The unregularised reference's other folds (k-fold: fold 0 is the step-6 run)."""
        return (self.folds - 1) * self.seconds_per_run


def plan_tune(budget_seconds: float, epochs: int, seconds_per_epoch: float, folds: int,
              max_candidates: int, scratch_share: float = 1.0) -> TuneBudget:
    """Step 7's plan: candidates train like the step-6 run (`epochs` at `seconds_per_epoch`), in
    `scratch_share` of the step's share (the rest goes to a pretrained backbone, when there is one).

    Under k-fold the reference's other folds come out of the step's share too, unless not even
    one candidate fits beside them: then nothing more is trained.
    """
    seconds = BUDGET_SHARE["tune"] * budget_seconds
    per_run = RUN_OVERHEAD_SECONDS + epochs * seconds_per_epoch
    affordable = int((seconds * scratch_share - (folds - 1) * per_run) // (per_run * folds))
    return TuneBudget(seconds, per_run, folds, max(0, min(max_candidates, affordable)), scratch_share)


def final_reserve_seconds(n_test: int, images_per_second: float) -> float:
    """Seconds to keep back after the final run, which trains at `images_per_second`, for testing
    `n_test` images with TTA and writing the reports."""
    return TTA_VIEWS * n_test / (VALIDATION_SPEEDUP * images_per_second) + REPORT_SECONDS


def final_run_seconds(remaining: float, reserve: float, budget_seconds: float) -> float:
    """The final run's time: what the budget has left less the reserve, but at least a quarter
    of its share when earlier steps overran."""
    return max(remaining - reserve, 0.25 * BUDGET_SHARE["final"] * budget_seconds)


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
