"""Tiny data sets written by tests: image folders, archives, official-format CIFAR-10, IDX files.

Everything is small (a few dozen 8x8 images) and deterministic (seeded). Import from tests as
`from datagen import make_image_folder` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import colorsys
import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def class_colour(index: int, num_classes: int) -> tuple[int, int, int]:
    """The dominant RGB colour of class `index`: hues spread evenly around the colour wheel."""
    r, g, b = colorsys.hsv_to_rgb(index / max(num_classes, 1), 0.8, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def class_gray(index: int, num_classes: int) -> int:
    """The dominant gray level of class `index`, evenly spaced in [30, 225]."""
    return int(30 + 195 * index / max(num_classes - 1, 1))


def make_image(index: int, num_classes: int, size=(8, 8), mode: str = "RGB",
               rng: np.random.Generator | None = None, noise: int = 25) -> Image.Image:
    """One image of class `index`: its dominant colour (gray level for gray modes) plus noise."""
    rng = rng if rng is not None else np.random.default_rng(index)
    H, W = size
    if mode in ("L", "I;16", "I", "F", "1", "LA"):
        base = np.full((H, W), class_gray(index, num_classes), dtype=np.int16)
    else:
        base = np.empty((H, W, 3), dtype=np.int16)
        base[:] = class_colour(index, num_classes)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, size=base.shape), 0, 255).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(pixels.astype(np.uint16) * 257)  # full 16-bit range
    image = Image.fromarray(pixels)
    if mode == "P":
        return image.quantize(colors=16)
    return image if image.mode == mode else image.convert(mode)


def make_image_folder(root, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 12,
                      size=(8, 8), test: bool = True, mode: str = "RGB",
                      test_per_class: int | None = None, flat: bool = False, seed: int = 0,
                      fmt: str = "png") -> Path:
    """Write a learnable labelled image folder and return its root.

    Layout `root/train/<class>/NNN.png` (+ `root/test/<class>/...` when `test`), or class folders
    directly under `root` when `flat`. Each class has its own dominant colour (gray level for
    gray modes) plus uniform noise, so even a linear model separates them.
    test_per_class: images per class in test/ (default: per_class // 3, at least 1).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_test = test_per_class if test_per_class is not None else max(1, per_class // 3)
    splits = [(root, per_class)] if flat else [(root / "train", per_class)]
    if test and not flat:
        splits.append((root / "test", n_test))
    for split_dir, count in splits:
        for k, name in enumerate(classes):
            folder = split_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = make_image(k, len(classes), size, mode, rng)
                image.save(folder / f"{i:03d}.{fmt}")
    return root


def pack(folder, archive, prefix: str = "") -> Path:
    """Pack a folder into .zip, .tar or .tar.gz (by `archive`'s suffix), members under `prefix`."""
    folder, archive = Path(folder), Path(archive)
    files = sorted(p for p in folder.rglob("*"))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    else:
        mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as tf:
            for p in files:
                tf.add(p, prefix + p.relative_to(folder).as_posix(), recursive=False)
    return archive


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# official CIFAR-10 python format

CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"]


def cifar_batch(num_images: int, seed: int, num_classes: int = 10) -> dict:
    """A batch dict as in the official files: b'data' uint8 (N, 3072) as R, G, B planes."""
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, num_classes, size=num_images)]
    images = np.stack([np.asarray(make_image(y, num_classes, (32, 32), rng=rng)) for y in labels])
    data = images.transpose(0, 3, 1, 2).reshape(num_images, 3072)  # HWC -> CHW planes
    return {b"batch_label": b"batch", b"labels": labels, b"data": data,
            b"filenames": [b"x.png"] * num_images}


def make_cifar_archive(path, per_batch: int = 4, test_size: int = 5,
                       overrides: dict[str, bytes] | None = None) -> Path:
    """Write a tiny `cifar-10-python.tar.gz` in the official layout, pickles at protocol 2.

    overrides: member name (e.g. 'data_batch_1') -> raw bytes to store instead of the batch.
    """
    path = Path(path)
    overrides = overrides or {}
    members = {f"data_batch_{i}": pickle.dumps(cifar_batch(per_batch, seed=i), protocol=2)
               for i in range(1, 6)}
    members["test_batch"] = pickle.dumps(cifar_batch(test_size, seed=99), protocol=2)
    meta = {b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in CIFAR_LABEL_NAMES], b"num_vis": 3072}
    members["batches.meta"] = pickle.dumps(meta, protocol=2)
    members.update(overrides)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def make_fashion_mnist_dir(root, n_train: int = 20, n_test: int = 10, size=(28, 28),
                           compress: bool = True) -> Path:
    """Write the four Fashion-MNIST IDX files (tiny) into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root
