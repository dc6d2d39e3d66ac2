"""`imgflow predict`: classify image files with a run's model or with an exported ONNX model.

Every file goes through the data layer's decoder (`imgflow.data.decode`): mode conversion, alpha
on white, EXIF orientation, and a stretch to the training size with the same resampling, so a
photo becomes model input exactly as the training images did. Two models share everything but
the forward pass:
- `RunModel`: a run directory, through `inference.predict_logits` (the path `evaluate` takes), so
  predictions on the test images equal evaluate's;
- `OnnxModel`: an exported `model.onnx` and the `model.json` beside it, with onnxruntime, NumPy and
  Pillow only. torch is never imported on that path (it is imported inside `RunModel`).
A file that cannot be read gets an "error" instead of predictions; it never stops the batch.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from imgflow.data.decode import center_crop, decode_image, resize_array
# The data layer's wording for undecodable files, so predict and `inspect` report them alike.
from imgflow.data.folder import skip_reason as unreadable_reason
from imgflow.data.readers import DirReader
from imgflow.errors import UserError
from imgflow.progress import interactive, progress_bar
from imgflow.text import plural

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
ONNX_BATCH_SIZE = 256  # images per onnxruntime call: memory stays small, the call overhead vanishes
PROGRESS_MIN_FILES = 100  # below this a progress bar would only flicker
# Extensions Pillow can open. Files found in a directory are filtered by them (so a README or a
# labels.csv beside the images is not reported as a broken image); files named on the command
# line are always tried.
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN)


@dataclass(frozen=True)
class InputSpec:
    """What turning a file into model input needs: the classes and the run's preprocessing."""

    classes: tuple[str, ...]  # label i is classes[i]
    image_size: tuple[int, int]  # (H, W) the model was trained on
    channels: int  # 1 (L) or 3 (RGB)
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]  # per channel, in [0, 1] pixel units
    # True when training resized while decoding (train --image-size): JPEGs are then decoded at
    # reduced scale before the resize, exactly as the data layer decoded the training images.
    jpeg_draft: bool = False
    # A photo run's: files are stretched to this size and the model sees their centre image_size
    # crop (`preprocess.Preprocessing.resize_size`); None: stretched to image_size, no crop.
    resize_size: tuple[int, int] | None = None

    @classmethod
    def make(cls, classes, image_size, channels, mean, std, jpeg_draft=False,
             resize_size=None) -> "InputSpec":
        """Normalise types from JSON / config values."""
        size = (int(image_size[0]), int(image_size[1]))
        resize = (int(resize_size[0]), int(resize_size[1])) if resize_size else None
        return cls(tuple(str(c) for c in classes), size,
                   int(channels), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                   bool(jpeg_draft), resize if resize != size else None)

    @property
    def file_size(self) -> tuple[int, int]:
        """(H, W) every file is stretched to, as the run's images were decoded."""
        return self.resize_size or self.image_size


class Model(Protocol):
    spec: InputSpec
    batch_size: int  # files decoded and sent through the model at once

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 class probabilities (N, K)."""


# ----------------------------------------------------------------------------------------------
# files


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named, plus the image files found (recursively, in sorted order) in directories named.

    Hidden files and folders are skipped as the data layer skips them; a named path that does
    not exist is kept, so that it is reported like any other unreadable file.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += [p for _, p in DirReader(path).list().files
                      if p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            files.append(path)
    return files


class NotARegularFile(OSError):
    """A pipe, socket or device named as an image: reading it could block or never end."""


def read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One file -> uint8 (H, W, C) at the run's decoding size (`InputSpec.file_size`) and channel
    count (raises if unreadable)."""
    size = spec.file_size
    path = Path(path)
    if path.exists() and not path.is_file():
        raise NotARegularFile(f"{path} is not a regular file")
    array = decode_image(path.read_bytes(), size if spec.jpeg_draft else None)
    if array.shape[:2] != size:  # as the folder loader resizes to the data set's common size
        array = resize_array(array, size)
    if spec.channels == 3:
        return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    if array.ndim == 3:  # a colour file for a grayscale model: Pillow's ITU-R 601-2 luma
        array = np.asarray(Image.fromarray(array).convert("L"))
    return array[..., None]


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, NotARegularFile):
        return "not a regular file (a pipe, socket or device)"
    if isinstance(exc, (IsADirectoryError, PermissionError)):
        return f"cannot read: {exc.strerror}"
    return unreadable_reason(exc)


# ----------------------------------------------------------------------------------------------
# models


class RunModel:
    """A trained run directory's model (PyTorch), run as `evaluate` runs it."""

    def __init__(self, run_dir: Path, tta: bool = False, device: str = "auto"):
        from imgflow.inference import model_device
        from imgflow.precision import resolve_precision, set_threads
        from imgflow.preprocess import Preprocessing
        from imgflow.runs import load_trained_model

        model, config = load_trained_model(Path(run_dir), device)
        train = config["train"]
        self.prep = Preprocessing.from_dict(config["preprocessing"])
        self.device = model_device(model)
        # The same precision and threads as evaluate_run, so that the results are equal.
        self.precision = resolve_precision(train.get("precision", "fp32"), self.device)
        set_threads(train.get("threads"))
        self.model = model
        self.tta = tta
        self.batch_size = int(train.get("eval_batch_size", 500))
        self.spec = InputSpec.make(config["data"]["classes"], self.prep.image_size,
                                   self.prep.channels, self.prep.mean, self.prep.std,
                                   jpeg_draft=bool(train.get("image_size")),
                                   resize_size=self.prep.resize_size)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from imgflow.device import out_of_memory_as_user_error
        from imgflow.inference import predict_logits

        with out_of_memory_as_user_error(self.device, "close what else uses the GPU, or pass --device cpu"):
            logits = predict_logits(self.model, images, self.prep, self.precision, self.batch_size,
                                    tta=self.tta)
        return logits.softmax(1).numpy()


def read_model_card(onnx_path: Path, embedded: str | None = None) -> dict:
    """The JSON describing an exported model: `<name>.json` or `model.json` beside it, else the
    copy embedded in the ONNX file's metadata."""
    onnx_path = Path(onnx_path)
    for candidate in (onnx_path.with_suffix(".json"), onnx_path.parent / "model.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"cannot read {candidate}: {exc}") from None
    if embedded:
        try:
            return json.loads(embedded)
        except json.JSONDecodeError as exc:
            raise UserError(f"{onnx_path}: its embedded model card is not valid JSON ({exc}): export the "
                            "model again with 'imgflow export', or put its model.json beside it") from None
    raise UserError(f"no model.json beside {onnx_path}, and none embedded in it: export the "
                    "model with 'imgflow export'")


def spec_from_card(card: dict, where: str) -> InputSpec:
    """InputSpec from an exported model.json; UserError naming what is missing."""
    try:
        inp = card["input"]
        return InputSpec.make(card["classes"], inp["image_size"], inp["channels"], inp["mean"],
                              inp["std"], jpeg_draft=inp.get("jpeg_draft", False),
                              resize_size=inp.get("resize_size"))
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise UserError(f"{where} is not an imgflow model.json (bad or missing {exc})") from None


class OnnxModel:
    """An exported ONNX model run with onnxruntime; needs numpy, Pillow and onnxruntime only."""

    def __init__(self, onnx_path: Path, batch_size: int = ONNX_BATCH_SIZE):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--onnx needs onnxruntime: pip install onnxruntime") from None
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError(f"ONNX model not found: {onnx_path}")
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load ONNX model {onnx_path}: {first}") from None
        embedded = self.session.get_modelmeta().custom_metadata_map.get("imgflow.model.json")
        card = read_model_card(onnx_path, embedded)
        self.spec = spec_from_card(card, f"the model.json of {onnx_path}")
        check_spec_fits_onnx(self.spec, self.session, onnx_path)
        self.input_name = self.session.get_inputs()[0].name
        self.path = onnx_path
        self.batch_size = batch_size
        self.mean = np.asarray(self.spec.mean, dtype=np.float32)
        self.std = np.asarray(self.spec.std, dtype=np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8, f"expected uint8 images, got {images.dtype}"
        if self.spec.resize_size and images.shape[1:3] == self.spec.resize_size:
            images = center_crop(images, self.spec.image_size)  # as preprocess.to_model_input crops
        # (pixel / 255 - mean) / std in float32, the operations preprocess.to_model_input does.
        x = (images.astype(np.float32) / np.float32(255.0) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        logits = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        if logits.shape[1:] != (len(self.spec.classes),):  # an output width the graph left symbolic
            raise _mismatch(self.path, f"it scores {plural(logits.shape[1], 'class')}, model.json names "
                                       f"{len(self.spec.classes)}")
        return softmax(logits)


def _mismatch(onnx_path: Path, what: str) -> UserError:
    # A model.json from another export (or edited) would feed the model wrongly shaped input, get
    # a traceback from onnxruntime, or put the wrong class names on its scores.
    return UserError(f"model.json does not describe {onnx_path} ({what}): use the model.json "
                     "written with it by the same 'imgflow export'")


def check_spec_fits_onnx(spec: InputSpec, session, onnx_path: Path) -> None:
    """UserError unless model.json's input and classes match the ONNX graph's input and output.

    Dimensions the graph leaves symbolic (the batch, say) are not checked here; an output width
    left symbolic is checked on the first batch (OnnxModel.probabilities).
    """
    C, (H, W) = spec.channels, spec.image_size
    problems = []
    if len(spec.mean) != C or len(spec.std) != C:
        problems.append(f"{plural(len(spec.mean), 'mean')} and {plural(len(spec.std), 'std')} for "
                        f"{plural(C, 'channel')}")
    shape = list(session.get_inputs()[0].shape)  # [batch, C, H, W]
    if len(shape) != 4 or any(isinstance(n, int) and n != want for n, want in zip(shape[1:], (C, H, W))):
        problems.append(f"it takes input {shape}, model.json says [batch, {C}, {H}, {W}]")
    out = list(session.get_outputs()[0].shape)  # [batch, classes]
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(spec.classes)):
        problems.append(f"its output is {out}, model.json names {plural(len(spec.classes), 'class')}")
    if problems:
        raise _mismatch(onnx_path, "; ".join(problems))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# predict


def predict_images(model: Model, inputs: Sequence[str | Path], top_k: int = DEFAULT_TOP_K,
                   progress: bool | None = None) -> list[dict]:
    """Top-k predictions per file, in input order: [{"image", "top": [{"class", "probability"}]}].

    Unreadable files get `"top": []` and an `"error"` reason. UserError when there is nothing
    to predict or no file could be read.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    files = find_images(inputs)
    if not files:
        raise UserError(f"no image files found in {', '.join(str(i) for i in inputs)}")
    spec = model.spec
    k = min(top_k, len(spec.classes))
    if progress is None:
        progress = interactive()
    results: list[dict] = []
    with warnings.catch_warnings(), progress_bar(
            enabled=progress and len(files) >= PROGRESS_MIN_FILES, total=len(files), desc="predict", unit="img",
            leave=False) as bar:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those files too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for start in range(0, len(files), model.batch_size):
            chunk = [{"image": str(path), "top": []} for path in files[start:start + model.batch_size]]
            arrays, readable = [], []
            for row in chunk:
                try:
                    arrays.append(read_image(Path(row["image"]), spec))
                    readable.append(row)
                # Pillow's format plugins raise many exception types on broken files: any of
                # them means this one file is unusable, never that the batch should stop.
                except Exception as exc:  # noqa: BLE001
                    row["error"] = _read_reason(exc)
                    log.debug("cannot read %s: %s", row["image"], exc)
            if arrays:
                probs = model.probabilities(np.stack(arrays))
                order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                for row, p, idx in zip(readable, probs, order):
                    row["top"] = [{"class": spec.classes[j], "probability": float(p[j])} for j in idx]
            results += chunk
            bar.update(len(chunk))
    failed = [r for r in results if "error" in r]
    if len(failed) == len(results):
        shown = "; ".join(f"{r['image']}: {r['error']}" for r in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise UserError(f"no image could be read from {plural(len(failed), 'file')} ({shown}{more})")
    if failed:
        log.warning("%d of %s could not be read", len(failed), plural(len(results), "file"))
    return results


def predict_files(run_dir: Path | None, inputs: Sequence[str | Path], top_k: int = DEFAULT_TOP_K,
                  tta: bool = False, onnx: Path | None = None,
                  progress: bool | None = None, device: str = "auto") -> list[dict]:
    """`imgflow predict`: with a run directory (PyTorch, on `device`) or an exported ONNX model
    (no torch; onnxruntime on the CPU)."""
    if onnx is not None:
        if tta:
            raise UserError("--tta needs a run directory; it is not available with --onnx")
        if device not in ("auto", "cpu"):
            raise UserError(f"--device {device} needs a run directory: an ONNX model runs with onnxruntime "
                            "on the CPU")
        model: Model = OnnxModel(Path(onnx))
    else:
        model = RunModel(Path(run_dir), tta=tta, device=device)
    return predict_images(model, inputs, top_k=top_k, progress=progress)


def format_predictions(results: list[dict], max_path: int = 60) -> str:
    """A readable table: one row per file, its top classes with probabilities, or its error."""
    def short(name: str) -> str:
        return name if len(name) <= max_path else "..." + name[-(max_path - 3):]

    width = max([5] + [len(short(r["image"])) for r in results])
    k = max((len(r["top"]) for r in results), default=0)
    name = max([1] + [len(t["class"]) for r in results for t in r["top"]])
    cell = max(12, name + 7)
    ordinal = ["1st", "2nd", "3rd"] + [f"{i}th" for i in range(4, k + 1)]
    lines = [f"{'image':<{width}}  " + "  ".join(f"{ordinal[i]:<{cell}}" for i in range(k))]
    for r in results:
        if "error" in r:
            lines.append(f"{short(r['image']):<{width}}  error: {r['error']}")
            continue
        cells = [f"{t['class']:<{name}} {t['probability']:6.1%}" for t in r["top"]]
        lines.append(f"{short(r['image']):<{width}}  " + "  ".join(f"{c:<{cell}}" for c in cells))
    failed = sum("error" in r for r in results)
    lines.append(f"\n{plural(len(results) - failed, 'image')} classified"
                 + (f", {failed} could not be read" if failed else ""))
    return "\n".join(line.rstrip() for line in lines)
