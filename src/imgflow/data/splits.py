"""Seeded splits of a data set: validation hold-out, k folds, a test hold-out, subsets.

All are functions of (labels, fraction or k, seed) only, so a run can re-create its split from
its config.json alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from imgflow.data.dataset import Dataset, Split
from imgflow.errors import UserError
from imgflow.text import plural


def _per_class_tail(labels: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask over `order`: the last `fraction` of each class's members in that order."""
    mask = np.zeros(len(order), dtype=bool)
    ordered = labels[order]
    for c in np.unique(ordered):
        where = np.flatnonzero(ordered == c)
        n = int(round(len(where) * fraction))
        mask[where[len(where) - n:]] = True
    return mask


def split_train_val(train: Split, fraction: float, mode: str, seed: int) -> tuple[Split, Split | None]:
    """Hold out `fraction` of the training split for validation.

    'last' is Keras' validation_split (the last fraction) applied to a seeded shuffle, since our
    sources may be ordered by class; 'stratified' takes the last fraction of each class.
    """
    if fraction <= 0:
        return train, None
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(train))
    if mode == "last":
        n_val = int(round(len(train) * fraction))
        is_val = np.arange(len(order)) >= len(order) - n_val
    else:
        is_val = _per_class_tail(train.labels, order, fraction)
    train_idx, val_idx = order[~is_val], order[is_val]
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise UserError(f"--val-split {fraction} leaves an empty training or validation part of "
                        f"{plural(len(train), 'image')}: choose a fraction that keeps both non-empty")
    return train.subset(train_idx), train.subset(val_idx)


def kfold_split(train: Split, folds: int, fold: int, seed: int) -> tuple[Split, Split]:
    """Fold `fold` of `folds` stratified folds as validation, the rest for training."""
    if not 2 <= folds <= len(train):
        raise UserError(f"--folds must be between 2 and the number of images ({len(train)}), got {folds}")
    if not 0 <= fold < folds:
        raise UserError(f"--fold must be in [0, {folds}), got {fold}")
    order = np.random.default_rng([seed, 0xF01D]).permutation(len(train))
    fold_of = np.empty(len(train), dtype=np.int64)
    ordered = train.labels[order]
    for c in np.unique(ordered):
        where = np.flatnonzero(ordered == c)
        fold_of[where] = np.arange(len(where)) % folds  # deal each class round-robin
    is_val = fold_of == fold
    return train.subset(order[~is_val]), train.subset(order[is_val])


def holdout_test(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Give a data set without a test split one: a stratified, seeded `fraction` of train.

    A data set that has a test split is returned unchanged.
    """
    if dataset.test is not None or fraction <= 0:
        return dataset
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(dataset.train))
    is_test = _per_class_tail(dataset.train.labels, order, fraction)
    if is_test.sum() == 0 or (~is_test).sum() == 0:
        raise UserError(f"cannot hold out {fraction:.0%} of {plural(len(dataset.train), 'image')} as a "
                        "test split (it is taken per class, and rounds to none or all of them): add "
                        "images, change --test-split, or add a test/<class>/ folder")
    return dataclasses.replace(
        dataset, train=dataset.train.subset(np.sort(order[~is_test])),
        test=dataset.train.subset(np.sort(order[is_test])),
        notes=[*dataset.notes, "no test split in the source: held out "
                               f"{plural(int(is_test.sum()), 'training image')} "
                               f"({fraction:.0%}, stratified, seed {seed}) as the test split"])


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts`, summing to exactly `total`.

    Each class gets the floor of its quota and the leftover goes one each to the largest
    fractional remainders (ties to the lower label): rounding each class on its own can overshoot
    (1,002 of 1,000 asked) or undershoot. `total` must be in [0, counts.sum()].
    """
    counts = np.asarray(counts, dtype=np.int64)
    assert 0 <= total <= counts.sum(), f"cannot take {total} of {counts.sum()}"
    quota = counts * total  # quota / counts.sum(), in integers: no float ties gone astray
    base = quota // counts.sum()
    remainder = quota - base * counts.sum()
    # stable sort on -remainder: equal remainders keep label order
    extra = np.argsort(-remainder, kind="stable")[: total - int(base.sum())]
    base[extra] += 1
    return base


def stratified_subset(split: Split, size: int, seed: int) -> Split:
    """Exactly min(`size`, len) images, keeping class proportions (seeded); the whole split if smaller.

    Classes get their share by `largest_remainder`; within a class, the chosen images are the last
    of its members in a seeded shuffle (as the validation hold-out takes them).
    """
    if size <= 0 or size >= len(split):
        return split
    order = np.random.default_rng([seed, 0x5B5E]).permutation(len(split))
    ordered = split.labels[order]
    classes, counts = np.unique(ordered, return_counts=True)
    keep = np.zeros(len(order), dtype=bool)
    for c, n in zip(classes, largest_remainder(counts, size)):
        where = np.flatnonzero(ordered == c)
        keep[where[len(where) - n:]] = True
    return split.subset(np.sort(order[keep]))
