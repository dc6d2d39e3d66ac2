"""The data layer: every source becomes a `Dataset` of uint8 (N, H, W, C) arrays.

    from imgflow.data import load_dataset, channel_stats
    ds = load_dataset("cifar10")            # or "fashion-mnist", or a folder/.zip/.tar(.gz)
    mean, std = channel_stats(ds.train.images)
"""
from imgflow.data.dataset import Dataset, Split
from imgflow.data.load import load_dataset
from imgflow.data.stats import channel_stats

__all__ = ["Dataset", "Split", "channel_stats", "load_dataset"]
