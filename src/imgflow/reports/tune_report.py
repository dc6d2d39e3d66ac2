"""OUT/report.html of `imgflow tune`: the search, every trial, the best one and how to train it."""
from __future__ import annotations

import logging
from pathlib import Path

from imgflow.fileio import atomic_write_text
from imgflow.reports import figures
from imgflow.reports.html import image, key_values, page, paragraph, table, tag
from imgflow.text import plural

log = logging.getLogger(__name__)


def _histories(out: Path, trials: list[dict]) -> dict[str, list[dict]]:
    """Each trial's history.csv (trials whose run directory is gone are left out)."""
    from imgflow.errors import UserError
    from imgflow.history import read_history

    histories = {}
    for t in trials:
        try:
            histories[f"trial {t['number'] + 1}"] = read_history(out / t["run"] / "history.csv")
        except (UserError, OSError, TypeError):
            continue
    return histories


def write_tune_report(out: Path, record: dict) -> Path:
    out = Path(out)
    plots = out / "plots"
    trials, best = record["trials"], record.get("best")
    names = list(record["search"])
    summary = [paragraph(f"{len(trials)} of {plural(record['trials_planned'], 'trial')} finished "
                         f"({sum(t['state'] == 'pruned' for t in trials)} stopped early by the pruner). "
                         "Every trial trains the base configuration with the searched values, the same "
                         "seed, and is scored on validation only: the test split is not touched.")]
    if best:
        summary += [paragraph(f"Best: trial {best['number'] + 1}, validation accuracy {best['val_acc']:.2%}. "
                              "Train it (then 'imgflow evaluate' tests it once):"),
                    tag("pre", best["command"])]
    base_trial = next((t for t in trials if t.get("base")), None)
    if base_trial and base_trial["val_acc"] is not None:
        summary.append(paragraph(f"Trial {base_trial['number'] + 1} is the base configuration itself: "
                                 f"{base_trial['val_acc']:.2%}, the score the search had to beat."))
    rows = [[f"{t['number'] + 1}" + (" (base)" if t.get("base") else ""), t["state"], "—" if t["val_acc"] is None else f"{t['val_acc']:.2%}",
             t["epochs_trained"] or "—", *[_show(t["params"].get(n)) for n in names], t["run"] or "—"]
            for t in trials]
    trials_part = [table(["trial", "state", "validation accuracy", "epochs", *names, "run"], rows,
                         numeric=[0, 2, 3], id="trials-table",
                         row_classes=["best" if best and t["number"] == best["number"] else None for t in trials])]
    if trials:
        from imgflow.training.config import AUGMENTS  # the one categorical option

        scores = figures.trial_scores(trials, names, plots / "tune_scores.png", {"augment": AUGMENTS})
        trials_part.append(image(scores, "validation accuracy against each searched option",
                                 "Each searched option against the trial's validation accuracy."))
    histories = _histories(out, trials)
    if histories:
        curves = figures.compare_curves(histories, plots / "tune_curves.png", "Trials on validation")
        trials_part.append(image(curves, "validation curves of every trial",
                                 "Validation (solid) and training (dashed) curves of every trial."))
    base = {k: v for k, v in record["base"].items() if k not in names}
    sections = [("summary", "Summary", tag("div", *summary)),
                ("search", "What was searched", key_values(record["search"])),
                ("trials", "Trials", tag("div", *trials_part)),
                ("base", "The base configuration (not searched)", key_values(base))]
    html = page("imgflow tune", f"Hyperparameter search on {record['base']['data']} with "
                f"{record['base']['model']}", sections)
    report = out / "report.html"
    atomic_write_text(report, html)
    log.info("tune report written to %s", report)
    return report


def _show(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
