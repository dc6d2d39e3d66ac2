"""`imgflow export`: a run's model as ONNX and TorchScript, described by a JSON, parity-checked.

The out directory (default RUN_DIR/export) receives
    model.onnx            ONNX, dynamic batch dimension; the JSON is also in its metadata
    model.torchscript.pt  TorchScript (torch.jit.load, no imgflow); the JSON also as an extra file
    model.json            classes, input size, channel order, mean/std, layout, output meaning
    parity.json           how closely each format reproduces the PyTorch model on real images
Both formats take normalised float32 NCHW input and return logits (softmax gives probabilities),
so model.json is all a consumer needs. Before anything is installed in the out directory, each
exported file is loaded back and compared with the PyTorch model on up to 256 images of the run's
test split (training split if it has none): max |probability difference| <= 1e-4 and identical
top-1 on every image, else ParityError: the previous export (if any) stays in place, its
parity.json too, and the failed check's numbers go to parity-failed.json.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from imgflow.data.cache import sha256_of_file
from imgflow.device import full_fp32
from imgflow.errors import UserError
from imgflow.fileio import write_json
from imgflow.inference import predict_logits
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.runs import RunPaths, load_run_data, load_trained_model, read_metrics
from imgflow.text import plural

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
CARD_FILE = "model.json"
PARITY_FILE = "parity.json"
FAILED_PARITY_FILE = "parity-failed.json"  # a failed check's numbers: parity.json stays the installed models'
# Opset 20 runs on onnxruntime >= 1.17 (pyproject asks >= 1.18) and covers every op the
# registered models use; a newer one would only lock out older runtimes.
ONNX_OPSET = 20
PARITY_TOLERANCE = 1e-4  # max |p_export - p_pytorch| over softmax probabilities
PARITY_IMAGES = 256  # real images compared per format; evenly spread over the split
PARITY_BATCH = 64  # images per forward pass during the check
CARD_METADATA_KEY = "imgflow.model.json"  # ONNX metadata_props key holding model.json


class ParityError(Exception):
    """An exported model disagrees with the PyTorch model: a bug, not bad input (exit 1)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report  # what parity.json holds


# ----------------------------------------------------------------------------------------------
# model.json


def model_card(config: dict, run_dir: Path) -> dict:
    """Everything a consumer needs to feed an exported model and read its output."""
    prep = Preprocessing.from_dict(config["preprocessing"])
    classes = list(config["data"]["classes"])
    C, (H, W) = prep.channels, prep.image_size
    metrics_path = RunPaths(run_dir).metrics
    metrics = read_metrics(run_dir) if metrics_path.is_file() else {}
    from imgflow.version import __version__

    return {
        "format": "imgflow-export",
        "format_version": 1,
        "model": config["model"]["name"],
        "classes": classes,
        "input": {
            "name": "input",
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", C, H, W],
            "image_size": [H, W],
            "channels": C,
            "channel_order": "RGB" if C == 3 else "L",
            "mean": list(prep.mean),
            "std": list(prep.std),
            "formula": "x = (pixel / 255 - mean) / std, per channel; pixel in 0..255",
            "resize_size": list(prep.resize_size),
            "resize": ("stretch to image_size (no crop), Pillow bilinear (antialiased when shrinking)"
                       if prep.resize_size == tuple(prep.image_size) else
                       "stretch to resize_size, Pillow bilinear (antialiased when shrinking), then take "
                       "the centre image_size crop (top = (resize H - H) // 2, left likewise)"),
            "color": ("alpha composited on white; grayscale replicated to 3 channels" if C == 3 else
                      "alpha composited on white; colour converted with Pillow's convert('L')"),
            # imgflow predict decodes JPEGs at reduced scale before resizing when training did.
            "jpeg_draft": bool(config["train"].get("image_size")),
        },
        "output": {
            "name": "logits",
            "shape": ["batch", len(classes)],
            "meaning": "logits (unnormalised scores); softmax over axis 1 gives the probability "
                       "of each class, in the order of 'classes'",
        },
        "source": {
            "run": Path(run_dir).resolve().name,  # a name, not a path: the file may be shared
            # Which model exactly: an export directory never mixes models (_check_out_dir).
            "weights_sha256": sha256_of_file(RunPaths(run_dir).weights),
            "data": config["data"].get("name"),
            "trained_precision": config.get("precision"),
            "test_accuracy": metrics.get("accuracy"),
            "imgflow": __version__,
            "torch": torch.__version__,
        },
    }


# ----------------------------------------------------------------------------------------------
# exporters


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation notes and INFO chatter ('torchvision is not installed',
    the ONNX optimiser's pass-by-pass notes): real failures still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, card: dict) -> dict:
    """Write `model` as ONNX to `path` (batch dimension dynamic); return {"exporter", "opset"}.

    The torch.export-based exporter (PyTorch's default since 2.9) is tried first; if it cannot
    capture the model, the older TorchScript-based exporter is used. The parity check judges
    the result either way.
    """
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: "
                        "pip install 'imgflow[export]'") from None
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["input"],
                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False, verbose=False)
        proto = program.model_proto
        exporter = "torch.onnx (dynamo)"
    except Exception as exc:  # noqa: BLE001 - any capture failure: try the other exporter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("the torch.export-based ONNX exporter failed (%s); using the TorchScript-based one",
                    first)
        buffer = io.BytesIO()
        with _quiet():
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
        exporter = "torch.onnx (torchscript)"
    proto.doc_string = f"imgflow {card['model']}: {card['output']['meaning']}"
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, json.dumps(card)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"exporter": exporter, "opset": int(opset)}


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, card: dict) -> dict:
    """Write `model` traced to TorchScript at `path`, model.json inside as an extra file."""
    # torch.jit is deprecated in favour of torch.export, but its archives are what
    # `torch.jit.load` (and LibTorch in C++) open without the model's Python code.
    with _quiet():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={CARD_FILE: json.dumps(card)})
    return {"exporter": "torch.jit.trace", "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# parity


def parity_images(config: dict, limit: int = PARITY_IMAGES, progress: bool = False,
                  run_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Up to `limit` uint8 images of the run's data (test split, else training split), spread
    evenly over the split so that every class shows up; and a description of where they came from.

    When the data set cannot be loaded any more (moved, changed), seeded random images stand in,
    with a warning: the check still compares the exported graph with the PyTorch one.
    """
    train = config["train"]
    prep = Preprocessing.from_dict(config["preprocessing"])
    expected = (*prep.resize_size, prep.channels)
    try:
        dataset = load_run_data(train, progress=progress, run_dir=run_dir)  # with the run's test hold-out, if any
        split, name = (dataset.test, "test") if dataset.test is not None else (dataset.train, "train")
        if split.images.shape[1:] != expected:
            raise UserError(f"its images are now {split.images.shape[1:]}, the model takes {expected}")
    except UserError as exc:
        log.warning("cannot use the data set %s for the parity check (%s): checking on random "
                    "images instead", train["data"], exc)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(min(limit, 64), *expected), dtype=np.uint8)
        return images, f"random uint8 images ({len(images)}; data set {train['data']} unavailable)"
    n = min(limit, len(split))
    index = np.unique(np.linspace(0, len(split) - 1, n).round().astype(np.int64))
    return split.images[index], f"{name} split of {dataset.name} ({len(index)} of {plural(len(split), 'image')})"


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Max |difference| of logits and of softmax probabilities, and top-1 disagreements."""
    p_ref, p = reference.softmax(1), logits.softmax(1)
    mismatches = int((reference.argmax(1) != logits.argmax(1)).sum())
    return {"images": len(reference),
            "max_abs_prob_diff": float((p_ref - p).abs().max()) if len(p) else 0.0,
            "max_abs_logit_diff": float((reference - logits).abs().max()) if len(p) else 0.0,
            "top1_mismatches": mismatches,
            "top1_agreement": 1.0 - mismatches / max(len(reference), 1)}


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet():
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


_RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner}


@torch.no_grad()
def check_parity(reference: torch.Tensor, prep: Preprocessing, images: np.ndarray,
                 run: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Compare an exported model (`run`: NCHW float32 -> logits) with the PyTorch `reference`
    logits of the same uint8 images."""
    out = []
    for start in range(0, len(images), PARITY_BATCH):
        batch = torch.from_numpy(images[start:start + PARITY_BATCH])
        out.append(run(to_model_input(batch, prep)).float())
    result = compare(reference, torch.cat(out))
    result["tolerance"] = PARITY_TOLERANCE
    result["passed"] = (result["max_abs_prob_diff"] <= PARITY_TOLERANCE
                        and result["top1_mismatches"] == 0)
    return result


# ----------------------------------------------------------------------------------------------
# export


_EXPORTERS = {"onnx": (ONNX_FILE, export_onnx), "torchscript": (TORCHSCRIPT_FILE, export_torchscript)}


def _install(staged: Path, dest: Path) -> None:
    """Move a finished file into place atomically (same directory tree, so same file system)."""
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, dest)


def _same_model(card: dict, other: dict) -> bool:
    """True when model.json `other` describes the model of `card`."""
    mine, theirs = card["source"], other.get("source")
    if not isinstance(theirs, dict):
        return False
    if "weights_sha256" in theirs:
        return theirs["weights_sha256"] == mine["weights_sha256"]
    # An export from before the weights were hashed: the same run as far as model.json can tell.
    return (all(other.get(k) == card[k] for k in ("model", "classes", "input", "output"))
            and (theirs.get("run"), theirs.get("data")) == (mine["run"], mine["data"]))


def _check_out_dir(out_dir: Path, card: dict) -> None:
    """Refuse an out directory holding the export of another model.

    An export directory is deployed as a whole: model.json must describe every model file in it.
    Exporting run B's TorchScript beside run A's ONNX would leave model.onnx described by B's
    model.json. Refusing, rather than replacing A's whole export set, because the directory may
    be what is deployed, and `train` refuses a foreign --out the same way; the fix is one
    command (another --out, or delete the old export). The same model may be exported into it
    again, e.g. to add a format.
    """
    existing = out_dir / CARD_FILE
    models = [name for name, _ in _EXPORTERS.values() if (out_dir / name).exists()]
    fix = f"choose another --out, or delete {out_dir} first"
    if not existing.is_file():
        if models:
            raise UserError(f"{out_dir} holds {', '.join(models)} but no {CARD_FILE}, so no telling which "
                            f"model that is: {fix}")
        return
    try:
        other = json.loads(existing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {existing} ({exc}), so no telling which model {out_dir} holds: "
                        f"{fix}") from None
    if not isinstance(other, dict) or not _same_model(card, other):
        raise UserError(f"{out_dir} holds the export of another model: {fix}")


def export_run(run_dir: Path, out_dir: Path | None = None, formats: Sequence[str] = FORMATS,
               max_images: int = PARITY_IMAGES, progress: bool = False, device: str = "auto") -> dict:
    """Export a finished run to ONNX and/or TorchScript, parity-check, install; return parity.json.

    The exports are made from the model on the CPU, so they load anywhere; `device` is where the
    PyTorch reference they are checked against runs (in full fp32: no TF32 on a GPU).

    Raises UserError for an unusable run directory, ParityError when an export disagrees with
    the PyTorch model (nothing is installed then; parity-failed.json records the numbers).
    """
    from imgflow.device import resolve_device
    from imgflow.precision import set_threads

    run_dir = Path(run_dir)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        given = f"{plural(len(unknown), 'unknown export format')} ({', '.join(unknown)})" if unknown \
            else "no export format given"
        raise UserError(f"{given}: use {', '.join(FORMATS)}")
    reference_device = resolve_device(device)  # before anything is read: --device cuda without CUDA
    model, config = load_trained_model(run_dir)
    set_threads(config["train"].get("threads"))
    out_dir = Path(out_dir) if out_dir is not None else RunPaths(run_dir).export
    card = model_card(config, run_dir)
    _check_out_dir(out_dir, card)
    images, source = parity_images(config, max_images, progress, run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = _export_checked(model, Preprocessing.from_dict(config["preprocessing"]), images, source,
                               formats, card, out_dir, reference_device)
    # Entries of formats not exported this time describe files still in place: keep them.
    report = {"formats": {**_earlier_formats(out_dir, exclude=exported), **exported}}
    report["passed"] = all(r.get("passed") for r in report["formats"].values())
    report["out_dir"] = str(out_dir)
    write_json(out_dir / PARITY_FILE, report)
    (out_dir / FAILED_PARITY_FILE).unlink(missing_ok=True)  # an earlier failure, now passed
    return report


def _export_checked(model: torch.nn.Module, prep: Preprocessing, images: np.ndarray, source: str,
                    formats: Sequence[str], card: dict, out_dir: Path,
                    reference_device: torch.device | None = None) -> dict:
    """Export each format into a staging folder, parity-check it, and install all of them only
    when every one passed; return each format's parity.json entry. `model` is on the CPU."""
    example = to_model_input(torch.from_numpy(images[:2]), prep)  # batch 2: 1 would be specialised
    if len(example) < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    # The PyTorch model as evaluate runs it (predict_logits), in fp32 whatever the training
    # precision, because the exports compute in fp32.
    reference_device = reference_device or torch.device("cpu")
    on_device = model if reference_device.type == "cpu" else copy.deepcopy(model).to(reference_device)
    with full_fp32(reference_device):
        reference = predict_logits(on_device, images, prep, "fp32", PARITY_BATCH)
    results = {}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        for fmt in formats:
            name, exporter = _EXPORTERS[fmt]
            info = exporter(model, example, Path(tmp) / name, card)
            result = check_parity(reference, prep, images, _RUNNERS[fmt](Path(tmp) / name))
            results[fmt] = {"file": name, **info, "image_source": source, **result}
            log.debug("%s: max |prob diff| %.2e, top-1 agreement %d/%d on %s", fmt,
                      result["max_abs_prob_diff"], result["images"] - result["top1_mismatches"],
                      result["images"], source)
        failed = {fmt: r for fmt, r in results.items() if not r["passed"]}
        if failed:
            report = {"formats": results, "passed": False}
            write_json(out_dir / FAILED_PARITY_FILE, report)
            text = ", ".join(f"{fmt} (max |prob diff| {r['max_abs_prob_diff']:.2e}, "
                             f"{plural(r['top1_mismatches'], 'top-1 mismatch', 'top-1 mismatches')})" for fmt, r in failed.items())
            raise ParityError(f"parity check failed for {text}: nothing installed in {out_dir}; "
                              f"see {out_dir / FAILED_PARITY_FILE}", report)
        # model.json first: should the installs be cut short, it still describes every model file
        # in the directory (_check_out_dir let in only this model's).
        write_json(out_dir / CARD_FILE, card)
        for r in results.values():
            _install(Path(tmp) / r["file"], out_dir / r["file"])
    return results


def _earlier_formats(out_dir: Path, exclude: dict) -> dict:
    """parity.json entries of an earlier export whose files are still in out_dir, but for `exclude`."""
    try:
        old = json.loads((out_dir / PARITY_FILE).read_text(encoding="utf-8")).get("formats", {})
        return {k: v for k, v in old.items() if k not in exclude and (out_dir / v.get("file", "")).is_file()}
    except (OSError, ValueError, AttributeError):  # none yet, or not ours to trust
        return {}


def format_parity(report: dict) -> str:
    """The parity numbers as a table, one row per format."""
    lines = [f"{'format':<12} {'images':>6}  {'max|dp|':>9}  {'max|dlogit|':>11}  {'top-1':>9}  result"]
    for fmt, r in report["formats"].items():
        agree = f"{r['images'] - r['top1_mismatches']}/{r['images']}"
        lines.append(f"{fmt:<12} {r['images']:>6}  {r['max_abs_prob_diff']:9.2e}  "
                     f"{r['max_abs_logit_diff']:11.2e}  {agree:>9}  "
                     f"{'ok' if r['passed'] else 'FAILED'}")
    sources = {r["image_source"] for r in report["formats"].values()}
    lines.append(f"images: {'; '.join(sorted(sources))}; tolerance {PARITY_TOLERANCE:g} on probabilities")
    if "out_dir" in report:
        lines.append(f"exported to {report['out_dir']}: "
                     + ", ".join([r["file"] for r in report["formats"].values()] + [CARD_FILE, PARITY_FILE]))
    return "\n".join(lines)
