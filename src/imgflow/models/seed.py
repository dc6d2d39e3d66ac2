"""The reference notebook's two Keras CNNs, reproduced layer for layer (`seed-baseline`, `seed-batchnorm`)."""

from __future__ import annotations

from torch import nn

from imgflow.models.layers import FlattenNHWC, KerasConv2d, KerasDense, keras_batchnorm
from imgflow.models.registry import ModelSpec, register_model


class KerasCNN(nn.Module):
    """A Keras-style VGG stack: blocks of 'same' convs (ReLU, optional BN), a 2x2 max pool, dense head.

    Layer order is Keras': Conv2D(activation='relu') then BatchNormalization, so BN sits after ReLU.
    Flatten is channels-last (H, W, C) like Keras', so Dense weights can be imported unchanged.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), *,
                 widths: tuple[int, ...] = (16, 32, 64),  # output channels of each block
                 convs_per_block: int = 1,
                 kernel_size: int = 3,
                 batchnorm: bool = False,  # BN after every ReLU (convs and the hidden dense)
                 block_dropout: tuple[float, ...] = (),  # dropout after each block's pool; () = none
                 dense: int = 128,  # hidden dense width
                 dense_dropout: float = 0.0):
        super().__init__()
        H, W = image_size
        blocks = []
        c_in = in_channels
        for i, width in enumerate(widths):
            layers: list[nn.Module] = []
            for _ in range(convs_per_block):
                layers += [KerasConv2d(c_in, width, kernel_size), nn.ReLU(inplace=True)]
                if batchnorm:
                    layers.append(keras_batchnorm(width))
                c_in = width
            # Keras MaxPooling2D(2) is 'valid': odd sizes are floored.
            layers.append(nn.MaxPool2d(2))
            H, W = H // 2, W // 2
            p = block_dropout[i] if i < len(block_dropout) else 0.0
            if p > 0:
                layers.append(nn.Dropout(p))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        assert H >= 1 and W >= 1, f"image {image_size} too small for {len(widths)} 2x2 pools"

        head: list[nn.Module] = [FlattenNHWC(), KerasDense(c_in * H * W, dense), nn.ReLU(inplace=True)]
        if batchnorm:
            head.append(keras_batchnorm(dense, dims=1))
        if dense_dropout > 0:
            head.append(nn.Dropout(dense_dropout))
        head.append(KerasDense(dense, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        return self.head(self.features(x))


# The notebook trained both with pixels / 255, Adam 1e-3, batch 128, 20 epochs and Keras'
# validation_split=0.2: the `notebook` preset in training.config and `imgflow reproduce-seed`.
register_model(ModelSpec(
    name="seed-baseline",
    builder=KerasCNN,
    # The notebook's Dropout(0.2) line was never added to the model that ran: none here.
    kwargs=dict(widths=(16, 32, 64), convs_per_block=1, kernel_size=3, dense=128),
    description="notebook CNN 1: 3 conv(3x3)+pool, dense 128 (Keras-exact)",
    family="seed",
))

register_model(ModelSpec(
    name="seed-batchnorm",
    builder=KerasCNN,
    kwargs=dict(widths=(64, 128, 128), convs_per_block=2, kernel_size=4, batchnorm=True,
                block_dropout=(0.2, 0.25, 0.35), dense=256, dense_dropout=0.5),
    description="notebook CNN 2: 3x[2 conv(4x4)+BN]+pool+dropout, dense 256+BN (Keras-exact)",
    family="seed",
))
