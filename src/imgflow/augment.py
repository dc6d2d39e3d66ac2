"""Seeded, batched data augmentation on uint8 image batches (B, H, W, C).

Everything is tensor indexing on the whole batch at once: no per-image Python loop, and the
random draws come from a torch.Generator the caller seeds, so a (seed, epoch, step) triple fixes
the result exactly, which is what makes `--resume` land on the same weights. The draws are made
on the CPU and only the indexing runs where the images are (a GPU's generators differ from the
CPU's), so a batch is augmented the same on every device.
"""
from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator whose state depends only on `keys` (well mixed: nearby keys, unrelated streams)."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator whose state depends only on (seed, epoch, step)."""
    return seeded_generator(seed, epoch, step)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) by mirror reflection (no edge repeat)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_flip(images: torch.Tensor, gen: torch.Generator, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2, or where the boolean mask `flip` says."""
    if flip is None:
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
    flip = flip.to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def alternating_flips(n: int, seed: int) -> torch.Tensor:
    """One seeded coin per training image, for `flip_mask`."""
    return torch.rand(n, generator=seeded_generator(seed, 0xF11B)) < 0.5


def flip_mask(coins: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flip: image i is flipped in epoch e iff coin[i] xor (e odd).

    Random in any one epoch, but over two epochs every image is seen both ways exactly once,
    where independent coins would show a quarter of the images the same way twice.
    """
    return coins[indices] ^ bool(epoch % 2)


def random_translate(images: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling by reflection.

    Equivalent to reflect-padding by max_shift and taking a random crop of the original size.
    """
    if max_shift <= 0:
        return images
    B, H, W, C = images.shape
    device = images.device
    dy = torch.randint(-max_shift, max_shift + 1, (B, 1), generator=gen).to(device)
    dx = torch.randint(-max_shift, max_shift + 1, (B, 1), generator=gen).to(device)
    rows = _reflect(torch.arange(H, device=device)[None, :] + dy, H)  # (B, H)
    cols = _reflect(torch.arange(W, device=device)[None, :] + dx, W)  # (B, W)
    batch = torch.arange(B, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def random_cutout(images: torch.Tensor, gen: torch.Generator, size: int, fill: int = 0) -> torch.Tensor:
    """Set one size x size square per image (centre anywhere, clipped at edges) to `fill`."""
    if size <= 0:
        return images
    B, H, W, C = images.shape
    device = images.device
    cy = torch.randint(0, H, (B, 1, 1), generator=gen).to(device)
    cx = torch.randint(0, W, (B, 1, 1), generator=gen).to(device)
    top, left = cy - size // 2, cx - size // 2
    ys = torch.arange(H, device=device)[None, :, None]
    xs = torch.arange(W, device=device)[None, None, :]
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside[..., None], fill)


def augment_batch(images: torch.Tensor, policy: str, gen: torch.Generator,
                  translate: int = 2, cutout: int = 8, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the named policy ('none', 'flip', 'flip+translate', 'flip+translate+cutout').

    flip: which images to mirror (see `flip_mask`); None = a fresh coin per image from `gen`.
    """
    assert images.dtype == torch.uint8, f"expected uint8 images, got {images.dtype}"
    assert images.ndim == 4, f"expected (B, H, W, C), got {tuple(images.shape)}"
    parts = set(policy.split("+")) - {"none"}
    unknown = parts - {"flip", "translate", "cutout"}
    assert not unknown, f"unknown augmentation {sorted(unknown)}"
    if "flip" in parts:
        images = random_flip(images, gen, flip)
    if "translate" in parts:
        images = random_translate(images, gen, translate)
    if "cutout" in parts:
        images = random_cutout(images, gen, cutout)
    return images


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift every image by (dy, dx) pixels, filling by reflection (used by test-time augmentation)."""
    B, H, W, C = images.shape
    rows = _reflect(torch.arange(H, device=images.device) + dy, H)
    cols = _reflect(torch.arange(W, device=images.device) + dx, W)
    return images[:, rows][:, :, cols]
