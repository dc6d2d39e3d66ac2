"""Test-set evaluation of a finished run: metrics.json (+ the test predictions for reports)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from imgflow.device import out_of_memory_as_user_error
from imgflow.errors import UserError
from imgflow.fileio import atomic_write, write_json
from imgflow.inference import loss_and_accuracy, model_device, predict_logits
from imgflow.precision import resolve_precision, set_threads
from imgflow.preprocess import Preprocessing
from imgflow.progress import interactive
from imgflow.runs import RunPaths, load_run_data, load_trained_model
from imgflow.text import plural

log = logging.getLogger(__name__)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str],
                           train_labels: np.ndarray | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix and common-sense baselines.

    The majority baseline predicts the most frequent *training* class for every test image
    (it must not peek at test labels); without training labels, the test split's own majority.
    """
    from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    K = len(classes)
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(K), zero_division=0)
    reference = train_labels if train_labels is not None else labels
    majority = int(np.bincount(reference, minlength=K).argmax())
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=np.arange(K), average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=np.arange(K)).tolist(),
        "majority_class": classes[majority],
        "majority_baseline_accuracy": float((labels == majority).mean()),
        "random_baseline_accuracy": 1.0 / K,
        "num_images": int(len(labels)),
    }


def save_predictions(path: Path, probs: np.ndarray, labels: np.ndarray) -> None:
    """Test probabilities and labels, for reports (npz without pickled objects)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a path
            np.savez(f, probs=probs.astype(np.float32), labels=labels.astype(np.int64))

    atomic_write(path, write)


def no_test_split_advice(run_dir: Path) -> str:
    """How to get test numbers for a run whose data has no test split (ends a message)."""
    return (f"give the data a test split (a test/<class>/ folder beside train/<class>/) and run 'imgflow "
            f"evaluate {run_dir}', or train again with --test-split 0.2 to hold out 20% of each class for it")


def evaluate_run(run_dir: Path, tta: bool = False, progress: bool | None = None, device: str = "auto") -> dict:
    """Evaluate a run's saved model on its data set's test split, on `device`; write metrics.json."""
    run_dir = Path(run_dir)
    model, config = load_trained_model(run_dir, device)
    if progress is None:
        progress = interactive()
    train_cfg = config["train"]
    dataset = load_run_data(train_cfg, progress=progress, run_dir=run_dir)
    if dataset.test is None:
        raise UserError(f"data set {dataset.name} has no test split: {no_test_split_advice(run_dir)}")
    if dataset.classes != config["data"]["classes"]:
        raise UserError(f"the classes of {train_cfg['data']} changed since {run_dir} was trained")
    if config["data"].get("sha256") not in (None, dataset.sha256):
        log.warning("the data in %s changed since %s was trained (its content hash differs): these "
                    "test numbers are not comparable with the run's earlier ones", train_cfg["data"], run_dir)
    prep = Preprocessing.from_dict(config["preprocessing"])
    on = model_device(model)
    precision = resolve_precision(train_cfg.get("precision", "fp32"), on)
    set_threads(train_cfg.get("threads"))
    with out_of_memory_as_user_error(on, "close what else uses the GPU, or evaluate with --device cpu"):
        logits = predict_logits(model, dataset.test.images, prep, precision,
                                train_cfg.get("eval_batch_size", 500), tta=tta, progress=progress,
                                desc="evaluate")
    probs = logits.softmax(1).numpy()
    metrics = classification_metrics(dataset.test.labels, probs, dataset.classes, dataset.train.labels)
    metrics["loss"] = loss_and_accuracy(logits, dataset.test.labels)["loss"]
    metrics["tta"] = tta
    metrics["precision"] = precision
    metrics["device"] = str(on)
    metrics["model"] = config["model"]["name"]
    metrics["data"] = dataset.name
    paths = RunPaths(run_dir)
    save_predictions(paths.predictions, probs, dataset.test.labels)
    write_json(paths.metrics, metrics)
    log.info("test accuracy %.4f, loss %.4f on %s -> %s",
             metrics["accuracy"], metrics["loss"], plural(metrics["num_images"], "image"), paths.metrics)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A readable table: overall numbers, then per-class precision / recall / F1 / support."""
    lines = [f"test accuracy      {metrics['accuracy']:.4f}" + ("  (TTA)" if metrics.get("tta") else ""),
             f"test loss          {metrics['loss']:.4f}",
             f"balanced accuracy  {metrics['balanced_accuracy']:.4f}",
             f"macro F1           {metrics['macro_f1']:.4f}",
             f"majority baseline  {metrics['majority_baseline_accuracy']:.4f}  "
             f"(always '{metrics['majority_class']}')",
             f"random baseline    {metrics['random_baseline_accuracy']:.4f}", ""]
    width = max(12, *(len(c) for c in metrics["per_class"]))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for c, m in metrics["per_class"].items():
        lines.append(f"{c:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    return "\n".join(lines)
