"""Per-channel statistics of uint8 image arrays."""
from __future__ import annotations

import numpy as np

_CHUNK = 2048  # images per step: 6 MB of CIFAR uint8, plus a 16 MB index copy per channel


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of (N, H, W, C) uint8 images, in [0, 1] units.

    Counts each channel's 256 pixel values chunk by chunk, then takes the moments of that
    histogram in float64: exact, about twice as fast as float sums here, and 50,000 images never
    need a float copy of the whole array.
    """
    assert images.dtype == np.uint8, f"expected uint8 images, got {images.dtype}"
    assert images.ndim == 4, f"expected (N, H, W, C) images, got shape {images.shape}"
    N, H, W, C = images.shape
    if N == 0:
        raise ValueError("channel_stats needs at least one image")
    counts = np.zeros((C, 256), dtype=np.int64)
    for start in range(0, N, _CHUNK):
        pixels = images[start:start + _CHUNK].reshape(-1, C)
        for c in range(C):
            counts[c] += np.bincount(np.ascontiguousarray(pixels[:, c]), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)  # = N * H * W for every channel
    mean = counts @ values / total
    var = np.maximum(counts @ values**2 / total - mean**2, 0.0)
    return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]
