"""The data layer: every source becomes a `Dataset` of uint8 (N, H, W, C) arrays.

    from imgflow.data import load_dataset, channel_stats
    ds = load_dataset("cifar10")            # or "fashion-mnist", a folder/.zip/.tar(.gz), a .npz
    mean, std = channel_stats(ds.train.images)
    save_arrays("mine.npz", images, labels, classes=["cat", "dog"])  # in-memory data as a DATA path
"""
from imgflow.data.arrays import dataset_from_arrays, save_arrays
from imgflow.data.dataset import Dataset, Split
from imgflow.data.load import load_dataset
from imgflow.data.stats import channel_stats

__all__ = ["Dataset", "Split", "channel_stats", "dataset_from_arrays", "load_dataset", "save_arrays"]
