"""`imgflow report RUN_DIR RUN_DIR ...`: several runs side by side, one table and overlaid curves."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from imgflow.errors import UserError
from imgflow.fileio import atomic_write_text
from imgflow.reports import figures
from imgflow.reports.html import Markup, image, note, number, page, paragraph, table
from imgflow.reports.run_report import duration, require_run_files
from imgflow.runs import RunPaths, read_metrics

log = logging.getLogger(__name__)

COMPARISON = "comparison.html"  # not report.html: --out may be one of the runs' own directories
COLUMNS = ["run", "model", "params", "epochs", "precision", "wall time", "train images/s",
           "final val acc", "best val acc", "test acc", "test loss"]


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short, unique names: the directory name, or parent/name when names repeat."""
    names = [p.name or str(p) for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in run_dirs]
    if len(set(names)) < len(names):
        raise UserError("the same run directory is given twice: list each run once")
    return names


def _summary(run_dir: Path) -> dict:
    """What the table needs from one run: its config, history and (evaluating if needed) metrics."""
    from imgflow.history import read_history

    config = require_run_files(run_dir)
    paths = RunPaths(run_dir)
    history = read_history(paths.history)
    if not paths.metrics.is_file():
        from imgflow.evaluation import evaluate_run

        log.info("%s has not been evaluated: evaluating it on its test split first", run_dir)
        evaluate_run(run_dir)
    return {"config": config, "history": history, "metrics": read_metrics(run_dir)}


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write out_dir/comparison.html (+ plots/comparison_curves.png) comparing the runs."""
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 2:
        raise UserError("a comparison needs at least two run directories")
    names = _labels(run_dirs)
    runs = {name: _summary(run_dir) for name, run_dir in zip(names, run_dirs)}

    out = Path(out_dir)
    curves = figures.compare_curves({n: r["history"] for n, r in runs.items()},
                                    RunPaths(out).plots / "comparison_curves.png")
    best_test = max(r["metrics"]["accuracy"] for r in runs.values())
    rows, row_classes = [], []
    for i, (name, run) in enumerate(runs.items()):
        config, history, metrics = run["config"], run["history"], run["metrics"]
        result = config.get("result", {})
        val = [r["val_acc"] for r in history if r.get("val_acc") is not None]
        seconds = result.get("train_seconds")
        if seconds is None:  # unfinished: the epochs so far
            seconds = sum(r.get("seconds") or 0.0 for r in history)
        acc = metrics["accuracy"]
        rows.append([
            name, config["model"]["name"], f"{config['model']['params']:,}", len(history),
            config.get("precision", "?"), duration(seconds),
            f"{result['train_images_per_second']:,.0f}" if result.get("train_images_per_second") else "—",
            _percent(result.get("final_val_accuracy", val[-1] if val else None)),
            f"{max(val):.2%}" if val else "—",
            number(acc, f"{acc:.2%}" + (" (TTA)" if metrics.get("tta") else ""), id=f"test-accuracy-{i}"),
            f"{metrics['loss']:.4f}",
        ])
        row_classes.append("best" if acc == best_test and len(runs) > 1 else None)

    parts = [table(COLUMNS, rows, numeric=[2, 3, 6, 7, 8, 9, 10], row_classes=row_classes,
                   id="comparison-table"),
             paragraph("Final val acc is that of the saved weights (the best epoch's with early stopping; "
                       "after re-estimating BatchNorm statistics with --precise-bn). "
                       "Wall time is the training time (validation included, test evaluation not); "
                       "the best test accuracy is highlighted; (TTA) marks a test evaluated with "
                       "test-time augmentation ('imgflow evaluate --tta').", class_="muted")]
    data = {r["config"]["data"]["sha256"] for r in runs.values()}
    if len(data) > 1:
        parts.append(note("These runs were trained on different data sets "
                          f"({', '.join(sorted({r['config']['data']['name'] for r in runs.values()}))}):"
                          " their accuracies are not directly comparable."))
    sections = [
        ("runs", "Runs", Markup("".join(parts))),
        ("curves", "Validation curves",
         image(curves, "validation accuracy and loss of every run",
               "Validation (solid) and training (dashed) accuracy and loss per epoch, "
               "one colour per run.")),
        ("directories", "Run directories",
         table(["run", "directory"], [[n, str(p)] for n, p in zip(names, run_dirs)])),
    ]
    html = page(f"imgflow comparison: {len(runs)} runs", ", ".join(names), sections)
    path = out / COMPARISON
    atomic_write_text(path, html)
    log.info("comparison written to %s", path)
    return path


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{x:.2%}"
