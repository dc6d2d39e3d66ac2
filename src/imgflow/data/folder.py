"""Labelled image folders: a directory, .zip, .tar or .tar.gz of class folders.

Layouts (after a chain of wrapping directories, if any: `cifar10/train/...`, or
`export/dataset/train/...`, where each holds nothing but the next, bar files that are not images):
- `train/<class>/...` with optional `test/<class>/...`;
- `<class>/...` at the top level: no test split.
Files may sit at any depth inside a class folder, but class folders that hold no image directly,
only sub-folders of names found once (`animals/cat`, `plants/rose`), are refused: those may be
the classes, and guessing wrong would train on the wrong labels. Class names are sorted, so label
i is the i-th name in sorted order (for CIFAR-10 folders that is the official label order) and
test classes map to the same indices as train's; a test class with no training images is an error.
A class folder without usable images is left out and reported. Files that cannot be used are
skipped and listed as {"path", "reason"} with `path` relative to the source, never a crash.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgflow.data.arrays import train_images_shape
from imgflow.data.dataset import Dataset, Split
from imgflow.data.decode import check_fits_in_memory, decode_image, resize_array
from imgflow.data.readers import Listing, open_reader, printable
from imgflow.errors import UserError
from imgflow.progress import interactive, progress_bar
from imgflow.text import plural

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DECODE_WORKERS = 16  # decoding threads at most: beyond this the reader, on one thread, is the limit


@dataclass
class _Plan:
    """Which files belong to which split and class folder."""

    wrapper: str  # stripped chain of wrapping directories + "/", or ""
    split_layout: bool  # train/<class>/ (and test/<class>/) rather than <class>/ at the top
    has_test: bool
    # (split, class folder) -> file indices into the listing
    folders: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # top-level entries outside train/ and test/
    outside: list[str] = field(default_factory=list)  # entries beside the wrapping directories


@functools.cache
def _image_suffixes() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())  # '.jpg', '.png', ...


def _looks_like_image(name: str) -> bool:
    """Whether a file name has an image suffix Pillow knows. Only the layout is decided by names
    (a README or a meta/ folder of text files must not decide it); decoding goes by content."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _image_suffixes()


def _wrapping_dirs(paths: list[list[str]], images: list[bool]) -> list[str]:
    """The chain of single wrapping directories to peel off (`export/dataset/` of a zip holding
    `export/dataset/train/cat/1.jpg`): while every image sits inside one directory, not directly
    in it and not in train/ or test/, that directory only wraps the data. Files that look like
    images (`images`, per path) decide it when there are any; others (README.txt, meta/) are
    left outside."""
    basis = [p for p, image in zip(paths, images) if image] or paths
    chain: list[str] = []
    while basis and all(len(p) >= 3 for p in basis):  # each file at least wrapper/folder/file
        tops = {p[0] for p in basis}
        if len(tops) != 1 or next(iter(tops)) in SPLITS:
            break
        chain.append(next(iter(tops)))
        basis = [p[1:] for p in basis]
    return chain


def _beside(parts: list[str], chain: list[str]) -> str | None:
    """The entry beside the wrapping chain that `parts` lies in ('food/meta'); None if inside it
    (or one of the wrapping directories itself)."""
    for k, name in enumerate(chain):
        if k >= len(parts):
            return None
        if parts[k] != name:
            return "/".join(parts[:k + 1])
    return None


def _plan(listing: Listing, source: str) -> _Plan:
    all_paths = [rel.split("/") for rel, _ in listing.files]
    images = [_looks_like_image(p[-1]) for p in all_paths]
    all_dirs = [d.split("/") for d in sorted(listing.dirs)]
    chain = _wrapping_dirs(all_paths, images)
    wrapper = "".join(name + "/" for name in chain)
    cut = len(chain)
    paths = [p[cut:] if p[:cut] == chain else None for p in all_paths]
    dirs = [d[cut:] for d in all_dirs if d[:cut] == chain and len(d) > cut]
    outside = sorted({entry for parts in all_dirs + [p for p, q in zip(all_paths, paths) if q is None]
                      if (entry := _beside(parts, chain)) is not None})
    tops = {p[0] for p in paths if p is not None} | {d[0] for d in dirs}

    has_split_layout = "train" in tops
    if not has_split_layout and "test" in tops:
        raise UserError(f"{source} has a test/ folder but no train/ folder: expected "
                        "train/<class>/* (and optionally test/<class>/*)")
    plan = _Plan(wrapper=wrapper, split_layout=has_split_layout,
                 has_test=has_split_layout and "test" in tops, outside=outside)
    depth = 1 if has_split_layout else 0  # index of the class folder in a path
    for d in dirs:  # register class folders even when empty, to report them
        if len(d) > depth and (depth == 0 or d[0] in SPLITS):
            split = d[0] if depth else "train"
            plan.folders.setdefault((split, d[depth]), [])
    for index, p in enumerate(paths):
        if p is None:
            continue
        rel = wrapper + "/".join(p)
        if depth and p[0] not in SPLITS:
            if p[0] not in plan.ignored:
                plan.ignored.append(p[0])
        elif len(p) <= depth + 1:
            plan.skipped.append({"path": rel, "reason": "not inside a class folder"})
        else:
            split = p[0] if depth else "train"
            plan.folders.setdefault((split, p[depth]), []).append(index)
    if depth:
        plan.ignored += sorted({d[0] for d in dirs if d[0] not in SPLITS} - set(plan.ignored))
    _check_class_level(plan, paths, images, depth, source)
    return plan


def _check_class_level(plan: _Plan, paths: list[list[str] | None], images: list[bool], depth: int,
                       source: str) -> None:
    """Refuse class folders that look one level too high: none holds an image directly, only
    sub-folders, and those sub-folders have names of their own (`animals/cat`, `animals/dog`,
    `plants/rose`): they may be the classes. Read as one class each, such data would train on
    the wrong labels without a word. Sub-folder names repeated across class folders
    (`cat/2019`, `dog/2019`) cannot be classes, so those class folders stand, files nested."""
    train = [paths[i] for (split, _), ks in plan.folders.items() if split == "train" for i in ks
             if images[i]]
    if not train or any(len(p) == depth + 2 for p in train):  # no image names, or images directly
        return
    pairs = sorted({(p[depth], p[depth + 1]) for p in train})
    if len({sub for _, sub in pairs}) < len(pairs):
        return
    raise UserError(_nested_message(plan, pairs, source))


def _nested_message(plan: _Plan, pairs: list[tuple[str, str]], source: str) -> str:
    """One line naming where the class folders seem to be, and what to give instead."""
    prefix = plan.wrapper + ("train/" if plan.split_layout else "")
    shown = ", ".join(f"{prefix}{c}/{sub}" for c, sub in pairs[:4]) + (", ..." if len(pairs) > 4 else "")
    parents = sorted({c for c, _ in pairs})
    if len(parents) > 1:
        return (f"{source}: cannot tell which folders are the classes: "
                f"{', '.join(prefix + c for c in parents)} hold no images directly, only sub-folders "
                f"({shown}). If the sub-folders are the classes, put them side by side in one folder "
                "and give that; if not, put each class's images directly in its folder")
    level = prefix + parents[0] + "/"
    if plan.split_layout:
        fix = f"move them up into {plan.wrapper}train/ (and test/)"
    elif Path(source).is_dir():
        fix = f"give {Path(source) / level} as DATA"
    else:
        fix = (f"extract the archive and give its folder {level} as DATA, or pack the class folders "
               "at the archive's top")
    return f"{source}: the class folders seem to be one level down, in {level} ({shown}): {fix}"


def skip_reason(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return f"truncated image: {exc}"
    return f"cannot decode: {type(exc).__name__}: {exc}"


def decode_workers() -> int:
    """Threads that decode a folder: one per CPU this process may use (Pillow's decoders and
    resizing release the GIL), at most DECODE_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, DECODE_WORKERS))


def _decode_all(reader, listing: Listing, indices: list[int], image_size, progress: bool,
                desc: str) -> tuple[list[np.ndarray | None], list[dict]]:
    """Decode the listed files at `indices` on `decode_workers()` threads; the reader hands out
    the bytes in its own order on this thread (archives are not thread-safe), at most a few per
    thread ahead of the decoders. Failed files are None and listed as skipped, in read order."""
    arrays: list[np.ndarray | None] = [None] * len(indices)
    skipped = []
    handles = [listing.files[i][1] for i in indices]

    def decode(data: bytes | Exception) -> np.ndarray:
        if isinstance(data, Exception):
            raise data
        return decode_image(data, image_size)

    def collect(k: int, done: Future) -> None:
        try:
            arrays[k] = done.result()
        # Pillow's many format plugins raise many exception types on hostile or broken
        # files (OSError, SyntaxError, ValueError, struct.error, ...): any one of them means
        # this file is unusable, never that the whole load should stop.
        except Exception as exc:  # noqa: BLE001
            rel = listing.files[indices[k]][0]
            skipped.append({"path": rel, "reason": skip_reason(exc)})
            log.debug("skipped %s: %s", rel, exc)
        bar.update(1)

    workers = decode_workers()
    with warnings.catch_warnings(), progress_bar(
            enabled=progress and interactive(), total=len(indices), desc=desc, unit="img", leave=False) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those files too
        # (the filter is process-wide, so the decoding threads see it).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pending: deque[tuple[int, Future]] = deque()
        for k, data in reader.read(handles):
            pending.append((k, pool.submit(decode, data)))
            if len(pending) >= 4 * workers:  # bounded: the bytes of a few files per thread
                collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
    return arrays, skipped


def _stack(arrays: list[np.ndarray | None], members: list[tuple[int, int]],
           size: tuple[int, int], channels: int) -> Split:
    """One split from decoded arrays: `members` are (label, index into arrays) pairs."""
    H, W = size
    images = np.empty((len(members), H, W, channels), dtype=np.uint8)
    labels = np.fromiter((label for label, _ in members), dtype=np.int64, count=len(members))
    for row, (_, k) in enumerate(members):
        a = arrays[k]
        if a.shape[:2] != size:
            a = resize_array(a, size)
        images[row] = a[..., None] if a.ndim == 2 else a  # gray broadcasts to 3 channels
        arrays[k] = None  # free as we go: peak memory stays near one copy
    return Split(images, labels)


def read_image_folder(path: Path, image_size: tuple[int, int] | None = None,
                      progress: bool = True) -> Dataset:
    """Decode a folder or archive of labelled images into uint8 arrays (see the module doc)."""
    source = str(path)
    with open_reader(path) as reader:
        listing = reader.list()
        listing.files.sort(key=lambda f: f[0])  # the same order from a directory or an archive
        plan = _plan(listing, source)
        keys = sorted(plan.folders)  # (split, class) in sorted order: a deterministic layout
        indices = [i for key in keys for i in plan.folders[key]]
        if image_size is not None:
            check_fits_in_memory(len(indices), image_size, 3, source)  # 3: the most a folder decodes to
        arrays, decode_skipped = _decode_all(reader, listing, indices, image_size, progress,
                                             desc=f"decoding {Path(path).name}")

    skipped = listing.refused + plan.skipped + decode_skipped
    # Usable images per (split, class folder), as positions in `arrays`.
    position = {i: k for k, i in enumerate(indices)}
    usable = {key: [position[i] for i in plan.folders[key] if arrays[position[i]] is not None]
              for key in keys}
    notes = _layout_notes(plan, usable)
    classes = _classes(usable, skipped, source)
    found = [a for a in arrays if a is not None]
    channels = 1 if all(a.ndim == 2 for a in found) else 3
    size = tuple(image_size) if image_size is not None else _most_common_size(found, notes)
    has_test = plan.has_test and any(ks for (s, _), ks in usable.items() if s == "test")
    if plan.has_test and not has_test:
        notes.append("the test folder holds no usable images: no test split")
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS if has_test else ("train",):
        members = [(label_of[c], k) for (s, c), ks in usable.items() if s == split and c in label_of
                   for k in ks]
        splits[split] = _stack(arrays, members, size, channels)
    return Dataset(name=dataset_name(path), source=source, sha256="", classes=classes,
                   train=splits["train"], test=splits.get("test"), skipped=skipped, notes=notes)


def _layout_notes(plan: _Plan, usable: dict[tuple[str, str], list[int]]) -> list[str]:
    """What the data card says about entries left out: beside the data, or class folders without
    usable images."""
    notes = []
    if plan.outside:
        notes.append(f"ignored entries outside {plan.wrapper}: {', '.join(plan.outside)}")
    if plan.ignored:
        notes.append(f"ignored top-level entries outside train/ and test/: {', '.join(plan.ignored)}")
    for (split, c), ks in usable.items():
        if ks:
            continue
        total = len(plan.folders[(split, c)])
        folder = plan.wrapper + (f"{split}/" if plan.split_layout else "") + c
        what = "is empty" if total == 0 else f"has no usable images ({total} skipped)"
        consequence = ": class left out" if split == "train" else ""
        notes.append(f"class folder {folder} {what}{consequence}")
    return notes


def _classes(usable: dict[tuple[str, str], list[int]], skipped: list[dict], source: str) -> list[str]:
    """The training class folders with usable images, sorted; a UserError when there are none,
    or when a test class has no training images (it would have no label)."""
    classes = sorted(c for (split, c), ks in usable.items() if split == "train" and ks)
    stray = sorted(c for (split, c), ks in usable.items() if split == "test" and ks and c not in classes)
    if stray:
        raise UserError(f"{source}: {plural(len(stray), 'test class', 'test classes')} without training "
                        f"images ({', '.join(stray)}): add their images under train/<class>/ or "
                        "remove them from test/")
    if not classes:
        detail = ""
        if skipped:
            first = skipped[0]
            detail = f" ({plural(len(skipped), 'file')} skipped, e.g. {first['path']}: {first['reason']})"
        raise UserError(f"no images found in {source}{detail}: expected image files in "
                        "train/<class>/ (optionally test/<class>/) or <class>/ folders")
    return classes


def _most_common_size(found: list[np.ndarray], notes: list[str]) -> tuple[int, int]:
    """The (H, W) most images have, noting how many others are resized to it."""
    size = Counter(a.shape[:2] for a in found).most_common(1)[0][0]
    resized = sum(a.shape[:2] != size for a in found)
    if resized:
        notes.append(f"resized {resized} of {plural(len(found), 'image')} to {size[0]}x{size[1]}, "
                     "the most common size (choose another with --image-size)")
    return size


@dataclass
class SizeSample:
    """What the headers of a few training images say about a folder's image sizes."""

    train_files: int  # files in the training split's class folders (unread: some may be broken)
    sizes: list[tuple[int, int]]  # (H, W) of the sampled images that opened, EXIF rotation applied


# EXIF orientations 5-8 turn the stored image a quarter turn: height and width swap on decoding.
_QUARTER_TURNS = {5, 6, 7, 8}


def sample_image_sizes(path: Path, limit: int = 100) -> SizeSample:
    """Sizes of up to `limit` training images spread evenly over the sorted listing, read from
    their headers only (no pixel decoding), so a choice of size can precede decoding the lot.
    A .npz of arrays has one size: its train_images' header says it."""
    if Path(path).suffix.lower() == ".npz" and Path(path).is_file():
        N, H, W = train_images_shape(Path(path))[:3]
        return SizeSample(train_files=N, sizes=[(H, W)] * min(limit, N))
    with open_reader(path) as reader:
        listing = reader.list()
        listing.files.sort(key=lambda f: f[0])
        plan = _plan(listing, str(path))
        train = sorted(i for (split, _), ks in plan.folders.items() if split == "train" for i in ks)
        step = max(len(train) / limit, 1.0)
        chosen = sorted({train[int(k * step)] for k in range(min(limit, len(train)))})
        sizes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb or a broken file only drops out of the sample
            for _, data in reader.read([listing.files[i][1] for i in chosen]):
                if isinstance(data, Exception):
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        W, H = im.size
                        # As decode_image: only an EXIF block turns an image (and without one,
                        # getexif() would decode a PNG's pixels).
                        turned = "exif" in im.info and im.getexif().get(0x0112) in _QUARTER_TURNS
                    sizes.append((W, H) if turned else (H, W))
                except Exception:  # noqa: BLE001 - Pillow raises many types; decoding lists the file
                    continue
    return SizeSample(train_files=len(train), sizes=sizes)


def dataset_name(path: Path) -> str:
    """A folder's or file's name without archive suffixes: 'cifar10-jpeg.zip' -> 'cifar10-jpeg'."""
    path = Path(path)
    name = printable(path.resolve().name if path.name in ("", ".", "..") else path.name)
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar", ".npz"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
