"""Fashion-MNIST from its official IDX files (Xiao, Rasul and Vollgraf, 2017).

Where the files come from, first match wins:
1. env `IMGFLOW_FASHION_MNIST` (a directory holding the four files), when set: an explicit
   setting beats the system copy, which also lets tests point at tiny files;
2. `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`);
3. the official download from Zalando's mirror into the cache, md5-verified.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from imgflow.data.dataset import Dataset, Split
from imgflow.data.download import download
from imgflow.errors import UserError
from imgflow.text import plural

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# (file, md5 of the published .gz): from the Fashion-MNIST README. The Debian package recompresses
# the files, so its .gz bytes differ; local copies are checked by their IDX structure instead.
FILES = {
    "train_images": ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]  # as published, label order 0-9

_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type Fashion-MNIST uses


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not) of unsigned bytes with `ndim` dimensions.

    Magic number = two zero bytes, the type code, the number of dimensions; then one big-endian
    uint32 size per dimension; then the data. Everything is checked against the file's length.
    """
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None
    expected_magic = bytes([0, 0, _UBYTE, ndim])
    if raw[:4] != expected_magic:
        raise UserError(f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic number "
                        f"{raw[:4].hex()}, expected {expected_magic.hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise UserError(f"{path}: the header promises {size} data bytes for shape {dims}, "
                        f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has no {stem}.gz: expected the four Fashion-MNIST IDX files there")


def find_files(download_dir: Path, progress: bool = True) -> dict[str, Path]:
    """The four IDX files: from IMGFLOW_FASHION_MNIST, the Debian package, or a download."""
    env = os.environ.get("IMGFLOW_FASHION_MNIST")
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir():
            raise UserError(f"IMGFLOW_FASHION_MNIST={env} is not a directory: point it at the "
                            "folder holding the Fashion-MNIST IDX files")
        return {key: _find_file(folder, stem) for key, (stem, _) in FILES.items()}
    if SYSTEM_DIR.is_dir():
        return {key: _find_file(SYSTEM_DIR, stem) for key, (stem, _) in FILES.items()}
    hint = ("Install it with 'apt-get install -y dataset-fashion-mnist' or set "
            "IMGFLOW_FASHION_MNIST to a folder holding the IDX files.")
    return {key: download(URL_BASE + f"{stem}.gz", Path(download_dir) / f"{stem}.gz", md5,
                          progress=progress, hint=hint)
            for key, (stem, md5) in FILES.items()}


def _split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {plural(len(images), 'image')} but {labels_path} "
                        f"{plural(len(labels), 'label')}")
    if len(labels) and labels.max() >= len(CLASSES):
        raise UserError(f"{labels_path}: labels outside 0..{len(CLASSES) - 1}")
    return Split(images[..., None].copy(), labels.astype(np.int64))  # (N, 28, 28, 1)


def read_fashion_mnist(files: dict[str, Path]) -> Dataset:
    """Parse the four IDX files into a data set (train 60,000, test 10,000, 28x28x1)."""
    train = _split(files["train_images"], files["train_labels"])
    test = _split(files["test_images"], files["test_labels"])
    return Dataset(name="fashion-mnist", source=str(files["train_images"].parent), sha256="",
                   classes=list(CLASSES), train=train, test=test)
