"""Decoded-array cache and content hashes.

Layout under the cache root (`cache_dir` argument, else env `IMGFLOW_CACHE`, else
`$XDG_CACHE_HOME/imgflow`, else `~/.cache/imgflow`):

    downloads/           official archives, written only once their checksum is verified
    hashes/<key>         memoised sha256 of a source, keyed by (absolute path, size, mtime, inode)
    arrays/<key>/        one decoded data set: {train,test}_{images,labels}.npy + meta.json

An `arrays/<key>` directory is built in a temporary directory and renamed into place, so it either
exists complete or not at all; .npy files are read with `allow_pickle=False`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from imgflow.data.dataset import Dataset, Split

log = logging.getLogger(__name__)

# Bump when any decoder's output for the same source bytes changes, so stale caches are not read.
# 2: a plain .tar cut between two members is refused; version 1 cached the members before the cut.
# 3: chains of wrapping folders are peeled, class folders a level too high refused; version 2 read
#    a zip of export/dataset/train/<class>/ as one class.
CACHE_VERSION = 3
_HASH_CHUNK = 1 << 20  # bytes read per hashing step


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else IMGFLOW_CACHE, else the user's cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("IMGFLOW_CACHE"):
        return Path(os.environ["IMGFLOW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imgflow"


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# content hashes, memoised: hashing the 63 MB CIFAR zip on every load would eat the 2 s budget


def _memo_read(root: Path, key: str) -> str | None:
    try:
        value = (root / "hashes" / key).read_text(encoding="ascii").strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


def _memo_write(root: Path, key: str, value: str) -> None:
    folder = root / "hashes"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value + "\n")
        os.replace(tmp, folder / key)
    except OSError as exc:  # a read-only cache only costs speed
        log.debug("could not memoise a hash in %s: %s", folder, exc)


def sha256_of_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (a file of any size, little memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_text(st: os.stat_result) -> str:
    # Size and mtime as asked, plus inode and ctime: a file replaced by rename, or rewritten
    # within one mtime tick, still changes one of them.
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def file_sha256(path: Path, root: Path) -> str:
    """sha256 of a file's bytes, memoised by (absolute path, size, mtime_ns, inode, ctime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = _digest_text(f"file\0{path}\0{_stat_text(st)}")[:40]
    cached = _memo_read(root, key)
    if cached is None:
        cached = sha256_of_file(path)
        _memo_write(root, key, cached)
    return cached


def tree_sha256(path: Path, root: Path, files: Iterable[tuple[str, Path]],
                dirs: Iterable[str], refused: Iterable[str] = ()) -> str:
    """A stable sha256 of a directory tree's content: relative paths and each file's sha256.

    `files` are (relative posix path, absolute path) pairs, `dirs` relative directory paths,
    `refused` relative paths of entries that cannot be read (hashed by name, so that the cached
    list of skipped files stays true). Memoised by a fingerprint of every file's path, size and
    mtime, so an unchanged tree is only stat'ed on later loads, not read.
    """
    files = sorted(files)
    dirs = sorted(dirs)
    refused = sorted(refused)
    # os.fsencode, not str.encode: names that are not UTF-8 reach here as lone surrogates.
    stats = [(rel, p.stat()) for rel, p in files]
    fingerprint = hashlib.sha256(b"tree\0" + os.fsencode(Path(path).resolve()) + b"\n")
    for rel, st in stats:
        fingerprint.update(os.fsencode(rel) + f"\0{_stat_text(st)}\n".encode())
    for rel in dirs:
        fingerprint.update(b"dir\0" + os.fsencode(rel) + b"\n")
    for rel in refused:
        fingerprint.update(b"refused\0" + os.fsencode(rel) + b"\n")
    key = fingerprint.hexdigest()[:40]
    cached = _memo_read(root, key)
    if cached is None:
        h = hashlib.sha256()
        for rel, p in files:
            h.update(os.fsencode(rel) + f"\0{sha256_of_file(p)}\n".encode())
        for rel in dirs:
            h.update(os.fsencode(rel) + b"/\n")
        for rel in refused:
            h.update(os.fsencode(rel) + b"\0refused\n")
        cached = h.hexdigest()
        _memo_write(root, key, cached)
    return cached


# ----------------------------------------------------------------------------------------------
# decoded arrays


def arrays_key(source_sha256: str, **options) -> str:
    """Cache key for a source's decoded arrays: its content hash plus every decoding option."""
    text = json.dumps({"sha256": source_sha256, "version": CACHE_VERSION, **options},
                      sort_keys=True)
    return _digest_text(text)[:40]


def _split_names(split: str) -> tuple[str, str]:
    return f"{split}_images.npy", f"{split}_labels.npy"


def read_arrays(root: Path, key: str) -> Dataset | None:
    """The cached data set for `key` (provenance fields empty), or None on a miss."""
    folder = root / "arrays" / key
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        splits = {}
        for split in ("train", "test") if meta["has_test"] else ("train",):
            images_name, labels_name = _split_names(split)
            splits[split] = Split(np.load(folder / images_name, allow_pickle=False),
                                  np.load(folder / labels_name, allow_pickle=False))
        return Dataset(name="", source="", sha256="", classes=list(meta["classes"]),
                       train=splits["train"], test=splits.get("test"),
                       skipped=list(meta["skipped"]), notes=list(meta["notes"]))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        log.warning("ignoring a damaged cache entry %s (%s): decoding again", folder, exc)
        return None


def write_arrays(root: Path, key: str, dataset: Dataset) -> None:
    """Store a decoded data set atomically (temp dir + rename); failures only cost speed."""
    parent = root / "arrays"
    final = parent / key
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    except OSError as exc:
        log.warning("cannot write the cache in %s (%s): the next load will decode again", parent, exc)
        return
    try:
        splits = {"train": dataset.train, "test": dataset.test}
        for split, data in splits.items():
            if data is None:
                continue
            images_name, labels_name = _split_names(split)
            np.save(tmp / images_name, np.ascontiguousarray(data.images), allow_pickle=False)
            np.save(tmp / labels_name, data.labels, allow_pickle=False)
        meta = {"version": CACHE_VERSION, "classes": dataset.classes,
                "has_test": dataset.test is not None, "skipped": dataset.skipped,
                "notes": dataset.notes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():  # a damaged entry (read_arrays refused it): move it aside first
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except OSError as exc:
        # Another process may have renamed its copy into place first; either way ours is spare.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():
            log.warning("cannot write the cache entry %s (%s): the next load will decode again",
                        final, exc)


def cached(root: Path, key: str, build: Callable[[], Dataset]) -> tuple[Dataset, bool]:
    """Return (data set, whether it came from the cache), building and storing it on a miss."""
    hit = read_arrays(root, key)
    if hit is not None:
        log.debug("cache hit: %s", root / "arrays" / key)
        return hit, True
    dataset = build()
    write_arrays(root, key, dataset)
    return dataset, False
