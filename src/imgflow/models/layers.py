"""Small building blocks shared by the model families: Keras-faithful layers and helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Keras BatchNormalization defaults. Keras' momentum 0.99 is the weight of the *old* running
# value; PyTorch's momentum is the weight of the *new* batch statistic, hence 1 - 0.99.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01


def keras_same_padding(kernel_size: int) -> tuple[int, int]:
    """Return (before, after) padding of one spatial axis for Keras/TensorFlow 'same' at stride 1."""
    total = kernel_size - 1
    # TensorFlow puts the odd pixel of an even kernel's padding after (bottom/right).
    return total // 2, total - total // 2


class KerasConv2d(nn.Conv2d):
    """Stride-1 Conv2d with Keras 'same' padding, Glorot-uniform kernel and zero bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        before, after = keras_same_padding(kernel_size)
        # Symmetric padding runs inside the convolution (no copy); only an even kernel needs
        # the asymmetric explicit pad, which F.pad does without breaking channels_last.
        super().__init__(in_channels, out_channels, kernel_size,
                         padding=before if before == after else 0, bias=bias)
        self.explicit_pad = None if before == after else (before, after, before, after)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        return super().forward(x)


class KerasDense(nn.Linear):
    """Linear layer initialised as Keras Dense: Glorot-uniform kernel, zero bias."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def keras_batchnorm(num_features: int, dims: int = 2) -> nn.Module:
    """Return a BatchNorm1d/2d with Keras' default eps and momentum."""
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(num_features, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


class FlattenNHWC(nn.Module):
    """Flatten in Keras' channels-last order (H, W, C) so Dense weights match a Keras model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a channels_last tensor the permute is a free view and flatten needs no copy.
        return x.permute(0, 2, 3, 1).flatten(1)


class GlobalMaxPool(nn.Module):
    """Max over all spatial positions: (B, C, H, W) -> (B, C), for any input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not x.amax(dim=(2, 3)): torch.compile's bf16 backward of amax on a CPU gave non-finite
        # gradients to every layer below (torch 2.13; eager was fine); max with indices does not.
        return F.adaptive_max_pool2d(x, 1).flatten(1)


class Scale(nn.Module):
    """Multiply by a constant (airbench scales its logits by 1/9 to temper early training)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def bias_only_batchnorm(num_features: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    """Return a BatchNorm2d whose scale is frozen at 1 and only the shift is learned (airbench)."""
    bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
    # The following conv re-scales freely, so a learned scale adds nothing but a parameter to
    # decay; airbench freezes it. It stays a (non-trainable) parameter for Keras-style counts.
    bn.weight.requires_grad_(False)
    return bn


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm that follows `conv` into the conv's weight and bias, in place.

    BatchNorm at inference is a per-channel affine map, s * x + t: scaling each filter by s and
    adding t as the conv's bias computes the same thing in one pass instead of two."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.mul_(scale).add_(shift)


def batchnorm_scale_positive(bn: nn.BatchNorm2d) -> bool:
    """Whether an eval-mode BatchNorm scales every channel by a positive factor: then it commutes
    with a max-pool (max(s*x + t) = s*max(x) + t only for s > 0) and may be folded across one."""
    return bool((bn.weight > 0).all())


def make_activation(name: str) -> nn.Module:
    """Return the activation module called `name` ('gelu' or 'relu')."""
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(acts)}")
    return acts[name]()
