"""`imgflow report RUN_DIR`: one run's report, built from its saved files and its data set.

Reads config.json, history.csv, metrics.json and test_predictions.npz (running the evaluation
first when the last two are missing) and the data set for the images; writes plots/*.png and a
self-contained report.html. Every number about the test set is formatted from metrics.json.
A run whose data has no test split gets the rest (curves, validation numbers, configuration) and
a note on how to get test numbers.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgflow.errors import UserError
from imgflow.fileio import atomic_write_text
from imgflow.history import read_history
from imgflow.reports import figures
from imgflow.reports.html import (Markup, figures as side_by_side, image, key_values, note, number,
                                  page, paragraph, table, tag)
from imgflow.progress import interactive
from imgflow.runs import RunPaths, load_run_data, read_metrics, read_run_config, unfinished_run_advice
from imgflow.text import plural

log = logging.getLogger(__name__)

GRID = 25  # test images in the prediction grid (the notebook's 5x5)
TOP_LOSSES = 15  # most confidently wrong images shown
TOP_PAIRS = 15  # most-confused class pairs listed (and drawn, for many classes)
SKIPPED_LISTED = 200  # skipped files named in the report
FIGURES = ("curves.png", "examples.png", "per_class_accuracy.png", "confusion_counts.png",
           "confusion_normalized.png", "confusion_top.png", "predictions.png", "top_losses.png")
SECTIONS = {  # id -> heading, in page order; tests check every one is present
    "summary": "Summary",
    "data": "Data set",
    "curves": "Training curves",
    "test-metrics": "Test metrics",
    "per-class": "Per-class accuracy",
    "confusion": "Confusion matrix",
    "confused-pairs": "Most-confused class pairs",
    "predictions": "Test predictions",
    "top-losses": "Top losses",
    "run": "Configuration, time and machine",
}


# ----------------------------------------------------------------------------------------------
# reading the run


def require_run_files(run_dir: Path) -> dict:
    """The run's config; a UserError naming the first missing file a report needs."""
    config = read_run_config(run_dir)
    paths = RunPaths(Path(run_dir))
    if not paths.history.is_file():
        raise UserError(f"{run_dir} has no history.csv: {unfinished_run_advice(run_dir)}")
    if not paths.weights.is_file():
        raise UserError(f"{run_dir} has no model.safetensors: {unfinished_run_advice(run_dir)}")
    return config


def most_confused(cm: np.ndarray, classes: list[str], n: int = TOP_PAIRS) -> list[dict]:
    """The n largest off-diagonal cells of a confusion matrix, as (true -> predicted) pairs.

    fraction: the share of the true class's test images given the wrong class.
    """
    cm = np.asarray(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    rows = cm.sum(1)
    pairs = []
    for i, j in zip(*np.unravel_index(flat, cm.shape)):
        if off[i, j] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                      "fraction": float(off[i, j] / rows[i])})
    return pairs


def _read_predictions(path: Path, metrics: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, K), labels (N,)), checked against metrics.json: both come from one evaluation."""
    try:
        with np.load(path, allow_pickle=False) as f:
            probs, labels = f["probs"], f["labels"]
    # a truncated .npz is a broken zip; a member cut short is an EOFError or a ValueError
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}; re-run 'imgflow evaluate {path.parent}'") from None
    N = len(labels) if labels.ndim == 1 else -1
    consistent = (probs.shape == (N, num_classes) and N == metrics["num_images"]
                  and abs(float((probs.argmax(1) == labels).mean()) - metrics["accuracy"]) < 1e-9)
    if not consistent:
        raise UserError(f"{path} and metrics.json do not describe the same evaluation: "
                        f"re-run 'imgflow evaluate {path.parent}'")
    return probs, labels


@dataclass(frozen=True)
class Evaluated:
    """What the run's evaluation saved: metrics.json and the test predictions."""

    metrics: dict
    probs: np.ndarray  # (N, K) test probabilities
    labels: np.ndarray  # (N,) true classes


def _test_results(run_dir: Path, config: dict) -> Evaluated | None:
    """The run's test results, evaluating it first when they are missing; None when the data it
    was trained on had no test split (config.json records its size)."""
    paths = RunPaths(run_dir)
    if not (paths.metrics.is_file() and paths.predictions.is_file()):
        if config["data"].get("num_test") == 0:
            log.info("%s has no test split: the report has no test numbers", config["train"]["data"])
            return None
        from imgflow.evaluation import evaluate_run

        log.info("%s has not been evaluated: evaluating it on its test split first", run_dir)
        evaluate_run(run_dir)
    metrics = read_metrics(run_dir)
    classes = list(metrics["per_class"])
    if classes != config["data"]["classes"]:
        raise UserError(f"{paths.metrics} does not match the run's classes: "
                        f"re-run 'imgflow evaluate {run_dir}'")
    probs, labels = _read_predictions(paths.predictions, metrics, len(classes))
    return Evaluated(metrics, probs, labels)


def _load_data(config: dict, run_dir: Path, labels: np.ndarray | None):
    """(dataset, None), or (None, why) when the data set cannot be loaded any more.

    A run copied to another machine still gets a report, without the image figures.
    labels: the evaluated test labels, which the test split must still have (None: untested).
    """
    spec = config["train"]["data"]
    try:  # with the run's test hold-out, when the source had no test split
        dataset = load_run_data(config["train"], progress=interactive(), run_dir=run_dir)
    except UserError as exc:
        log.warning("data set %s not available (%s): the report has no images", spec, exc)
        return None, f"The data set {spec} could not be loaded ({exc}), so the images are not shown."
    if labels is not None and (dataset.test is None or not np.array_equal(dataset.test.labels, labels)):
        raise UserError(f"the test split of {spec} has changed since the run was evaluated: "
                        f"re-run 'imgflow evaluate {run_dir}' before the report")
    return dataset, None


# ----------------------------------------------------------------------------------------------
# formatting


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{int(minutes)} min {int(seconds % 60):02d} s"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def _overfitting_note(history: list[dict]) -> str | None:
    """A sentence when the validation loss rose well above its minimum (the curves say overfit)."""
    losses = [(r["epoch"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if len(losses) < 3:
        return None
    best_epoch, best = min(losses, key=lambda e: e[1])
    last_epoch, last = losses[-1]
    if best_epoch < last_epoch and last > 1.1 * best:
        return (f"Validation loss was lowest at epoch {best_epoch} ({best:.4f}) and rose to "
                f"{last:.4f} by epoch {last_epoch}: the model overfits after epoch {best_epoch} "
                "(regularise, augment, or stop earlier).")
    return None


# ----------------------------------------------------------------------------------------------
# sections


def _summary(config: dict, metrics: dict, history: list[dict]) -> Markup:
    acc = metrics["accuracy"]
    parts = [
        paragraph("Test accuracy ", tag("span", number(acc, f"{acc:.2%}", id="test-accuracy"),
                                        class_="big"),
                  f" on {plural(metrics['num_images'], 'test image')}"
                  + (" (with test-time augmentation)" if metrics.get("tta") else "")
                  + f" — majority-class baseline {metrics['majority_baseline_accuracy']:.2%}, "
                  f"random baseline {metrics['random_baseline_accuracy']:.2%}.", class_="headline"),
        _trained_paragraph(config, history),
    ]
    if acc <= metrics["majority_baseline_accuracy"]:
        parts.append(note("The model does not beat the majority-class baseline: it has learnt "
                          "nothing useful yet."))
    return Markup("".join(parts))


def _untested_summary(config: dict, history: list[dict], run_dir: Path) -> Markup:
    """The summary of a run whose data has no test split: its validation numbers, and what to do."""
    val = config.get("result", {}).get("final_val_accuracy")
    if val is None:
        head = paragraph("No test split and no validation split: the training curves are all there is.",
                         class_="headline")
    else:
        head = paragraph("Validation accuracy ", tag("span", number(val, f"{val:.2%}", id="val-accuracy"),
                                                     class_="big"),
                         f" on {plural(config['data']['num_val'], 'validation image')} (the saved "
                         "weights); there is no test accuracy.", class_="headline")
    return Markup(head + _trained_paragraph(config, history) + note(_no_test_split(config, run_dir)))


def _no_test_split(config: dict, run_dir: Path) -> str:
    from imgflow.evaluation import no_test_split_advice

    return (f"The data set {config['data']['name']} has no test split, so this run has no test "
            f"numbers: to get them, {no_test_split_advice(run_dir)}.")


def _trained_paragraph(config: dict, history: list[dict]) -> Markup:
    result = config.get("result", {})
    model, data = config["model"], config["data"]
    return paragraph(f"Model {model['name']} ({model['params']:,} parameters) trained on {data['name']} "
                     f"({plural(len(data['classes']), 'class')}, {plural(data['num_train'], 'training image')}"
                     f" and {plural(data['num_val'], 'validation image')}) for {plural(len(history), 'epoch')} "
                     f"in {duration(result.get('train_seconds'))} ({config.get('precision', '?')}, "
                     f"{config.get('machine', {}).get('cpu', 'unknown CPU')}).")


def data_section(card: dict | None, config: dict, examples: Path | None, why: str | None) -> Markup:
    if card is None:
        data = config["data"]
        return Markup(note(why) + key_values({"name": data["name"], "source": data["source"],
                                              "sha256": data["sha256"],
                                              "classes": data["classes"],
                                              "image shape (H, W, C)": data["image_shape"]}))
    H, W, C = card["image_shape"]
    train, test = card["splits"]["train"], card["splits"]["test"]
    parts = [key_values({
        "name": card["name"], "source": card["source"], "sha256": card["sha256"],
        "image shape": f"{H} × {W} × {C}",
        "images": f"{train['count']:,} train" + (f", {test['count']:,} test" if test else ""),
        "used for training": f"{config['data']['num_train']:,} train, "
                             f"{config['data']['num_val']:,} validation (held out from train)",
        "channel mean": " ".join(f"{m:.4f}" for m in card["channel_mean"]),
        "channel std": " ".join(f"{s:.4f}" for s in card["channel_std"]),
    })]
    if card["sha256"] != config["data"]["sha256"]:
        parts.append(note("The data set's content hash differs from the one recorded when the run "
                          f"was trained ({config['data']['sha256'][:12]}…)."))
    parts += [note(n) for n in card.get("notes", [])]
    rows = [[i, c, f"{train['per_class'][c]:,}"] + ([f"{test['per_class'][c]:,}"] if test else [])
            for i, c in enumerate(card["classes"])]
    header = ["#", "class", "train"] + (["test"] if test else [])
    parts.append(tag("div", table(header, rows, numeric=[0, 2, 3]), class_="scroll"))
    if examples is not None:
        parts.append(image(examples, "example training images",
                           "Random training images, one row per class."))
    skipped = card["skipped"]
    parts.append(tag("h3", f"Skipped files ({len(skipped)})", id="skipped"))
    if skipped:
        rows = [[s["path"], s["reason"]] for s in skipped[:SKIPPED_LISTED]]
        parts.append(tag("div", table(["file", "reason"], rows), class_="scroll"))
        if len(skipped) > SKIPPED_LISTED:
            parts.append(paragraph(f"… and {len(skipped) - SKIPPED_LISTED:,} more "
                                   "(see 'imgflow inspect DATA --json').", class_="muted"))
    else:
        parts.append(paragraph("None: every file was a readable image.", class_="muted"))
    return Markup("".join(parts))


def _curves_section(history: list[dict], curves: Path) -> Markup:
    parts = [image(curves, "accuracy and loss per epoch",
                   "Training (blue) and validation (orange) accuracy and loss per epoch.")]
    warning = _overfitting_note(history)
    if warning:
        parts.append(note(warning))
    if all(r.get("val_loss") is None for r in history):
        parts.append(note("The run had no validation split (--val-split 0): training curves only."))

    def cell(v, fmt):
        return "—" if v is None else format(v, fmt)

    rows = [[r["epoch"], cell(r["train_loss"], ".4f"), cell(r["train_acc"], ".4f"),
             cell(r.get("val_loss"), ".4f"), cell(r.get("val_acc"), ".4f"), cell(r.get("lr"), ".3g"),
             cell(r.get("seconds"), ".1f")] for r in history]
    parts.append(tag("div", table(["epoch", "train loss", "train acc", "val loss", "val acc", "lr",
                                   "seconds"], rows, numeric=range(7)), class_="scroll"))
    return Markup("".join(parts))


def _metrics_section(metrics: dict) -> Markup:
    def both(v):
        return f"{v:.4f} ({v:.2%})"

    overall = key_values({
        "accuracy": number(metrics["accuracy"], both(metrics["accuracy"])),
        "loss (cross-entropy)": number(metrics["loss"], f"{metrics['loss']:.4f}"),
        "balanced accuracy": both(metrics["balanced_accuracy"]),
        "macro F1": f"{metrics['macro_f1']:.4f}",
        "majority-class baseline": f"{both(metrics['majority_baseline_accuracy'])}, always "
                                   f"predicting '{metrics['majority_class']}'",
        "random baseline": both(metrics["random_baseline_accuracy"]),
        "test images": f"{metrics['num_images']:,}",
        "test-time augmentation": "yes" if metrics.get("tta") else "no",
    }, id="overall-metrics")
    rows = [[i, c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", f"{m['support']:,}"]
            for i, (c, m) in enumerate(metrics["per_class"].items())]
    per_class = tag("div", table(["#", "class", "precision", "recall", "F1", "support"], rows,
                                 numeric=[0, 2, 3, 4, 5], id="per-class-metrics"), class_="scroll")
    return Markup(overall + tag("h3", "Per class") + per_class)


def _confusion_section(cm: np.ndarray, classes: list[str], plots: Path,
                       pairs: list[dict]) -> tuple[Markup, list[Path]]:
    """Both labelled matrices, or for many classes the top confusions and an index-only overview."""
    if len(classes) <= figures.MAX_MATRIX_CLASSES:
        counts = figures.confusion_matrix(cm, classes, plots / "confusion_counts.png", normalize=False)
        norm = figures.confusion_matrix(cm, classes, plots / "confusion_normalized.png", normalize=True)
        body = side_by_side(image(counts, "confusion matrix, counts",
                                  "Rows: true class; columns: predicted class; numbers: test images."),
                            image(norm, "confusion matrix, row-normalised",
                                  "Each row divided by its class's test images: the diagonal is "
                                  "each class's recall."))
        return body, [counts, norm]
    top = figures.top_confusions(pairs, plots / "confusion_top.png", len(classes))
    overview = figures.confusion_overview(cm, plots / "confusion_normalized.png")
    body = Markup(paragraph(f"With {len(classes)} classes a labelled matrix is unreadable: the "
                            "most frequent confusions are drawn instead, and the whole "
                            "row-normalised matrix shows the pattern (classes by index, as in the "
                            "per-class table).")
                  + side_by_side(image(top, "most frequent confusions"),
                                 image(overview, "row-normalised confusion matrix")))
    return body, [top, overview]


def _pairs_section(pairs: list[dict]) -> Markup:
    if not pairs:
        return paragraph("No test image was misclassified.", class_="muted")
    rows = [[p["true"], p["predicted"], f"{p['count']:,}", f"{p['fraction']:.1%}"] for p in pairs]
    return Markup(paragraph("Ordered pairs: images of the true class predicted as the other class; "
                            "the share is of the true class's test images.")
                  + table(["true class", "predicted as", "images", "share of true class"], rows,
                          numeric=[2, 3], id="confused-pairs-table"))


def _image_sections(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                    plots: Path) -> tuple[Markup, Markup, list[Path]]:
    """The 5x5 prediction grid and the top losses: (grid HTML, top-losses HTML, PNGs written)."""
    pick = np.sort(np.random.default_rng(0).choice(len(labels), min(GRID, len(labels)), replace=False))
    wrong = int((probs[pick].argmax(1) != labels[pick]).sum())
    grid = figures.prediction_grid(images[pick], labels[pick], probs[pick], classes,
                                   plots / "predictions.png",
                                   f"{plural(len(pick), 'random test image')}: {wrong} wrong (red)")
    predictions = image(grid, "test images with true and predicted class",
                        "True class, predicted class and the model's confidence in it; "
                        "wrong predictions in red with a red frame.")
    losses = -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))
    mistakes = np.flatnonzero(probs.argmax(1) != labels)
    worst = mistakes[np.argsort(-losses[mistakes], kind="stable")][:TOP_LOSSES]
    if not len(worst):
        return predictions, paragraph("No test image was misclassified.", class_="muted"), [grid]
    top = figures.top_losses(images[worst], labels[worst], probs[worst], classes,
                             plots / "top_losses.png")
    return predictions, image(top, "most confidently wrong test images",
                              "Highest loss first: the predicted class with its probability, the "
                              "true class with the probability the model gave it, and the loss "
                              "-log p(true)."), [grid, top]


def _precise_bn_text(done: dict | None, model: dict) -> str:
    if not model.get("non_trainable_params"):  # Keras' count: BatchNorm's running mean and variance
        return "— (no BatchNorm)"
    if not done:
        return "running averages from training"
    text = f"re-estimated from the final weights on {plural(done['images'], 'training image')}"
    if done.get("val_accuracy") is not None:
        text += f" (val accuracy {done['val_accuracy_before']:.2%} → {done['val_accuracy']:.2%})"
    return text


def _run_section(config: dict, history: list[dict], run_dir: Path) -> Markup:
    result = config.get("result", {})
    model, data = config["model"], config["data"]
    epoch_seconds = [r["seconds"] for r in history if r.get("seconds") is not None]
    training = {
        "run directory": str(run_dir),
        "epochs run": result.get("epochs_run", len(history)),
        "best epoch (weights kept)": result.get("best_epoch") or "last",
        "stopped early": "yes" if result.get("stopped_early") else "no",
        "training time": f"{duration(result.get('train_seconds'))}"
                         + (f" ({result['train_seconds']:,} s)" if result.get("train_seconds") else ""),
        "throughput": (f"{result['train_images_per_second']:,} training images/s"
                       if result.get("train_images_per_second") else "—"),
        "mean epoch time": f"{np.mean(epoch_seconds):.1f} s (incl. validation)" if epoch_seconds else "—",
        "steps per epoch": config.get("steps_per_epoch"),
        "BatchNorm statistics": _precise_bn_text(result.get("precise_bn"), model),
        "precision": config.get("precision"),
        "threads": config.get("threads"),
    }
    model_info = {
        "name": model["name"], "parameters": f"{model['params']:,}",
        "trainable": f"{model.get('trainable_params', 0):,}",
        "non-trainable": f"{model.get('non_trainable_params', 0):,}",
        "input (H, W, C)": [*model["image_size"], model["in_channels"]],
        "classes": model["num_classes"],
    }
    prep = config.get("preprocessing", {})
    return Markup(
        tag("h3", "Training") + key_values(training, id="training-info")
        + tag("h3", "Model") + key_values(model_info)
        + tag("h3", "Training configuration") + key_values(config.get("train", {}), id="train-config")
        + tag("h3", "Preprocessing") + key_values(prep)
        + tag("h3", "Data as recorded at training") + key_values(
            {k: v for k, v in data.items() if k != "classes"})
        + tag("h3", "Library versions") + key_values(config.get("versions", {}), id="versions")
        + tag("h3", "Machine") + key_values(config.get("machine", {}), id="machine"))


# ----------------------------------------------------------------------------------------------
# the report


def report_run(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write plots/*.png and report.html for one run into out_dir (default: the run directory)."""
    from imgflow.data.card import make_card
    from imgflow.data.examples import save_example_grid

    run_dir = Path(run_dir)
    config = require_run_files(run_dir)
    history = read_history(RunPaths(run_dir).history)
    evaluated = _test_results(run_dir, config)
    dataset, why = _load_data(config, run_dir, evaluated.labels if evaluated else None)

    out = Path(out_dir) if out_dir is not None else run_dir
    plots = RunPaths(out).plots
    log.info("drawing the report's figures into %s", plots)
    title = f"{config['model']['name']} on {config['data']['name']}"
    curves = figures.training_curves(history, plots / "curves.png", title,
                                     best_epoch=config.get("result", {}).get("best_epoch"))
    card = examples = None
    if dataset is not None:
        card = make_card(dataset)
        examples = save_example_grid(dataset, plots / "examples.png")
    bodies = {"data": data_section(card, config, examples, why),
              "curves": _curves_section(history, curves),
              "run": _run_section(config, history, run_dir)}
    if evaluated is None:
        bodies.update(_untested_sections(config, history, run_dir))
        written, subtitle = [], f"Run {run_dir} — no test split: training and validation numbers only"
    else:
        test_bodies, written = _test_sections(evaluated, config, history, dataset, why, plots)
        bodies.update(test_bodies)
        subtitle = (f"Run {run_dir} — test metrics from metrics.json"
                    + (", with test-time augmentation" if evaluated.metrics.get("tta") else ""))
    html = page(f"imgflow report: {title}", subtitle,
                [(sid, heading, bodies[sid]) for sid, heading in SECTIONS.items() if sid in bodies])
    report = RunPaths(out).report
    atomic_write_text(report, html)
    written += [curves, examples]
    for name in FIGURES:  # figures of an earlier report that this one does not have
        if plots / name not in written:
            (plots / name).unlink(missing_ok=True)
    log.info("report written to %s", report)
    return report


def _test_sections(evaluated: Evaluated, config: dict, history: list[dict], dataset, why: str | None,
                   plots: Path) -> tuple[dict[str, Markup], list[Path]]:
    """The summary and the sections about the test split, by id; and the figures they drew."""
    metrics, labels, probs = evaluated.metrics, evaluated.labels, evaluated.probs
    classes = list(metrics["per_class"])
    cm = np.asarray(metrics["confusion_matrix"])
    pairs = most_confused(cm, classes)
    recall = [metrics["per_class"][c]["recall"] for c in classes]
    per_class = figures.per_class_accuracy(classes, recall, plots / "per_class_accuracy.png",
                                           metrics["accuracy"])
    confusion, written = _confusion_section(cm, classes, plots, pairs)
    written.append(per_class)
    predictions = top = paragraph(why, class_="muted")
    if dataset is not None:
        predictions, top, pngs = _image_sections(dataset.test.images, labels, probs, classes, plots)
        written += pngs
    return {
        "summary": _summary(config, metrics, history),
        "test-metrics": _metrics_section(metrics),
        "per-class": image(per_class, "per-class accuracy",
                           "Share of each class's test images classified correctly (its recall)."),
        "confusion": confusion,
        "confused-pairs": _pairs_section(pairs),
        "predictions": predictions,
        "top-losses": top,
    }, written


def _untested_sections(config: dict, history: list[dict], run_dir: Path) -> dict[str, Markup]:
    """The summary, and in place of the test sections one saying there is no test split."""
    return {"summary": _untested_summary(config, history, run_dir),
            "test-metrics": tag("p", _no_test_split(config, run_dir), id="no-test-split")}
