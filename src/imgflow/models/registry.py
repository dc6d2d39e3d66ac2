"""The model registry: named variants (builder + kwargs), creation, parameter and FLOP counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from imgflow.errors import UserError
from imgflow.models.hf import build_hf, hf_source, is_hf

log = logging.getLogger(__name__)

# Every family pools by 2 at least three times; below 8 pixels the seed models run out of image.
MIN_IMAGE_SIZE = 8
# The largest model built for real: 250M parameters are 1 GB of float32 weights, and training
# holds four such copies (weights, gradients, Adam's two moments). The registered models have
# 0.15-2M at 32x32; seed-baseline's dense layer grows with the image (2.1 billion at 4096x4096).
MAX_PARAMS = 250_000_000


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: a builder and the kwargs that make this variant."""

    name: str  # registry key, e.g. "fast-small"
    builder: Callable[..., nn.Module]  # called as builder(num_classes, in_channels, image_size, **kwargs)
    kwargs: dict[str, Any] = field(default_factory=dict)  # what makes this variant; read-only
    description: str = ""  # one line for `imgflow models`
    family: str = ""  # "seed", "fast", "resnet": variants of one family train alike (see training.config)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a variant to the registry; a name may be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Return the registered model names, in registration order."""
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """Return the spec registered as `name`; an unknown name is a UserError listing the known ones.

    `hf:<hub id or local dir>` names a Hugging Face transformers classifier (models.hf), built
    on demand rather than registered."""
    if is_hf(name):
        return ModelSpec(name, build_hf, {"source": hf_source(name)},
                         "a Hugging Face transformers image classifier", family="hf")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def _image_hw(image_size: int | Iterable[int]) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise UserError(f"image size must be H x W, got {image_size!r}")
    return hw  # type: ignore[return-value]


def create_model(name: str, num_classes: int, in_channels: int = 3,
                 image_size: int | tuple[int, int] = (32, 32), meta: bool = False,
                 **overrides: Any) -> nn.Module:
    """Build the registered model `name`; `overrides` replace entries of the variant's kwargs.

    meta: shapes only, on PyTorch's meta device (no memory, no random numbers drawn), for
    counting parameters and FLOPs of any size. A real build of more than MAX_PARAMS parameters
    is refused before it allocates anything.
    """
    spec = get_model_spec(name)
    H, W = _image_hw(image_size)
    if num_classes < 1:
        raise UserError(f"number of classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise UserError(f"number of channels must be at least 1, got {in_channels}")
    if min(H, W) < MIN_IMAGE_SIZE:
        raise UserError(f"image size must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {H}x{W}")
    kwargs = {**spec.kwargs, **overrides}

    def build() -> nn.Module:
        return spec.builder(num_classes=num_classes, in_channels=in_channels, image_size=(H, W), **kwargs)

    # hf: models have a fixed size whatever the image (and loading weights on the meta device
    # would read them for nothing).
    if meta or (spec.family != "hf" and _unusual_size(H, W, num_classes, in_channels)):
        with torch.device("meta"):
            shapes = build()
        if meta:
            return shapes
        params = count_params(shapes)["params"]
        if params > MAX_PARAMS:
            raise UserError(f"{name} for {num_classes:,} classes of {H}x{W}x{in_channels} images would have "
                            f"{params:,} parameters, more than the {MAX_PARAMS:,} this machine can train: "
                            "use a smaller --image-size (or fewer classes)")
    model = build()
    log.debug("created %s for %d classes, %d channels, %dx%d", name, num_classes, in_channels, H, W)
    return model


def _unusual_size(H: int, W: int, num_classes: int, in_channels: int) -> bool:
    """Beyond these every registered model stays far below MAX_PARAMS and a forward pass of one
    image is cheap; outside them sizes are checked (and counted) on PyTorch's meta device first,
    whose first use costs ~2 s of set-up."""
    return H * W > 128 * 128 or num_classes > 10_000 or in_channels > 16


def count_params(model: nn.Module) -> dict[str, int]:
    """Count parameters as Keras does: all weights plus BatchNorm running mean and variance."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Keras keeps moving_mean/moving_variance as non-trainable weights; PyTorch keeps them as
    # buffers, beside num_batches_tracked which Keras has no counterpart for.
    running = sum(m.running_mean.numel() + m.running_var.numel()
                  for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    total = params + running
    return {"params": total, "trainable_params": trainable, "non_trainable_params": total - trainable}


def count_flops(model: nn.Module, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> int:
    """Forward FLOPs per image of the Conv2d and Linear layers (a multiply-add counts as 2); on a
    meta-device model (create_model(meta=True)) without computing or allocating anything."""
    flops = 0

    def conv_hook(m: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal flops
        kh, kw = m.kernel_size
        flops += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal flops
        flops += 2 * out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    # Eval mode so the probe leaves BatchNorm running statistics untouched; one image, so the
    # counts above are per image.
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, *image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops


def describe_models(num_classes: int = 10, in_channels: int = 3,
                    image_size: tuple[int, int] = (32, 32)) -> list[dict[str, Any]]:
    """One row per registered model: name, Keras-style parameter counts, description, family, MFLOPs."""
    H, W = _image_hw(image_size)
    # Counting needs only shapes: an unusual size (4096x4096 images, 10^8 classes) is counted on
    # the meta device, which allocates nothing, instead of gigabytes for a table.
    meta = _unusual_size(H, W, num_classes, in_channels)
    rows = []
    for name, spec in _REGISTRY.items():
        model = create_model(name, num_classes, in_channels, (H, W), meta=meta)
        rows.append({
            "name": name,
            **count_params(model),
            "description": spec.description,
            "family": spec.family,
            "forward_mflops": round(count_flops(model, in_channels, (H, W)) / 1e6, 2),
        })
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    """Render `describe_models` rows as an aligned text table."""
    columns = [("name", "model", "<"), ("params", "params", ">"),
               ("trainable_params", "trainable", ">"), ("non_trainable_params", "non-trainable", ">"),
               ("forward_mflops", "MFLOP/img", ">"), ("description", "description", "<")]

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key, "")
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:,.1f}"
        return str(value)

    table = [[title for _, title, _ in columns]] + [[cell(r, key) for key, _, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        parts = [f"{text:{align}{width}}" for text, (_, _, align), width in zip(line, columns, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
