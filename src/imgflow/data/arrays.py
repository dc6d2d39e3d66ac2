"""In-memory data (the Python API's `(images, labels)`) and its file form, a .npz of arrays.

A .npz given as DATA holds:
    train_images  uint8 (N, H, W, C) with C 1 or 3, or (N, H, W) for grey
    train_labels  integers 0..K-1, shape (N,)
    test_images, test_labels   optional, both or neither; the same H, W and C as train
    classes       optional 1-D array of K strings; default "0".."K-1" (K = largest training
                  label + 1, so every test label must be a training label too)
It is read with `np.load(..., allow_pickle=False)`: an object array inside is refused, never
unpickled. `save_arrays` writes such a file, so data that began in memory can be named in a run's
config.json and re-read to reproduce or resume the run.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from imgflow.data.dataset import Dataset, Split
from imgflow.errors import UserError
from imgflow.fileio import atomic_write

REQUIRED = ("train_images", "train_labels")
OPTIONAL = ("test_images", "test_labels", "classes")


def _images(images, what: str) -> np.ndarray:
    """`images` as uint8 (N, H, W, C); grey (N, H, W) gains C = 1."""
    if not isinstance(images, np.ndarray):
        raise UserError(f"{what} is a {type(images).__name__}, expected a NumPy uint8 array (N, H, W, C)")
    if images.dtype != np.uint8:
        hint = " (scale floats in [0, 1] by 255 first)" if images.dtype.kind == "f" else ""
        raise UserError(f"{what} has dtype {images.dtype}, expected uint8 pixels 0..255: convert with "
                        f".astype(np.uint8){hint}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{what} has shape {images.shape}, expected (N, H, W, C) with C 1 (grey) or 3 "
                        "(RGB), or (N, H, W) for grey")
    N, H, W, _ = images.shape
    if min(N, H, W) < 1:
        raise UserError(f"{what} has shape {images.shape}: no images, or images of no pixels")
    return images


def _labels(labels, count: int, what: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)  # a list of ints is fine; its dtype is checked below
    if labels.dtype.kind not in "iu":
        raise UserError(f"{what} has dtype {labels.dtype}, expected integers 0..K-1")
    if labels.shape != (count,):
        raise UserError(f"{what} has shape {labels.shape}, expected ({count},): one label per image")
    if labels.min() < 0:
        raise UserError(f"{what} holds {labels.min()}: labels must be 0..K-1")
    return labels.astype(np.int64)


def _classes(classes, num: int) -> list[str]:
    """Class names: the given ones checked, or "0".."num-1"."""
    if classes is None:
        return [str(k) for k in range(num)]
    array = np.asarray(classes)
    if array.ndim != 1 or array.dtype.kind != "U":
        raise UserError(f"classes must be a 1-D array or list of strings, got {array.dtype} of shape "
                        f"{array.shape}")
    names = [str(c) for c in array]
    if len(names) < num:
        raise UserError(f"a label is {num - 1} but there are {len(names)} classes: labels must be "
                        f"0..{len(names) - 1}, one class name per label")
    if len(set(names)) != len(names) or not all(names):
        raise UserError("classes must be distinct, non-empty names")
    return names


def dataset_from_arrays(images, labels, classes=None, test_images=None, test_labels=None,
                        name: str = "arrays", source: str = "") -> Dataset:
    """A `Dataset` from in-memory arrays (layout as in the module doc); UserError saying what is
    wrong otherwise. The arrays are not copied when they already have the layout."""
    train_images = _images(images, "train_images")
    train_labels = _labels(labels, len(train_images), "train_labels")
    if (test_images is None) != (test_labels is None):
        raise UserError("test_images and test_labels go together: give both or neither")
    test = None
    if test_images is not None:
        test_images = _images(test_images, "test_images")
        if test_images.shape[1:] != train_images.shape[1:]:
            raise UserError(f"test_images are {'x'.join(map(str, test_images.shape[1:]))}, train_images "
                            f"{'x'.join(map(str, train_images.shape[1:]))}: both splits need one H x W x C")
        test = Split(test_images, _labels(test_labels, len(test_images), "test_labels"))
    names = _classes(classes, int(train_labels.max()) + 1)
    if test is not None and test.labels.max() >= len(names):
        why = ("one class name per label" if classes is not None else
               "without classes, K is the largest training label + 1")
        raise UserError(f"test_labels holds {test.labels.max()} but there are {len(names)} classes: "
                        f"labels must be 0..{len(names) - 1} ({why})")
    return Dataset(name=name, source=source, sha256="", classes=names,
                   train=Split(train_images, train_labels), test=test)


def read_arrays_file(path: Path) -> Dataset:
    """Read a .npz of arrays (module doc) without unpickling anything; UserError if it is not one."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = "it holds a pickle, and imgflow never unpickles" if "pickle" in str(exc) else exc
        raise UserError(f"cannot read {path} as a .npz of arrays: {reason}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not a .npz archive of train_images and "
                        "train_labels: write it with imgflow.data.save_arrays")
    with loaded:
        arrays = {key: _member(loaded, key, path) for key in loaded.files}
    missing = [k for k in REQUIRED if k not in arrays]
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        what = f"has no {' or '.join(missing)}" if missing else f"holds unknown arrays {', '.join(unknown)}"
        raise UserError(f"{path} {what}: expected train_images, train_labels and optionally "
                        "test_images, test_labels, classes")
    try:
        return dataset_from_arrays(arrays["train_images"], arrays["train_labels"], arrays.get("classes"),
                                   arrays.get("test_images"), arrays.get("test_labels"), source=str(path))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
        if "allow_pickle" in str(exc):
            raise UserError(f"{path}: {key} is an object array, which only unpickling could read, and "
                            "imgflow never unpickles: save plain numeric and string arrays "
                            "(imgflow.data.save_arrays)") from None
        raise UserError(f"cannot read {key} in {path}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a damaged member
        raise UserError(f"cannot read {key} in {path}: {exc}") from None


def train_images_shape(path: Path) -> tuple[int, ...]:
    """The shape of a .npz's train_images, from its .npy header only (no pixels read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("train_images.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, _ = read_header(f)
            return tuple(shape)
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        # Not a plain .npz: reading it all gives the one-line reason, or the answer.
        return read_arrays_file(path).train.images.shape


def save_arrays(path: str | os.PathLike, images, labels, classes=None, test_images=None,
                test_labels=None) -> Path:
    """Check in-memory data as `dataset_from_arrays` does and write it to `path` (a .npz),
    atomically; `imgflow inspect/train PATH` then read it. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise UserError(f"{path}: name the file *.npz, the suffix imgflow reads as arrays")
    dataset = dataset_from_arrays(images, labels, classes, test_images, test_labels)
    arrays = {"train_images": dataset.train.images, "train_labels": dataset.train.labels,
              "classes": np.asarray(dataset.classes, dtype=str)}
    if dataset.test is not None:
        arrays.update(test_images=dataset.test.images, test_labels=dataset.test.labels)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a temp file's name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path
