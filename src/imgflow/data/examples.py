"""The example grid: a few training images per class, one labelled row per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imgflow.data.dataset import Dataset
from imgflow.fileio import atomic_write
from imgflow.data.decode import resize_array
from imgflow.text import plural

MAX_ROWS = 20  # classes shown; beyond that the grid stops being readable
_TILE = 96  # target tile side in pixels: 32x32 images are upscaled 3x (nearest neighbour)
_GAP = 4  # pixels of white between tiles
_DPI = 100


def _tile(image: np.ndarray, side: int) -> np.ndarray:
    """Upscale small images by an integer factor (crisp pixels), shrink large ones to fit."""
    H, W = image.shape[:2]
    if max(H, W) <= side:
        k = max(1, side // max(H, W))
        return image.repeat(k, axis=0).repeat(k, axis=1)
    scale = side / max(H, W)
    return resize_array(image, (max(1, round(H * scale)), max(1, round(W * scale))))


def _mosaic(rows: list[list[np.ndarray]], per_row: int, channels: int) -> tuple[np.ndarray, int, int]:
    """Place tiles on a white canvas; returns the canvas and the cell height and width."""
    tiles = [t for row in rows for t in row]
    cell_h = max(t.shape[0] for t in tiles) + _GAP
    cell_w = max(t.shape[1] for t in tiles) + _GAP
    canvas = np.full((len(rows) * cell_h, per_row * cell_w, channels), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            y, x = r * cell_h + _GAP // 2, c * cell_w + _GAP // 2
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
    return canvas, cell_h, cell_w


def save_example_grid(dataset: Dataset, path: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Write a PNG of `per_class` random training images per class, class names on the left.

    At most MAX_ROWS classes are shown (the first ones, in label order), and the title says so.
    The file is written to a temp file and renamed, so `path` is never half-written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = Path(path)
    rng = np.random.default_rng(seed)
    images, labels = dataset.train.images, dataset.train.labels
    C = images.shape[-1]
    shown = list(range(min(len(dataset.classes), MAX_ROWS)))
    side = max(_TILE, *images.shape[1:3]) if max(images.shape[1:3]) <= 160 else 128
    rows = []
    for label in shown:
        members = np.flatnonzero(labels == label)
        pick = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        rows.append([_tile(images[i], side) for i in pick])
    if not any(rows):
        raise ValueError("no training images to show")
    per_row = max(len(row) for row in rows)  # fewer columns when every class is that small
    blank = np.full_like(next(t for row in rows for t in row), 255)
    rows = [row or [blank] for row in rows]
    canvas, cell_h, _ = _mosaic(rows, per_row, C)

    label_width = 0.085 * max(len(dataset.classes[i]) for i in shown) + 0.3  # inches, ~10 pt text
    up_to = "up to " if any(len(row) < per_row for row in rows) else ""
    title = f"{dataset.name}: {up_to}{plural(per_row, 'random training image')} per class"
    if len(shown) < len(dataset.classes):
        title += f" (first {len(shown)} of {len(dataset.classes)} classes)"
    height = canvas.shape[0] / _DPI + 0.5
    width = canvas.shape[1] / _DPI + label_width
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((label_width / width, 0.0, 1 - label_width / width, canvas.shape[0] / _DPI / height))
    ax.imshow(canvas[..., 0] if C == 1 else canvas, cmap="gray" if C == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * cell_h + cell_h / 2 for r in range(len(shown))],
                  [dataset.classes[i] for i in shown], fontsize=10)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return path
