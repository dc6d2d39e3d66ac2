"""The in-memory data set every other part of imgflow consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8, f"expected uint8 images, got {self.images.dtype}"
        assert self.images.ndim == 4, f"expected (N, H, W, C) images, got shape {self.images.shape}"
        assert self.labels.dtype == np.int64, f"expected int64 labels, got {self.labels.dtype}"
        assert len(self.images) == len(self.labels), "images and labels differ in length"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    """A loaded data set with its provenance.

    `skipped` lists files that could not be used, as {"path", "reason"} dicts;
    `notes` holds human-readable remarks made while loading (resized images, empty classes).
    """

    name: str
    source: str  # path or URL the data came from
    sha256: str  # content hash of the source (file, or a stable hash of a directory tree)
    classes: list[str]
    train: Split
    test: Split | None = None
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        H, W, C = self.train.images.shape[1:]
        return (H, W, C)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
