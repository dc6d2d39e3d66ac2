"""The served model: loaded once as `imgflow predict` loads it, fed uploads as predict feeds files.

Nothing here knows HTTP. An upload goes through `imgflow.prediction.read_image`, the very function
predict calls on a file, so a served image becomes model input with the same numbers (decoding,
EXIF, alpha, resize, channels), and failures get the data layer's wording, as predict reports them.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from imgflow.data.folder import skip_reason
from imgflow.errors import UserError
from imgflow.prediction import Model, OnnxModel, RunModel, read_image, read_model_card
from imgflow.text import plural

log = logging.getLogger(__name__)

ONNX_CARD_KEY = "imgflow.model.json"  # the metadata key `imgflow export` embeds model.json under


@dataclass
class ServedModel:
    model: Model  # RunModel (PyTorch) or OnnxModel (onnxruntime)
    info: dict = field(default_factory=dict)  # what GET /model answers

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.spec.classes


def load_served_model(source: str | os.PathLike, device: str = "auto") -> ServedModel:
    """A run directory or an exported .onnx file, with its description; UserError when unusable."""
    source = Path(source)
    if source.suffix.lower() == ".onnx":
        model: Model = OnnxModel(source)
        name, accuracy, fmt = _onnx_facts(model)
    elif source.is_file():
        raise UserError(f"{source} is a file, not a run directory: give RUN_DIR or an exported MODEL.onnx")
    else:
        model = RunModel(source, device=device)  # predict's checks: UserError for anything but a finished run
        name, accuracy, fmt = _run_facts(source)
    spec = model.spec
    info = {"format": fmt, "source": str(source.resolve()), "model": name, "classes": list(spec.classes),
            "input": {"image_size": list(spec.image_size), "channels": spec.channels},
            "accuracy": accuracy}
    return ServedModel(model, info)


def _run_facts(run_dir: Path) -> tuple[str | None, float | None, str]:
    from imgflow.runs import RunPaths, read_metrics, read_run_config

    name = read_run_config(run_dir)["model"].get("name")
    accuracy = None
    if RunPaths(run_dir).metrics.is_file():
        try:
            accuracy = read_metrics(run_dir)["accuracy"]
        except UserError as exc:  # a damaged metrics.json: the model itself is fine to serve
            log.warning("no test accuracy shown: %s", exc)
    return name, accuracy, "pytorch"


def _onnx_facts(model: OnnxModel) -> tuple[str | None, float | None, str]:
    embedded = model.session.get_modelmeta().custom_metadata_map.get(ONNX_CARD_KEY)
    card = read_model_card(model.path, embedded)
    source = card.get("source") or {}
    return card.get("model"), source.get("test_accuracy"), "onnx"


class EmptyUpload(ValueError):
    """An upload of zero bytes."""


def decode_upload(data: bytes, spec, scratch: Path) -> np.ndarray:
    """Image bytes -> uint8 (H, W, C) model input, exactly as predict reads a file (raises if unusable).

    `read_image` takes a path, so the bytes pass through a private temporary file: one small
    write buys predict's code unchanged, instead of a copy that could drift from it.
    """
    if not data:
        raise EmptyUpload("empty file")
    _refuse_bomb(data)
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".upload") as f:
        f.write(data)
        f.flush()
        return read_image(Path(f.name), spec)


def _refuse_bomb(data: bytes) -> None:
    """DecompressionBombError for more pixels than Pillow's limit, from the header alone.

    Pillow raises only above twice its limit and warns between; predict turns that warning into an
    error with a process-wide warnings filter, which is not safe while several threads decode.
    """
    with Image.open(io.BytesIO(data)) as im:  # reads the header, decodes nothing
        width, height = im.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(
            f"Image size ({width * height} pixels) exceeds limit of {limit} pixels, "
            "could be decompression bomb DOS attack.")


def upload_error(exc: BaseException) -> str:
    """Why an upload could not be used, in the words predict and `inspect` use for files."""
    if isinstance(exc, EmptyUpload):
        return "empty file"
    return skip_reason(exc)


def top_classes(probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[list[dict]]:
    """(N, K) probabilities -> per image [{"class", "probability"}], ordered as predict orders them."""
    k = min(top_k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[j], "probability": float(p[j])} for j in idx]
            for p, idx in zip(probs, order)]


def describe(info: dict) -> str:
    """One line for the start-up log: what is served."""
    H, W = info["input"]["image_size"]
    accuracy = f", test accuracy {info['accuracy']:.2%}" if info.get("accuracy") is not None else ""
    return (f"{info['source']} ({info['format']}, {info.get('model') or 'model'}, "
            f"{plural(len(info['classes']), 'class')}, {H}x{W}{accuracy})")
