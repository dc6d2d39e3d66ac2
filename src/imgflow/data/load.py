"""`load_dataset`: resolve a data spec to a source, decode it once, then read it from the cache."""
from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import time
from pathlib import Path

from imgflow.data import cache, cifar10, fashion_mnist
from imgflow.data.arrays import read_arrays_file
from imgflow.data.dataset import Dataset, Split
from imgflow.data.decode import check_fits_in_memory, resize_images
from imgflow.data.folder import dataset_name, read_image_folder
from imgflow.data.readers import DirReader, is_tar_archive
from imgflow.errors import UserError
from imgflow.text import plural

log = logging.getLogger(__name__)

_ALIASES = {"cifar10": "cifar10", "cifar-10": "cifar10", "fashion-mnist": "fashion-mnist",
            "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
_PATH_KINDS = "an image folder/.zip/.tar(.gz) or a .npz of arrays"
_SKIPPED_SHOWN = 5  # skipped files named in the warning; the card lists more
# (source, sha256, image size) whose remarks were warned about in this process: a workflow or a
# tuning study loads one data set many times, and one warning says it all.
_remarked: set[tuple[str, str, tuple[int, int] | None]] = set()


# Every image is decoded into one uint8 array in memory; 4096x4096x3 is 48 MB per image.
MAX_IMAGE_SIDE = 4096


def named_source(spec: str) -> str | None:
    """'cifar10' or 'fashion-mnist' when `spec` names one of them (any accepted spelling), else None."""
    return _ALIASES.get(spec.strip().lower())


def load_dataset(spec: str, image_size: tuple[int, int] | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 remarks: bool = True) -> Dataset:
    """Load a data set as uint8 (N, H, W, C) splits with int64 labels and its provenance.

    spec: `cifar10` (env IMGFLOW_CIFAR10 if set, else the official download), `fashion-mnist`,
        or a path to an image folder, .zip, .tar or .tar.gz (see `imgflow.data.folder`), to
        an official `cifar-10-python.tar.gz` / extracted `cifar-10-batches-py` folder, or to a .npz
        of arrays (see `imgflow.data.arrays`).
    image_size: (H, W) to resize every image to; None keeps the data's own size (for folders of
        mixed sizes: the most common one). How modes, alpha and sizes are handled:
        `imgflow.data.decode`; folder layouts, skipped files, empty classes: `imgflow.data.folder`.
    cache_dir: where decoded arrays are cached; default env IMGFLOW_CACHE or ~/.cache/imgflow.
    progress: show progress bars (on a terminal) while downloading or decoding.
    remarks: warn about skipped files and conversions (False: only at -v, for a run's data that
        was reported when the run trained).
    """
    if not spec:  # Path("") is the working directory: never what was meant
        raise UserError(f"empty DATA: give cifar10, fashion-mnist, or a path to {_PATH_KINDS}")
    root = cache.cache_root(cache_dir)
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if not 1 <= min(image_size) <= max(image_size) <= MAX_IMAGE_SIDE:
            raise UserError(f"--image-size {image_size[0]}x{image_size[1]} is out of range: every image is "
                            f"held in memory, so each side must be 1 to {MAX_IMAGE_SIDE} pixels (e.g. 32 or 224)")
    name = named_source(spec)
    if name == "cifar10":
        env = os.environ.get("IMGFLOW_CIFAR10")
        if env:
            path = Path(env).expanduser()
            if not path.exists():
                raise UserError(f"IMGFLOW_CIFAR10={env} does not exist: point it at "
                                "cifar-10-python.tar.gz or a CIFAR-10 image folder/.zip, or unset it")
        else:
            path = cifar10.download_cifar10(root / "downloads", progress=progress)
        dataset = _load_path(path, root, image_size, progress)
        if dataset.classes != cifar10.CLASSES:
            log.warning("%s stands in for CIFAR-10 but its classes are %s", path,
                        ", ".join(dataset.classes))
        dataset = dataclasses.replace(dataset, name="cifar10")
    elif name == "fashion-mnist":
        files = fashion_mnist.find_files(root / "downloads", progress=progress)
        digest = cache.tree_sha256(files["train_images"].parent, root,
                                   [(p.name, p) for p in files.values()], [])
        dataset = _cached(root, digest, image_size,
                          lambda: fashion_mnist.read_fashion_mnist(files), progress)
        dataset = dataclasses.replace(dataset, name="fashion-mnist",
                                      source=str(files["train_images"].parent), sha256=digest)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"no data set '{spec}': give cifar10, fashion-mnist, or a path to {_PATH_KINDS}")
        dataset = _load_path(path, root, image_size, progress)
    _log_remarks(dataset, image_size, remarks)
    return dataset


def _load_path(path: Path, root: Path, image_size, progress: bool) -> Dataset:
    """A directory or archive: official CIFAR-10 batches or an image folder; or a .npz of arrays."""
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_arrays_file(path, root, image_size, progress)
    if path.is_dir():
        official = cifar10.is_official_dir(path)
        if official is not None:
            build = lambda: cifar10.read_official_dir(official)  # noqa: E731
        else:
            build = lambda: read_image_folder(path, image_size, progress)  # noqa: E731
    elif path.is_file():
        build = lambda: _read_archive(path, image_size, progress)  # noqa: E731
    else:
        raise UserError(f"{path} is neither a file nor a directory")
    digest = _source_sha256(path, root)
    dataset = _cached(root, digest, image_size, build, progress)
    return dataclasses.replace(dataset, name=dataset_name(path), source=str(path), sha256=digest)


def _load_arrays_file(path: Path, root: Path, image_size, progress: bool) -> Dataset:
    digest = _source_sha256(path, root)
    if image_size is None:
        # Not cached: reading the .npz is the work a cache hit would do (np.load of .npy members),
        # so a cached copy would only double the disk it takes. Resized arrays are cached below,
        # since resizing is the slow part.
        dataset = read_arrays_file(path)
    else:
        dataset = _cached(root, digest, image_size, lambda: read_arrays_file(path), progress)
    return dataclasses.replace(dataset, name=dataset_name(path), source=str(path), sha256=digest)


def _source_sha256(path: Path, root: Path) -> str:
    """The content hash of a directory or archive; a file that cannot be read is a UserError."""
    try:
        if path.is_dir():
            listing = DirReader(path).list()  # unreadable entries are refused, not read
            return cache.tree_sha256(path, root, listing.files, listing.dirs,
                                     [entry["path"] for entry in listing.refused])
        return cache.file_sha256(path, root)
    except OSError as exc:  # e.g. an I/O error, or a file replaced while it was read
        raise UserError(f"cannot read {exc.filename or path}: {exc.strerror or exc} (give a readable "
                        "image folder or .zip/.tar(.gz) archive as DATA)") from None


def _read_archive(path: Path, image_size, progress: bool) -> Dataset:
    if is_tar_archive(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                official = cifar10.is_official_archive(tar)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read tar archive {path}: {exc}") from None
        if official:
            return cifar10.read_official_archive(path)
    return read_image_folder(path, image_size, progress)


def _cached(root: Path, digest: str, image_size, build, progress: bool) -> Dataset:
    """Read the decoded arrays from the cache, or build, resize if asked, and store them."""

    def build_and_resize() -> Dataset:
        start = time.perf_counter()
        dataset = build()
        if image_size is not None and dataset.image_shape[:2] != image_size:
            # Sources of one fixed size (CIFAR batches, IDX) are resized here; folders resize
            # while decoding.
            count = len(dataset.train) + (len(dataset.test) if dataset.test is not None else 0)
            check_fits_in_memory(count, image_size, dataset.image_shape[2], dataset.source or dataset.name)
            dataset = dataclasses.replace(
                dataset, train=_resized(dataset.train, image_size),
                test=None if dataset.test is None else _resized(dataset.test, image_size))
        count = len(dataset.train) + (len(dataset.test) if dataset.test is not None else 0)
        log.info("decoded %s in %.1f s", plural(count, "image"), time.perf_counter() - start)
        return dataset

    dataset, hit = cache.cached(root, cache.arrays_key(digest, image_size=image_size),
                                build_and_resize)
    if hit:
        log.debug("loaded decoded arrays from the cache in %s", root)
    return dataset


def _resized(split: Split, size: tuple[int, int]) -> Split:
    return Split(resize_images(split.images, size), split.labels)


def _log_remarks(dataset: Dataset, image_size: tuple[int, int] | None, remarks: bool) -> None:
    """Say what the load had to do (not only when it decoded): as a warning the first time this
    process loads the data set at this image size, at DEBUG after that; at INFO when `remarks`
    is False (a run's data, reported when the run trained)."""
    key = (dataset.source, dataset.sha256, image_size)
    if not remarks:
        level = logging.INFO
    elif key in _remarked:
        level = logging.DEBUG
    else:
        level = logging.WARNING
        _remarked.add(key)
    for note in dataset.notes:
        log.log(level, "%s: %s", dataset.name, note)
    if dataset.skipped:
        shown = "; ".join(f"{s['path']} ({s['reason']})" for s in dataset.skipped[:_SKIPPED_SHOWN])
        more = len(dataset.skipped) - _SKIPPED_SHOWN
        log.log(level, "%s: skipped %s that could not be used: %s%s", dataset.name,
                plural(len(dataset.skipped), "file"), shown, f"; and {more} more" if more > 0 else "")

