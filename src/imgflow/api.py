"""The Python API: every command as a function, for notebooks and scripts.

    import imgflow
    run = imgflow.train("my_photos", model="fast-small", epochs=3, out="runs/first")
    metrics = imgflow.evaluate(run)                       # the run's test split, once
    imgflow.predict(run, ["new_photo.jpg"])               # [{"image", "top": [{"class", "probability"}]}]

The functions call the same library functions as the command line and return what it prints
(a TrainResult, a metrics dict, predictions, a data set card, ...). Data is a data set name, a
path, an in-memory `imgflow.data.Dataset`, or `(images, labels)` uint8 arrays; in-memory data is
saved into the run directory first, so a run can be resumed and reproduced from its own files.

A `UserError` from the library names command-line flags ("pass --resume"); here it is re-raised
naming the Python arguments instead ("pass resume=True"), without the library's traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import sys
from inspect import signature
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from imgflow.data.dataset import Dataset
from imgflow.errors import UserError
from imgflow.progress import interactive

Data = Any  # a data set name, a path, a Dataset, or (images, labels[, test_images, test_labels])
Run = Any  # a TrainResult (anything with .run_dir) or a run directory
F = TypeVar("F", bound=Callable[..., Any])

# Stands in for the path of in-memory data until the run directory that will hold it is known.
_IN_MEMORY = "<in-memory arrays>"

# ----------------------------------------------------------------------------------------------
# errors: command-line flags -> Python arguments

_SWITCHES = {"resume", "overwrite", "tta", "json", "sync_bn"}  # flags without a value: `name=True`
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?: (?P<value>[^\s,;()'\"]+))?")
_COMMAND = re.compile(r"'imgflow (train|evaluate|predict|inspect|workflow|export|report|lr-find|serve)((?: [^']*)?)'")
_FUNCTION_OF = {"workflow": "run_workflow", "lr-find": "lr_find"}  # commands whose function is named otherwise
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
_SIZE = re.compile(r"(\d+)x(\d+)")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # NAME, K, RUN_DIR: stays as written


def python_names(message: str, given: Mapping[str, Any] | None = None) -> str:
    """`message` with command-line flags written as Python keyword arguments.

    '--resume' -> 'resume=True', '--lr 0.1' -> 'lr=0.1', '--val-split must' -> 'val_split must',
    "'imgflow train --resume --out runs/a'" -> 'imgflow.train(resume=True, out='runs/a')'.
    A word after a flag is taken as its value only when it looks like one (a number, a size,
    a NAME placeholder, a path) or is what the caller passed for that argument (`given`).
    """
    given = given or {}
    message = _COMMAND.sub(lambda m: _call(m[1], m[2].split(), given), message)
    return _FLAG.sub(lambda m: _argument(m[1], m["value"], given), message)


def _argument(flag: str, value: str | None, given: Mapping[str, Any]) -> str:
    name = flag.replace("-", "_")
    rest = f" {value}" if value else ""
    if name in _SWITCHES:
        return f"{name}=True{rest}"
    if value is None:
        return name
    core, tail = (value[:-1], ".") if value.endswith(".") and len(value) > 1 else (value, "")
    if _is_value(core, given.get(name)):
        return f"{name}={_literal(core, given.get(name))}{tail}"
    return f"{name}{rest}"


def _is_value(token: str, given: Any) -> bool:
    if given is not None and token in (str(given), str(Path(str(given)))):
        return True
    return bool(_NUMBER.fullmatch(token) or _SIZE.fullmatch(token) or _PLACEHOLDER.fullmatch(token)
                or any(c in token for c in "/+."))


def _literal(token: str, given: Any = None) -> str:
    """A flag's value as Python source: numbers and placeholders as they are, sizes as tuples,
    the rest as quoted strings."""
    if isinstance(given, (bool, int, float)) and token == str(given):
        return token
    if _NUMBER.fullmatch(token) or _PLACEHOLDER.fullmatch(token):
        return token
    size = _SIZE.fullmatch(token)
    return f"({size[1]}, {size[2]})" if size else repr(token)


def _call(command: str, tokens: list[str], given: Mapping[str, Any]) -> str:
    """A quoted `imgflow COMMAND ARGS` as the call of the function that does it."""
    args, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            if name in _SWITCHES or i + 1 == len(tokens):
                args.append(f"{name}=True" if name in _SWITCHES else name)
            else:
                i += 1
                args.append(f"{name}={_literal(tokens[i], given.get(name))}")
        else:
            args.append(token if token == "..." else _literal(token))
        i += 1
    return f"imgflow.{_FUNCTION_OF.get(command, command)}({', '.join(args) or '...'})"


def _python_errors(func: F) -> F:
    """Re-raise the library's UserError (same object and type) with Python argument names,
    and without the library's frames: the message says what to do, as on the command line."""
    parameters = signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _show_log_lines()
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            exc.args = (python_names(str(exc), _given(parameters, args, kwargs)), *exc.args[1:])
            raise exc.with_traceback(None) from None

    return wrapper  # type: ignore[return-value]


def _show_log_lines() -> None:
    """Show imgflow's INFO lines (one per epoch, the data loaded, where files went) on stderr, as
    the command line does, unless the program has set up logging itself. Piped into a file,
    these lines are the progress (the bars draw only in a terminal or a notebook)."""
    import logging

    logger = logging.getLogger("imgflow")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _given(parameters, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The plain values (str, number, path) a call passed, by argument name."""
    try:
        bound = parameters.bind(*args, **kwargs).arguments
    except TypeError:
        return {}
    values = {**bound, **bound.get("options", {})}
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, os.PathLike))}


# ----------------------------------------------------------------------------------------------
# data


def _in_memory(data: Data, classes: Sequence[str] | None) -> Dataset | None:
    """`data` as a Dataset when it is in memory; None when it names a source (classes= refused)."""
    from imgflow.data import dataset_from_arrays

    if isinstance(data, Dataset):
        if classes is not None:
            raise UserError("classes= is for (images, labels) arrays: a Dataset has its own classes")
        return data
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 4):
            raise UserError(f"in-memory data is (images, labels) or (images, labels, test_images, "
                            f"test_labels), got a {type(data).__name__} of {len(data)} items")
        return dataset_from_arrays(data[0], data[1], classes, *data[2:])
    if isinstance(data, np.ndarray):
        raise UserError("an array alone has no labels: pass (images, labels), with classes=[...]")
    if classes is not None:
        raise UserError(f"classes= is for (images, labels) arrays: the classes of {data} come from "
                        "the data set itself (for a folder, its sub-folder names)")
    return None


def _source(data: Data) -> str:
    """A data set name or path as the string the data layer takes."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    raise UserError(f"data is a {type(data).__name__}: give a data set name (cifar10, fashion-mnist), "
                    "a path to images (folder, .zip, .tar, .npz), a Dataset, or (images, labels)")


def _arrays_digest(dataset: Dataset) -> str:
    """Content hash of in-memory data: its file name, so the same arrays find the same file."""
    h = hashlib.sha256()
    splits = [dataset.train] + ([dataset.test] if dataset.test is not None else [])
    for split in splits:
        for array in (split.images, split.labels):
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).data)
    h.update("\0".join(dataset.classes).encode())
    return h.hexdigest()[:16]


def _save_in(folder: Path, dataset: Dataset) -> tuple[Path, bool]:
    """Write in-memory data to `folder/data-<hash>.npz` unless it is there; (path, written)."""
    from imgflow.data import save_arrays

    path = (folder / f"data-{_arrays_digest(dataset)}.npz").absolute()
    if path.is_file() or (folder.exists() and not folder.is_dir()):  # the latter: train's own error
        return path, False
    folder.mkdir(parents=True, exist_ok=True)
    test = dataset.test
    save_arrays(path, dataset.train.images, dataset.train.labels, dataset.classes,
                None if test is None else test.images, None if test is None else test.labels)
    return path, True


def _names_data(run_dir: Path, path: Path) -> bool:
    """True when the run in run_dir was started on the data file `path`."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return config["train"]["data"] == str(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _image_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """image_size=32 or (32, 48) as the (H, W) the library takes."""
    if size is None:
        return None
    sizes = [size, size] if isinstance(size, (int, np.integer)) else list(size)
    if len(sizes) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
        raise UserError(f"image_size must be SIZE or (H, W) with positive integers, got {size!r}")
    return int(sizes[0]), int(sizes[1])


# ----------------------------------------------------------------------------------------------
# train


def _options(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig overrides from keyword arguments: unknown names and wrong kinds refused."""
    from imgflow.training import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "preset")}
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]}=? " if close else ""
            raise UserError(f"imgflow.train() has no option {name}=: {hint}the options are "
                            f"{', '.join(sorted(fields))}, preset, resume, overwrite, classes, progress")
        if value is not None and name != "image_size":
            _check_kind(name, value, fields[name].default)
    overrides = {k: v for k, v in values.items() if v is not None}
    if "image_size" in overrides:
        overrides["image_size"] = _image_size(overrides["image_size"])
    return overrides


def _check_kind(name: str, value: Any, default: Any) -> None:
    """UserError unless `value` is of the kind of the option's default (threads: an integer)."""
    kind = str if default is dataclasses.MISSING else int if default is None else type(default)
    if kind is float:
        ok, what = isinstance(value, (int, float, np.integer, np.floating)), "a number"
    elif kind is int:
        ok, what = isinstance(value, (int, np.integer)), "an integer"
    elif kind is bool:
        ok, what = isinstance(value, bool), "True or False"
    else:
        ok, what = isinstance(value, kind), "a string"
    if not ok or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"{name}= must be {what}, got {value!r}")


def _train_config(spec: str | None, overrides: dict[str, Any], preset: str | None, out: Path | None,
                  resume: bool):
    """The config to train: resume=True without a preset continues the run in `out` with the
    options it was started with (given ones are checked against them), as `imgflow train --resume`."""
    from imgflow.training.config import config_to_train
    from imgflow.training.rundir import started_config

    started = started_config(out) if resume and preset is None and out is not None else None
    if spec is None and started is None:
        raise UserError("no data given: name a data set (cifar10, fashion-mnist), a path to images, or "
                        "pass (images, labels); or continue a run with resume=True, out=RUN_DIR")
    return config_to_train(spec, overrides, preset, started)


@_python_errors
def train(data: Data = None, model: str | None = None, epochs: int | None = None,
          out: str | os.PathLike | None = None, *, preset: str | None = None, resume: bool = False,
          overwrite: bool = False, classes: Sequence[str] | None = None, progress: bool | None = None,
          **options: Any):
    """Train a model into a run directory; return its TrainResult (.run_dir, .history).

    data: a data set name, a path, a Dataset, or (images, labels) uint8 arrays (N, H, W, C) with
        integer labels and classes=[...] (saved as `<out>/data-<hash>.npz`, which the run reads).
    out: the run directory (default runs/<model>-seed<seed>).
    options: any `imgflow train` option by its Python name (lr=, batch_size=, val_split=, ...).
    progress: progress bars (None: in a terminal or a notebook).
    """
    from imgflow.training.rundir import default_run_dir

    find_lr = options.get("lr") == "find"  # the range test first, then train at its suggestion
    if find_lr:
        options = {**options, "lr": None}
    overrides = _options({"model": model, "epochs": epochs, **options})
    arrays = _in_memory(data, classes) if data is not None else None
    spec = _IN_MEMORY if arrays is not None else None if data is None else _source(data)
    config = _train_config(spec, overrides, preset, Path(out) if out is not None else None, resume)
    run_dir = Path(out) if out is not None else default_run_dir(config)
    if arrays is None:
        return _run_training(config, run_dir, resume, overwrite, progress, find_lr)
    path, written = _save_in(run_dir, arrays)
    try:
        config = dataclasses.replace(config, data=str(path))
        return _run_training(config, run_dir, resume, overwrite, progress, find_lr)
    except BaseException:
        if written and not _names_data(run_dir, path):  # refused or failed: leave nothing behind
            path.unlink(missing_ok=True)
        raise


def _run_training(config, run_dir: Path, resume: bool, overwrite: bool, progress: bool | None,
                  find_lr: bool = False):
    from imgflow.training import train as train_run
    from imgflow.training.lr_find import train_at_found_lr

    if find_lr:
        return train_at_found_lr(config, run_dir, resume=resume, overwrite=overwrite, progress=progress)[0]
    return train_run(config, run_dir, resume=resume, overwrite=overwrite, progress=progress)


# ----------------------------------------------------------------------------------------------
# evaluate, predict


def _run_dir(run: Run) -> Path:
    """The run directory of a TrainResult (or anything with .run_dir) or a path."""
    run_dir = getattr(run, "run_dir", run)
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UserError(f"run is a {type(run).__name__}: give what imgflow.train returned, "
                        "or a run directory")
    return Path(run_dir)


@_python_errors
def evaluate(run: Run, data: Data = None, tta: bool = False, *, classes: Sequence[str] | None = None,
             progress: bool | None = None, device: str = "auto") -> dict:
    """Test metrics of a run's model: {"accuracy", "loss", "per_class", "confusion_matrix", ...}.

    Without data: the run's own test split, saved as the run's metrics.json (`imgflow evaluate`).
    With data (a name, path, Dataset, or (images, labels) whose labels index the run's classes
    unless classes= says otherwise): that data set's test split, or all its images when it has
    none; its classes must be the run's. Nothing is written then: metrics.json stays the run's.
    tta: average over flipped and shifted views (test-time augmentation; photo runs: flipped and
        cropped views).
    device: "auto" (a GPU if there is one), "cpu", "cuda", "cuda:N" or "mps".
    """
    run_dir = _run_dir(run)
    if data is None:
        from imgflow.evaluation import evaluate_run

        if classes is not None:
            raise UserError("classes= goes with data=: the run's own test split has the run's classes")
        return evaluate_run(run_dir, tta=tta, progress=progress, device=device)
    from imgflow.prediction import RunModel

    model = RunModel(run_dir, tta=tta, device=device)
    dataset = _evaluation_data(data, classes, model.spec, progress)
    return _metrics_on(model, dataset, run_dir)


def _evaluation_data(data: Data, classes: Sequence[str] | None, spec, progress: bool | None) -> Dataset:
    """The data set to evaluate on, loaded as the run's images were (same --image-size decoding)."""
    if isinstance(data, (tuple, list)) and classes is None:
        classes = list(spec.classes)  # labels index the run's classes
    dataset = _in_memory(data, classes)
    if dataset is None:
        from imgflow.data import load_dataset

        show = interactive() if progress is None else progress
        dataset = load_dataset(_source(data), image_size=spec.file_size if spec.jpeg_draft else None,
                               progress=show)
    return dataset


def _metrics_on(model, dataset: Dataset, run_dir: Path) -> dict:
    """classification_metrics of `model` on the test split of `dataset` (else all its images)."""
    from imgflow.evaluation import classification_metrics

    classes = list(model.spec.classes)
    if set(dataset.classes) != set(classes):
        extra = [c for c in dataset.classes if c not in classes]
        missing = [c for c in classes if c not in dataset.classes]
        detail = "; ".join(f"{what}: {', '.join(names)}" for what, names in
                           (("not in the run", extra), ("missing", missing)) if names)
        raise UserError(f"the classes of {dataset.name} differ from those {run_dir} was trained on "
                        f"({detail}): evaluate on data with the same classes")
    split = dataset.test if dataset.test is not None else dataset.train
    labels = np.asarray([classes.index(c) for c in dataset.classes])[split.labels]  # the run's order
    probs = model.probabilities(_fit(split.images, model.spec))
    metrics = classification_metrics(labels, probs, classes)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
    metrics.update(loss=float(-np.log(picked).mean()), tta=model.tta, data=dataset.name,
                   split="test" if dataset.test is not None else "all")
    return metrics


def _fit(images: np.ndarray, spec) -> np.ndarray:
    """uint8 images (N, H, W, C) at the model's size and channel count, as predict fits a file."""
    from imgflow.data.decode import resize_images

    if images.dtype != np.uint8:
        raise UserError(f"images have dtype {images.dtype}, expected uint8 pixels 0..255")
    if tuple(images.shape[1:3]) != spec.file_size:
        images = resize_images(images, spec.file_size)
    C = images.shape[-1]
    if C == 1 and spec.channels == 3:
        return np.repeat(images, 3, axis=3)
    if C == 3 and spec.channels == 1:  # Pillow's ITU-R 601-2 luma, as predict converts files
        from PIL import Image

        return np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in images])[..., None]
    return images


@_python_errors
def predict(run: Run, images: Any, top_k: int = 5, *, tta: bool = False,
            progress: bool | None = None, device: str = "auto") -> list[dict]:
    """Top-k classes per image: [{"image", "top": [{"class", "probability"}, ...]}, ...].

    run: a run (TrainResult or directory) or an exported model.onnx (onnxruntime, no torch).
    images: a path or a list of paths (files or folders: as `imgflow predict`), or uint8 arrays:
        one image (H, W, C) or (H, W), a batch (N, H, W, C), or a list of images; "image" is
        then the index in the input.
    """
    from imgflow.prediction import predict_files

    run_dir = _run_dir(run)
    onnx = run_dir if run_dir.suffix.lower() == ".onnx" else None
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    arrays = _image_arrays(images)
    if arrays is None:
        return predict_files(None if onnx else run_dir, list(images), top_k=top_k, tta=tta, onnx=onnx,
                             progress=progress, device=device)
    return _predict_arrays(onnx, run_dir, arrays, top_k, tta, device)


def _image_arrays(images: Any) -> list[np.ndarray] | None:
    """Images given as arrays, one (H, W, C) array each; None when they are paths."""
    if isinstance(images, np.ndarray):
        batch = images[None] if images.ndim in (2, 3) else images  # one image -> a batch of one
        if batch.ndim == 3:  # one grey (H, W) image
            batch = batch[..., None]
        if batch.ndim != 4:
            raise UserError(f"images have shape {images.shape}: give (H, W, C), (H, W) or (N, H, W, C)")
        return list(batch)
    if not isinstance(images, (list, tuple)) or not images:
        raise UserError(f"images is a {type(images).__name__}: give paths or uint8 image arrays")
    if all(isinstance(x, np.ndarray) for x in images):
        return [x[..., None] if x.ndim == 2 else x for x in images]
    if not all(isinstance(x, (str, os.PathLike)) for x in images):
        raise UserError("images mixes paths and other things: give a list of paths or of uint8 arrays")
    return None


def _predict_arrays(onnx: Path | None, run_dir: Path, arrays: list[np.ndarray], top_k: int,
                    tta: bool, device: str = "auto") -> list[dict]:
    """predict() on arrays: fitted to the model as files are, then the same top-k rows."""
    from imgflow.prediction import OnnxModel, RunModel

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if onnx is not None and tta:
        raise UserError("--tta needs a run directory; it is not available with an ONNX model")
    model = OnnxModel(onnx) if onnx is not None else RunModel(run_dir, tta=tta, device=device)
    if any(a.ndim != 3 for a in arrays):
        raise UserError("each image must be (H, W, C) or (H, W)")
    batch = np.concatenate([_fit(a[None], model.spec) for a in arrays])
    probs = model.probabilities(batch)
    k = min(top_k, len(model.spec.classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [{"image": i, "top": [{"class": model.spec.classes[j], "probability": float(p[j])} for j in idx]}
            for i, (p, idx) in enumerate(zip(probs, order))]


# ----------------------------------------------------------------------------------------------
# inspect, run_workflow, export, report


@_python_errors
def inspect(data: Data, out: str | os.PathLike | None = None, *,
            image_size: int | Sequence[int] | None = None, classes: Sequence[str] | None = None) -> dict:
    """The data set card (classes, split sizes, per-class counts, channel stats) and examples.png.

    out: folder for examples.png (default runs/inspect/<data set name>/); the card's "examples"
    holds its path.
    """
    from imgflow.data.card import default_inspect_dir, make_card
    from imgflow.data.card import inspect as inspect_data

    size = _image_size(image_size)
    dataset = _in_memory(data, classes)
    if dataset is None:
        return inspect_data(_source(data), out_dir=out, image_size=size)
    from imgflow.data.examples import save_example_grid

    if size is not None:
        from imgflow.data.decode import resize_images

        resize = lambda split: None if split is None else dataclasses.replace(  # noqa: E731
            split, images=resize_images(split.images, size))
        dataset = dataclasses.replace(dataset, train=resize(dataset.train), test=resize(dataset.test))
    card = make_card(dataset)
    folder = Path(out) if out is not None else default_inspect_dir(dataset.name)
    card["examples"] = str(save_example_grid(dataset, folder / "examples.png"))
    return card


@_python_errors
def run_workflow(data: Data, out: str | os.PathLike = "runs/workflow", *, budget_minutes: float = 15.0,
             seed: int = 0, threads: int | None = None, image_size: int | Sequence[int] | None = None,
             classes: Sequence[str] | None = None, progress: bool | None = None, device: str = "auto",
             backbone: str | None = None) -> dict:
    """Run (or continue) the eight workflow steps within a time budget; return workflow.json's
    content (steps, decisions, final run, test accuracy). In-memory data is saved into `out`.

    backbone: "hf:<directory or cached hub id>", a pretrained backbone tried frozen and fine-tuned."""
    from imgflow.workflow import run_workflow as run_steps

    dataset = _in_memory(data, classes)
    spec = _source(data) if dataset is None else str(_save_in(Path(out), dataset)[0])
    return run_steps(spec, Path(out), budget_minutes=budget_minutes, seed=seed, progress=progress,
                        threads=threads, image_size=_image_size(image_size), device=device, backbone=backbone)


@_python_errors
def export(run: Run, out: str | os.PathLike | None = None, format: str = "all", *,
           progress: bool | None = None, device: str = "auto") -> dict:
    """Export a finished run to ONNX and/or TorchScript ("onnx", "torchscript", "all"), check that
    the exports agree with the PyTorch model, and return the parity report (parity.json).

    out: default <run>/export. Raises imgflow.exporting.ParityError when an export disagrees.
    """
    from imgflow.exporting import FORMATS, export_run

    if format != "all" and format not in FORMATS:
        raise UserError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}, all")
    formats = FORMATS if format == "all" else (format,)
    return export_run(_run_dir(run), Path(out) if out is not None else None, formats,
                      progress=interactive() if progress is None else progress, device=device)


@_python_errors
def report(runs: Run | Sequence[Run], out: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of one run (default into the run directory), or of several runs side
    by side (default runs/compare/); return the HTML file's path."""
    from imgflow.reports import compare_runs, report_run

    many = isinstance(runs, (list, tuple))
    run_dirs = [_run_dir(r) for r in runs] if many else [_run_dir(runs)]
    if len(run_dirs) == 1:
        return report_run(run_dirs[0], Path(out) if out is not None else None)
    return compare_runs(run_dirs, Path(out) if out is not None else Path("runs/compare"))


@_python_errors
def lr_find(data: Data, model: str | None = None, out: str | os.PathLike | None = None, *,
            preset: str | None = None, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0,
            classes: Sequence[str] | None = None, progress: bool | None = None, **options: Any):
    """The learning-rate range test of `imgflow lr-find`: train a throwaway copy of the model with a
    growing lr, write lr_find.png and lr_find.csv into `out` (default runs/lr-find/<model>), and
    return the result (.suggestion, .rule, .valley, .lrs, .losses, .smoothed). No run is touched."""
    from imgflow.reports.lr_find import range_test_figure
    from imgflow.training.config import resolve_config
    from imgflow.training.lr_find import RangeTest, save_curve
    from imgflow.training.lr_find import lr_find as range_test

    overrides = _options({"model": model, **options})
    dataset = _in_memory(data, classes)
    out_dir = Path(out) if out is not None else None
    if dataset is not None:  # the arrays go beside the curve, so the test can be run again
        out_dir = out_dir or Path("runs/lr-find/arrays")
        spec = str(_save_in(out_dir, dataset)[0])
    else:
        spec = _source(data)
    config = resolve_config(spec, overrides, preset)
    found = range_test(config, RangeTest(steps, start_lr, end_lr).validate(), progress)
    out_dir = out_dir or Path(f"runs/lr-find/{config.model}")
    save_curve(found, out_dir)
    range_test_figure(found, out_dir / "lr_find.png", f"lr-find: {config.model}, seed {config.seed}")
    return found


@_python_errors
def serve(run: Run, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve a run (or an exported .onnx file) over HTTP with its upload page, as `imgflow serve`,
    until interrupted (blocks). settings: top_k, max_upload_mb, max_files, max_batch, batch_wait_ms."""
    from imgflow.serving import serve as run_server

    run_server(_run_dir(run), host, port, **settings)
