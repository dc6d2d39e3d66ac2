"""Seeded subsets of a split: exact sizes, class proportions, the same images for the same seed."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from imgflow.data import Split
from imgflow.data.splits import largest_remainder, stratified_subset


def _split(per_class) -> Split:
    labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)
    images = (np.arange(len(labels)) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    return Split(images, labels)


def _ids(split: Split) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()


def test_train_subset_of_1000_gives_1000_images_not_1002():
    # Rounding each class on its own gave 1,002 here: eight classes round .5 up.
    split = _split([503, 497, 251, 249, 100, 100, 100, 100, 1, 1])
    sub = stratified_subset(split, 1000, seed=0)
    assert len(sub) == 1000
    counts = np.bincount(sub.labels, minlength=10)
    quota = np.bincount(split.labels) * 1000 / len(split)
    assert (np.abs(counts - quota) < 1).all(), (counts, quota)


def test_subset_is_seeded_and_drawn_from_the_split():
    split = _split([40, 25, 7])
    a, b = stratified_subset(split, 30, seed=3), stratified_subset(split, 30, seed=3)
    assert _ids(a) == _ids(b)
    assert _ids(stratified_subset(split, 30, seed=4)) != _ids(a)
    assert len(set(_ids(a))) == 30  # no image twice
    whole = stratified_subset(split, 0, seed=0)
    assert whole is split and stratified_subset(split, 500, seed=0) is split


@settings(max_examples=200, deadline=None)
@given(per_class=st.lists(st.integers(0, 60), min_size=1, max_size=8), size=st.integers(1, 400),
       seed=st.integers(0, 3))
def test_subset_size_is_exactly_min_of_size_and_length(per_class, size, seed):
    split = _split(per_class)
    sub = stratified_subset(split, size, seed)
    assert len(sub) == min(size, len(split))
    counts = np.bincount(sub.labels, minlength=len(per_class))
    if len(split):
        quota = np.asarray(per_class) * min(size, len(split)) / len(split)
        assert (np.floor(quota) <= counts).all() and (counts <= np.ceil(quota)).all()


def test_largest_remainder_gives_leftovers_to_the_largest_remainders():
    assert largest_remainder(np.array([5, 3, 2]), 5).tolist() == [3, 1, 1]  # 2.5, 1.5, 1.0
    assert largest_remainder(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]  # ties: lower label
    assert largest_remainder(np.array([7, 0, 3]), 10).tolist() == [7, 0, 3]
