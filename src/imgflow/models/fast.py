"""Fast CNNs in the airbench94 layout (arXiv 2404.00498): one ConvGroup block, variants as data."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imgflow.models.backbone import HeadAndBackbone
from imgflow.models.layers import (GlobalMaxPool, Scale, batchnorm_scale_positive, bias_only_batchnorm,
                                   fold_into_conv, make_activation)
from imgflow.models.registry import ModelSpec, register_model

log = logging.getLogger(__name__)


def _conv3x3(c_in: int, c_out: int, dirac: bool) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac:
        # Partial identity init (airbench): the first c_in filters pass their input through, so
        # a deep stack starts close to a shallow one and trains faster; the rest keep the default.
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:c_in])
    return conv


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> act, then `depth` x (conv3x3 -> BN -> act), optionally residual."""

    def __init__(self, c_in: int, c_out: int, *, depth: int = 1, residual: bool = False,
                 act: str = "gelu", bn_eps: float = 1e-12, bn_momentum: float = 0.4,
                 dirac: bool = True, pool_ceil: bool = False):
        super().__init__()
        self.conv = _conv3x3(c_in, c_out, dirac)
        # Pooling before BN (airbench's order) normalises a quarter of the pixels: cheaper.
        self.pool = nn.MaxPool2d(2, ceil_mode=pool_ceil)
        self.norm = bias_only_batchnorm(c_out, bn_eps, bn_momentum)
        self.act = make_activation(act)
        body: list[nn.Module] = []
        for _ in range(depth):
            body += [_conv3x3(c_out, c_out, dirac), bias_only_batchnorm(c_out, bn_eps, bn_momentum),
                     make_activation(act)]
        self.body = nn.Sequential(*body)
        self.residual = residual and depth > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.pool(self.conv(x))))
        return x + self.body(x) if self.residual else self.body(x)

    def fold_batchnorm(self) -> None:
        """Fold each BatchNorm into the conv before it (eval mode). The first one lies across the
        max-pool, which it commutes with when its scales are positive (airbench's are frozen at 1)."""
        if isinstance(self.norm, nn.BatchNorm2d) and batchnorm_scale_positive(self.norm):
            fold_into_conv(self.conv, self.norm)
            self.norm = nn.Identity()
        for i, layer in enumerate(self.body):
            if isinstance(layer, nn.BatchNorm2d):
                fold_into_conv(self.body[i - 1], layer)
                self.body[i] = nn.Identity()


class WhiteningStem(nn.Module):
    """A frozen 2x2 conv meant to hold whitening filters of the data's patches (+ and - copies), then act.

    Until `init_whitening` sees training images, the filters are +/- the identity on each patch
    pixel: a lossless re-coding of the input, so the model also trains without data-dependent init.
    The weight is frozen from construction (a fixed set of trainable parameters makes resume and
    parameter counts independent of whether whitening ran); the bias trains.
    """

    kernel_size = 2

    def __init__(self, in_channels: int, act: str = "gelu"):
        super().__init__()
        k = self.kernel_size
        self.patch_dim = in_channels * k * k
        self.conv = nn.Conv2d(in_channels, 2 * self.patch_dim, k, padding=0, bias=True)
        with torch.no_grad():
            eye = torch.eye(self.patch_dim).view(self.patch_dim, in_channels, k, k)
            self.conv.weight.copy_(torch.cat([eye, -eye]))
            self.conv.bias.zero_()
        self.conv.weight.requires_grad_(False)
        self.act = make_activation(act)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters to whiten 2x2 patches of `images` (float NCHW, normalised as in training)."""
        B, C, H, W = images.shape
        assert C * self.kernel_size ** 2 == self.patch_dim, f"expected {self.conv.in_channels} channels, got {C}"
        # Uncentred second moment of all 2x2 patches, as airbench (the bias absorbs the mean),
        # accumulated in float64 over chunks so thousands of images fit in little memory.
        cov = torch.zeros(self.patch_dim, self.patch_dim, dtype=torch.float64)
        n_patches = 0
        for chunk in images.split(256):
            patches = F.unfold(chunk.float(), self.kernel_size)  # (b, C*k*k, L)
            patches = patches.transpose(1, 2).reshape(-1, self.patch_dim).double()
            cov += patches.T @ patches
            n_patches += patches.shape[0]
        cov /= n_patches
        eigvals, eigvecs = torch.linalg.eigh(cov)
        # Each filter projects on one principal direction and scales it to unit variance; eps
        # keeps near-empty directions (e.g. constant borders) from blowing up.
        filters = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]).flip(0)
        filters = filters.to(self.conv.weight.dtype).view_as(self.conv.weight[: self.patch_dim])
        self.conv.weight.copy_(torch.cat([filters, -filters]))
        log.debug("whitening stem initialised from %d patches", n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ConvStem(nn.Module):
    """A 3x3 'same' conv -> BN -> act stem (ResNet-9's prep layer)."""

    def __init__(self, in_channels: int, width: int, act: str, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.norm = bias_only_batchnorm(width, bn_eps, bn_momentum)
        self.act = make_activation(act)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def fold_batchnorm(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            fold_into_conv(self.conv, self.norm)
            self.norm = nn.Identity()


def _per_group(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: expected one value per group ({n}), got {len(values)}")
    return values


class FastNet(HeadAndBackbone, nn.Module):
    """Stem, ConvGroups that each halve the image, global max pool, bias-free linear, scaled logits.

    The head is the linear layer and its scale; everything before it the backbone (models.backbone)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), *,
                 widths: Sequence[int] = (64, 256, 256),  # output channels per group
                 depths: int | Sequence[int] = 1,  # convs after each group's first one
                 residual: bool | Sequence[bool] = False,  # add each group's body as a residual
                 stem: str = "whiten",  # "whiten" (frozen 2x2, airbench) or "conv" (3x3+BN)
                 stem_width: int = 64,  # only for stem="conv"; the whitening width is 2*C*2*2
                 act: str = "gelu",
                 logit_scale: float = 1 / 9,  # airbench: small logits early keep training stable
                 bn_eps: float = 1e-12,
                 bn_momentum: float = 0.4,  # PyTorch convention (airbench's 0.6 in Keras'): a short
                                            # run's weights move fast, so stats track recent batches
                 dirac: bool = True):
        super().__init__()
        n = len(widths)
        depths = _per_group(depths, n, "depths")
        residual = _per_group(residual, n, "residual")
        if stem == "whiten":
            self.stem: nn.Module = WhiteningStem(in_channels, act)
            h, w = image_size[0] - 1, image_size[1] - 1  # 2x2 kernel, no padding
        elif stem == "conv":
            self.stem = ConvStem(in_channels, stem_width, act, bn_eps, bn_momentum)
            h, w = image_size
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'whiten' or 'conv'")
        groups = []
        c_in = self.stem.out_channels
        for width, depth, res in zip(widths, depths, residual):
            # Floor pooling as airbench (31 -> 15 -> 7 -> 3 at 32x32); only where the floor would
            # leave nothing (a side of 1 pixel, small images) does the pool round up instead.
            ceil = min(h, w) < 2
            groups.append(ConvGroup(c_in, width, depth=depth, residual=res, act=act, bn_eps=bn_eps,
                                    bn_momentum=bn_momentum, dirac=dirac, pool_ceil=ceil))
            h, w = (-(-h // 2), -(-w // 2)) if ceil else (h // 2, w // 2)
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.pool = GlobalMaxPool()
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.scale = Scale(logit_scale)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Fit the whitening stem to training images (float NCHW, normalised); no-op for a conv stem."""
        if isinstance(self.stem, WhiteningStem):
            self.stem.init_whitening(images)

    def whitening_bias(self) -> nn.Parameter | None:
        """The whitening stem's bias (airbench trains it for the first epochs only); None for a conv stem."""
        return self.stem.conv.bias if isinstance(self.stem, WhiteningStem) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))
        return self.scale(self.head(self.pool(x)))

    def head_modules(self) -> list[nn.Module]:
        return [self.head, self.scale]

    def fold_batchnorm(self) -> "FastNet":
        """Fold every BatchNorm into its convolution, for inference only: the same logits (to
        rounding) from one pass over each activation fewer. Needs eval mode (running statistics);
        the folded model cannot train on. Returns the model."""
        assert not self.training, "fold_batchnorm needs model.eval(): it folds the running statistics"
        if isinstance(self.stem, ConvStem):
            self.stem.fold_batchnorm()
        for group in self.groups:
            group.fold_batchnorm()
        return self


_AIRBENCH = dict(stem="whiten", depths=1, residual=False, act="gelu", logit_scale=1 / 9)

register_model(ModelSpec(
    name="fast-small",
    builder=FastNet,
    kwargs=dict(_AIRBENCH, widths=(32, 64, 128)),
    description="airbench layout, widths 32/64/128: the small, fast variant",
    family="fast",
))

register_model(ModelSpec(
    name="fast-medium",
    builder=FastNet,
    kwargs=dict(_AIRBENCH, widths=(64, 128, 256)),
    description="airbench layout, widths 64/128/256",
    family="fast",
))

register_model(ModelSpec(
    name="fast-large",
    builder=FastNet,
    kwargs=dict(_AIRBENCH, widths=(64, 256, 256)),
    description="airbench94 layout, widths 64/256/256 (airbench: 94% in ~10 epochs)",
    family="fast",
))

register_model(ModelSpec(
    name="resnet9",
    builder=FastNet,
    # ResNet-9 at half width (64/128/256/512 -> 32/64/128/256): a 3x3 prep conv, then groups
    # of which the first and last add two residual convs; logits x 0.125 as in Page's net.
    # DAWNBench trained it with Nesterov SGD 0.9, lr 0 -> 0.4 -> 0 (peak at 5/24) at batch 512,
    # weight decay 5e-4, 24 epochs, flip + 4-px translate + 8-px cutout.
    kwargs=dict(stem="conv", stem_width=32, widths=(64, 128, 256), depths=(2, 0, 2),
                residual=True, act="relu", logit_scale=0.125),
    description="ResNet-9 (DAWNBench) at half width, residual groups 1 and 3",
    family="resnet",
))
