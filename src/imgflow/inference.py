"""Batched forward passes over uint8 images: the one path evaluate, predict and reports share."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imgflow.augment import shift
from imgflow.data.decode import center_crop
from imgflow.precision import autocast
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.progress import progress_bar


TTA_AVERAGES = ("probabilities", "logits")


def tta_views(images: torch.Tensor, prep: Preprocessing | None = None) -> list[tuple[torch.Tensor, float]]:
    """Test-time views and their weights. Images with a margin around their centre crop (a photo
    run's, at prep.resize_size): the centre crop, its mirror, and the top-left and bottom-right
    crops of the model's size, the latter two mirrored (the crops move by the margin, ~6% of the
    side at 0.875, not by the 1 pixel of small data), 1/4 each. Other images: airbench94's six,
    the image and its mirror (1/4 each), and both shifted one pixel down-right and up-left
    (reflect fill), each with its mirror (1/8 each)."""
    if prep is not None and prep.crops(images):
        (H, W), (h, w) = images.shape[1:3], prep.image_size
        centre = center_crop(images, (h, w))
        crops = [centre, centre.flip(2), images[:, :h, :w].flip(2), images[:, H - h:, W - w:].flip(2)]
        return [(crop, 0.25) for crop in crops]
    views = [(images, 0.25), (images.flip(2), 0.25)]
    for d in (1, -1):
        moved = shift(images, d, d)
        views += [(moved, 0.125), (moved.flip(2), 0.125)]
    return views


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, prep: Preprocessing,
                   precision: str = "fp32", batch_size: int = 500, tta: bool = False,
                   progress: bool = False, desc: str = "predict", tta_average: str = "probabilities") -> torch.Tensor:
    """float32 logits (N, classes), on the CPU, for uint8 images (N, H, W, C) wherever they are.

    The model must be in eval mode; it runs on its own device, and each batch goes there. With
    tta, the views are averaged as `tta_average` says: "probabilities" (imgflow's): the logits are
    log of the weighted mean softmax, so softmax() of the result is the averaged probability;
    "logits" (airbench's): the weighted mean of the logits.
    """
    assert tta_average in TTA_AVERAGES, f"tta_average: expected one of {TTA_AVERAGES}, got {tta_average!r}"
    images = torch.as_tensor(images)
    assert images.dtype == torch.uint8, f"expected uint8 images, got {images.dtype}"
    assert not model.training, "predict_logits needs model.eval()"
    device = model_device(model)
    model = model.to(memory_format=torch.channels_last)  # as in training: faster convolutions
    out = []
    with progress_bar(enabled=progress, total=len(images), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            views = tta_views(batch, prep) if tta else [(batch, 1.0)]
            total = None
            for view, weight in views:
                with autocast(precision, device.type):
                    logits = model(to_model_input(view, prep, channels_last=True)).float()
                if not tta:
                    out.append(logits.cpu())
                    break
                part = weight * (logits.softmax(dim=1) if tta_average == "probabilities" else logits)
                total = part if total is None else total + part
            if tta:
                out.append((total.clamp_min(1e-12).log() if tta_average == "probabilities" else total).cpu())
            bar.update(len(batch))
    return torch.cat(out) if out else torch.empty(0)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Plain cross-entropy (no label smoothing) and top-1 accuracy."""
    labels = torch.as_tensor(labels)
    return {"loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean())}
