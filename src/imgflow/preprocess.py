"""The one place uint8 images become model input: used by training, evaluation, predict, export."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgflow.errors import MalformedContent
from imgflow.fileio import expect, field, list_of


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input was made from uint8 pixels; saved in every run's config.json."""

    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units; zeros for plain /255 scaling
    std: tuple[float, ...]  # per channel, in [0, 1] pixel units; ones for plain /255 scaling
    image_size: tuple[int, int]  # (H, W) the model was trained on
    channels: int  # 1 (grayscale) or 3 (RGB)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std),
                "image_size": list(self.image_size), "channels": self.channels,
                "channel_order": "RGB" if self.channels == 3 else "L",
                "formula": "x = (pixel / 255 - mean) / std, NCHW float32"}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From config.json's 'preprocessing'; MalformedContent names a value of the wrong kind."""
        where = "preprocessing."
        expect(d, "an object", "'preprocessing'")
        channels = field(d, "channels", "an integer", where)
        if channels not in (1, 3):
            raise MalformedContent(f"'preprocessing.channels' is {channels}, expected 1 or 3")
        mean = list_of(field(d, "mean", "a list", where), "a number", "'preprocessing.mean'", channels)
        std = list_of(field(d, "std", "a list", where), "a number", "'preprocessing.std'", channels)
        size = list_of(field(d, "image_size", "a list", where), "an integer", "'preprocessing.image_size'", 2)
        if min(std) <= 0 or min(size) < 1:
            raise MalformedContent("'preprocessing.std' and 'preprocessing.image_size' must be > 0")
        return cls(tuple(mean), tuple(std), tuple(size), channels)


def to_model_input(images: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float32 (B, C, H, W), on the images' device."""
    assert images.dtype == torch.uint8, f"expected uint8 images, got {images.dtype}"
    B, H, W, C = images.shape
    assert C == prep.channels, f"expected {prep.channels} channels, got {C}"
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=images.device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=images.device)
    x = (images.float() / 255.0 - mean) / std  # broadcasts over the trailing channel axis
    x = x.permute(0, 3, 1, 2)  # a view: NHWC memory read as NCHW is exactly channels_last
    return x if channels_last else x.contiguous()
