"""The one place uint8 images become model input: used by training, evaluation, predict, export.

Photo runs (`--augment photo` at an `--image-size`) keep their images a little larger than the
model's input, at `resize_size` = image_size / crop_pct (256 for 224 at 0.875): training crops
at random from them, and everything else (validation, evaluate, predict, serve, export and its
parity check) takes the centre crop of image_size here, as 'resize 256, centre crop 224' does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgflow.data.decode import center_crop
from imgflow.errors import MalformedContent
from imgflow.fileio import expect, field, list_of


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input was made from uint8 pixels; saved in every run's config.json."""

    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units; zeros for plain /255 scaling
    std: tuple[float, ...]  # per channel, in [0, 1] pixel units; ones for plain /255 scaling
    image_size: tuple[int, int]  # (H, W) the model was trained on
    channels: int  # 1 (grayscale) or 3 (RGB)
    crop_pct: float = 1.0  # the centre crop's share of each side of the resized image; 1 = no crop

    @property
    def resize_size(self) -> tuple[int, int]:
        """(H, W) images are resized to before the centre crop of image_size."""
        return resize_size(self.image_size, self.crop_pct)

    def crops(self, images: torch.Tensor) -> bool:
        """Whether uint8 (B, H, W, C) `images` are a photo run's resized ones, whose centre
        image_size crop is the model's input (images of any other size are taken as they are)."""
        return tuple(images.shape[1:3]) == self.resize_size != tuple(self.image_size)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std),
                "image_size": list(self.image_size), "channels": self.channels,
                "channel_order": "RGB" if self.channels == 3 else "L",
                "crop_pct": self.crop_pct, "resize_size": list(self.resize_size),
                "formula": "x = (pixel / 255 - mean) / std, NCHW float32"
                           + (", of the centre image_size crop of images resized to resize_size"
                              if self.crop_pct < 1 else "")}

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
        # A run from before photo augmentation has no crop_pct: it never cropped.
        crop = expect(d.get("crop_pct", 1.0), "a number", "'preprocessing.crop_pct'")
        if not 0 < crop <= 1:
            raise MalformedContent(f"'preprocessing.crop_pct' is {crop}, expected a number in (0, 1]")
        return cls(tuple(mean), tuple(std), tuple(size), channels, float(crop))


def resize_size(image_size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """The (H, W) whose centre crop of `image_size` keeps `crop_pct` of each side (224, 0.875 -> 256)."""
    return (max(image_size[0], round(image_size[0] / crop_pct)),
            max(image_size[1], round(image_size[1] / crop_pct)))


def to_model_input(images: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float32 (B, C, H, W), on the images' device.

    Images at prep.resize_size are centre-cropped to prep.image_size first (a photo run's
    evaluation view); images of any other size are taken as they are.
    """
    assert images.dtype == torch.uint8, f"expected uint8 images, got {images.dtype}"
    if prep.crops(images):
        images = center_crop(images, prep.image_size)
    B, H, W, C = images.shape
    assert C == prep.channels, f"expected {prep.channels} channels, got {C}"
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=images.device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=images.device)
    x = (images.float() / 255.0 - mean) / std  # broadcasts over the trailing channel axis
    x = x.permute(0, 3, 1, 2)  # a view: NHWC memory read as NCHW is exactly channels_last
    return x if channels_last else x.contiguous()
