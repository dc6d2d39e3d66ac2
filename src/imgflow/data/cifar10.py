"""CIFAR-10 in its official `cifar-10-python.tar.gz` form: download, verify, parse safely.

The archive holds `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`, each a
Python 2 pickle of a dict. Pickles can run arbitrary code when loaded, so they are read with an
unpickler that admits only the few globals that rebuild numpy arrays; anything else is refused
before it is called.
"""
from __future__ import annotations

import _codecs
import io
import logging
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.data.dataset import Dataset, Split
from imgflow.data.download import download
from imgflow.errors import UserError
from imgflow.text import plural

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR-10 page
ARCHIVE_NAME = "cifar-10-python.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]  # official label order 0-9 (alphabetical, as it happens)
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
_MEMBERS = {*TRAIN_BATCHES, TEST_BATCH, META}
_PIXELS = 32 * 32 * 3  # one row of b"data": 1024 red, then 1024 green, then 1024 blue values


def download_cifar10(download_dir: Path, progress: bool = True, url: str | None = None,
                     md5: str | None = None) -> Path:
    """The official archive in `download_dir`, downloaded and md5-verified if not there yet."""
    return download(url or URL, Path(download_dir) / ARCHIVE_NAME, md5 or MD5, progress=progress,
                    hint="Set IMGFLOW_CIFAR10 to a local copy of CIFAR-10 "
                         "(cifar-10-python.tar.gz or an image folder/.zip) to skip the download.")


# ----------------------------------------------------------------------------------------------
# restricted unpickling


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode`, which Python 3 protocol-2 pickles use for bytes, limited to latin-1."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, encoding)


# numpy moved `numpy.core` to `numpy._core` in 2.0; pickles name either. Take the function numpy
# itself reduces arrays to, rather than importing the deprecated path.
_reconstruct = np.ndarray.__reduce__(np.empty(0))[0]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_loads(data: bytes, what: str = "pickle") -> Any:
    """Unpickle CIFAR-10 batch bytes, admitting only numpy array reconstruction.

    Any other global (os.system, builtins.eval, ...) raises UserError before it is called.
    `encoding="bytes"` because the batches were written by Python 2.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {what}: {exc} (not a genuine CIFAR-10 batch)") from None
    except Exception as exc:  # any malformed stream: EOFError, ValueError, TypeError, ...
        raise UserError(f"cannot read {what}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# parsing


def _parse_batch(obj: Any, what: str, num_classes: int) -> Split:
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise UserError(f"{what} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data, labels = obj[b"data"], obj[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == _PIXELS):
        shape = getattr(data, "shape", None)
        raise UserError(f"{what}: expected b'data' as uint8 (N, {_PIXELS}), got {type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{what}: b'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{what}: {plural(len(data), 'image')} but {plural(labels.size, 'label')}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{what}: labels outside 0..{num_classes - 1}")
    N = len(data)
    images = data.reshape(N, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return Split(np.ascontiguousarray(images), labels)


def _parse_members(members: dict[str, bytes], source: str) -> Dataset:
    missing = sorted(_MEMBERS - members.keys())
    if missing:
        raise UserError(f"{source} is not a complete CIFAR-10 python archive: missing {', '.join(missing)}")
    meta = restricted_loads(members[META], f"{source}: {META}")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{source}: {META} has no b'label_names' list")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    parts = [_parse_batch(restricted_loads(members[b], f"{source}: {b}"), f"{source}: {b}",
                          len(classes)) for b in TRAIN_BATCHES]
    train = Split(np.concatenate([p.images for p in parts]),
                  np.concatenate([p.labels for p in parts]))
    test = _parse_batch(restricted_loads(members[TEST_BATCH], f"{source}: {TEST_BATCH}"),
                        f"{source}: {TEST_BATCH}", len(classes))
    return Dataset(name="cifar10", source=source, sha256="", classes=classes, train=train,
                   test=test)


def is_official_archive(tar: tarfile.TarFile) -> bool:
    """Whether an open tar holds the CIFAR-10 python batches (rather than image files)."""
    names = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
    return {"data_batch_1", META} <= names


def is_official_dir(path: Path) -> Path | None:
    """The directory holding the batches if `path` is an extracted official archive, else None."""
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / META).is_file():
            return folder
    return None


def read_official_archive(path: Path) -> Dataset:
    """Parse `cifar-10-python.tar.gz` (or .tar) in memory, without extracting it."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: seeking back in a .gz is slow
                base = Path(member.name).name
                if member.isfile() and base in _MEMBERS:
                    f = tar.extractfile(member)
                    assert f is not None
                    members[base] = f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return _parse_members(members, str(path))


def read_official_dir(folder: Path) -> Dataset:
    """Parse an extracted `cifar-10-batches-py` directory."""
    members = {name: (folder / name).read_bytes() for name in _MEMBERS if (folder / name).is_file()}
    return _parse_members(members, str(folder))
