"""Seeded, batched data augmentation on uint8 image batches (B, H, W, C).

Everything is tensor indexing on the whole batch at once: no per-image Python loop, and the
random draws come from a torch.Generator the caller seeds, so a (seed, epoch, step) triple fixes
the result exactly, which is what makes `--resume` land on the same weights. The draws are made
on the CPU and only the indexing runs where the images are (a GPU's generators differ from the
CPU's), so a batch is augmented the same on every device ('photo' resamples in float32 where the
images are: a GPU may round a rare pixel the other way).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
                  translate: int = 2, cutout: int = 8, flip: torch.Tensor | None = None,
                  size: tuple[int, int] | None = None, crop_scale: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
    """Apply the named policy ('none', 'flip', 'flip+translate', 'flip+translate+cutout', 'photo').

    flip: which images to mirror (see `flip_mask`); None = a fresh coin per image from `gen`.
    size, crop_scale: 'photo' only: the (H, W) its crops are resampled to (None: the images'
    own), and the range of their area as a fraction of the image's.
    """
    assert images.dtype == torch.uint8, f"expected uint8 images, got {images.dtype}"
    assert images.ndim == 4, f"expected (B, H, W, C), got {tuple(images.shape)}"
    if policy == "photo":
        return photo_augment(images, gen, size or tuple(images.shape[1:3]), crop_scale, flip)
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


# Photo-scale augmentation (`--augment photo`): random-resized crop + flip + light colour jitter.
# torchvision's RandomResizedCrop draws an area fraction in (0.08, 1) and an aspect ratio in
# (3/4, 4/3); the ratio range is torchvision's, the area's lower end is an option (`--crop-scale`).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's attempts at a box that fits, before the centre-crop fallback
# Brightness, contrast and saturation factors are drawn from [1 - JITTER, 1 + JITTER]: fastai's
# default lighting change (max_lighting 0.2), half of timm's colour-jitter default (0.4).
JITTER = 0.2
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale and Pillow's convert('L')


def crop_boxes(B: int, H: int, W: int, gen: torch.Generator, scale: tuple[float, float],
               ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, height, width) inside an H x W image, as torchvision's
    RandomResizedCrop draws them: area fraction uniform in `scale`, log aspect ratio (w/h)
    uniform in `ratio`; the first of CROP_TRIES draws that fits, else the whole image clipped to
    the ratio range, centred. Every draw is made for every image, so the stream is fixed."""
    area = torch.empty(B, CROP_TRIES).uniform_(scale[0], scale[1], generator=gen) * (H * W)
    log_ratio = torch.empty(B, CROP_TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    where = torch.rand(B, 2, generator=gen)  # the box's position, as fractions of the free room
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round().long()
    h = (area / aspect).sqrt().round().long()
    fits = (w >= 1) & (h >= 1) & (w <= W) & (h <= H)
    first = fits.long().argmax(1, keepdim=True)  # the first that fits (0 when none does)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    # Fallback (none fits): the largest centred box whose ratio is in range.
    if W / H < ratio[0]:
        fh, fw = min(H, round(W / ratio[0])), W
    elif W / H > ratio[1]:
        fh, fw = H, min(W, round(H * ratio[1]))
    else:
        fh, fw = H, W
    found = fits.any(1)
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    top = torch.where(found, (where[:, 0] * (H - h + 1)).long().clamp(max=H - h), (H - h) // 2)
    left = torch.where(found, (where[:, 1] * (W - w + 1)).long().clamp(max=W - w), (W - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resample_boxes(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box (top, left, h, w) resampled bilinearly to `size` (H, W), mirrored where
    `flip` says: one grid_sample over the batch, float32 (B, C, H, W) on the images' device.

    No antialiasing: a box is shrunk at most by the decode margin (about 1.15x for a 0.875 crop),
    where bilinear sampling does not alias."""
    B, H, W, C = images.shape
    device = images.device
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    sx = w / W * (torch.where(flip, -1.0, 1.0) if flip is not None else 1.0)
    # align_corners=False: -1 and 1 are the outer edges of the first and last pixels.
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta.to(device), [B, C, *size], align_corners=False)
    x = images.permute(0, 3, 1, 2).float()
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of float (B, C, H, W) images (the image itself when C is 1)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x * weights).sum(1, keepdim=True)


def colour_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = JITTER) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each by a factor drawn per image from
    [1 - strength, 1 + strength], on float (B, C, H, W) pixels in 0..255, clamped after each
    step as torchvision's ColorJitter does (saturation leaves grayscale images alone)."""
    B = x.shape[0]
    factors = (1 + strength * (2 * torch.rand(B, 3, generator=gen) - 1)).to(x.device)[:, :, None, None, None]
    x = (x * factors[:, 0]).clamp(0, 255)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factors[:, 1] + mean).clamp(0, 255)
    gray = _gray(x)
    return ((x - gray) * factors[:, 2] + gray).clamp(0, 255)


def photo_augment(images: torch.Tensor, gen: torch.Generator, size: tuple[int, int],
                  scale: tuple[float, float], flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random-resized crop to `size`, mirrored with probability 1/2 (or where `flip` says), light
    colour jitter: uint8 (B, H, W, C) -> uint8 (B, size[0], size[1], C), rounded once at the end."""
    B, H, W, C = images.shape
    boxes = crop_boxes(B, H, W, gen, scale)
    if flip is None:
        flip = torch.rand(B, generator=gen) < 0.5
    x = colour_jitter(resample_boxes(images, boxes, size, flip), gen)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
