"""The workflow report: OUT/report.html, one story through the eight steps of `imgflow workflow`.

Built from OUT/workflow.json (read through `record`, never from the steps' code) and the run
directories it names (config.json, history.csv, and the final run's metrics.json and plots),
never from live training objects. The workflow's own figures (baseline, overfitting and
candidate curves) are written to OUT/plots/; the final run's figures are the ones its own report
drew into RUN/plots/. Numbers the prose quotes come from the record, the constants included, so
an old workflow.json is explained as the run that wrote it saw things.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np

from imgflow.errors import UserError
from imgflow.fileio import atomic_write_text
from imgflow.history import run_history
from imgflow.reports import figures
from imgflow.reports.html import (Markup, figures as side_by_side, image, key_values, note, number,
                                  page, paragraph, table, tag)
from imgflow.reports.run_report import data_section, duration
from imgflow.runs import RunPaths, read_metrics, read_run_config
from imgflow.text import plural
from imgflow.workflow.record import (NUM_STEPS, Candidate, Constants, StepRecord, WorkflowRecord, WorkflowState,
                                     read_workflow_record)

log = logging.getLogger(__name__)

FIGURES = ("baseline_curves.png", "overfit_curves.png", "candidates_curves.png")
# The final run's figures shown in step 8, in page order; each is shown when its report drew it
# (a many-class data set gets confusion_top + the overview instead of the labelled matrices).
FINAL_FIGURES = [
    ("confusion_counts.png", "confusion matrix, counts",
     "Rows: true class; columns: predicted class; numbers: test images."),
    ("confusion_normalized.png", "confusion matrix, row-normalised",
     "Each row divided by its class's test images: the diagonal is each class's recall."),
    ("confusion_top.png", "most frequent confusions",
     "The most frequent (true → predicted) mistakes."),
    ("per_class_accuracy.png", "per-class accuracy",
     "Share of each class's test images classified correctly (its recall)."),
    ("predictions.png", "test images with true and predicted class",
     "True class, predicted class and the model's confidence; wrong predictions in red."),
    ("top_losses.png", "most confidently wrong test images",
     "Highest loss first: the predicted class and the probability given to the true class."),
]
OVER_BUDGET = 1.1  # elapsed / budget beyond which the report explains where the time went


# ----------------------------------------------------------------------------------------------
# reading


def _run(out: Path, relative: str) -> dict | None:
    """A run named in workflow.json: its config and history, or None when it is gone."""
    run_dir = out / relative
    try:
        return {"config": read_run_config(run_dir), "history": run_history(run_dir)}
    except UserError as exc:
        log.warning("run %s cannot be read (%s): left out of the report", run_dir, exc)
        return None


def _mean_history(histories: list[list[dict]]) -> list[dict]:
    """Epoch-wise mean of several runs' histories (the folds of one k-fold candidate)."""
    if len(histories) == 1:
        return histories[0]
    rows = []
    for epoch_rows in zip(*histories):  # folds of one candidate run the same epochs
        row = {"epoch": epoch_rows[0]["epoch"]}
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            values = [r.get(key) for r in epoch_rows]
            row[key] = None if None in values else float(np.mean(values))
        rows.append(row)
    return rows


def _exploration_split(steps: list[StepRecord], card: dict, state: WorkflowState) -> tuple[int, int]:
    """(training part, validation part) of the split steps 4-7 used, as far as the workflow got.

    The training part is what step 4 measured; validation is the rest of the training split (all
    of it, though a hold-out's epochs may be scored on a fixed subset: runs record that subset).
    """
    n_train = round(card["splits"]["train"]["count"] * (1 - (state.test_split or 0.0)))
    n_part = _metric(steps, 3, "images_used_for_statistics")
    if n_part is None:  # interrupted before step 4: no validation split made yet
        return n_train, 0
    return n_part, n_train - n_part


def _metric(steps: list[StepRecord], index: int, key: str):
    return steps[index].metrics.get(key) if index < len(steps) else None


def _first_run(runs: dict, step: StepRecord | None) -> dict | None:
    if step is None or not step.runs:
        return None
    return runs[step.runs[0]]


def _step(steps: list[StepRecord], index: int) -> StepRecord | None:
    return steps[index] if index < len(steps) else None


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if isinstance(value, float):  # 4 significant digits, but 1.0 stays visibly a float
        text = f"{value:.4g}"
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _recorded(step: StepRecord) -> Markup:
    """The step's numbers exactly as workflow.json has them (keys unchanged, to look them up)."""
    items = {tag("code", k): _fmt(v) for k, v in step.metrics.items()}
    items["seconds"] = duration(step.seconds)
    return Markup(tag("h3", "Recorded numbers") + key_values(items))


def _missing(what: str) -> Markup:
    return paragraph(f"{what} is missing from the output directory, so it is not shown.",
                     class_="muted")


# ----------------------------------------------------------------------------------------------
# the steps


def _step_data(step: StepRecord, out: Path, split: tuple[int, int] | None, state: WorkflowState) -> Markup:
    card = step.card
    if card is None or split is None:
        return Markup("")
    examples = out / (step.figures or {}).get("examples", "examples.png")
    # The run-report section reads "used for training" from a run config: give it the split the
    # exploration steps used.
    used = {"data": {"num_train": split[0], "num_val": split[1], "sha256": card["sha256"]}}
    parts = [data_section(card, used, examples if examples.is_file() else None, None)]
    if state.test_split:
        parts.insert(0, note(f"The source has no test split: {state.test_split:.0%} of each class "
                             "was held out as one before any other step, and used only in step 8."))
    return Markup("".join(parts))


def _baseline_table(m: dict, model: str) -> tuple[Markup, list[float]]:
    subset = f", on a subset of {m['train_subset']:,} training images" if m.get("train_subset") else ""
    rows = [["always predict the majority class", f"{m['majority_baseline_val_acc']:.2%}"],
            ["guess at random", f"{m['random_baseline_val_acc']:.2%}"],
            [f"{model}, {m['epochs']} epochs{subset}", f"{m['small_model_val_acc']:.2%}"]]
    headers = ["predictor", "validation accuracy"]
    scores = [m["majority_baseline_val_acc"], m["random_baseline_val_acc"], m["small_model_val_acc"]]
    if "small_model_val_score" in m:  # step 2 chose another measure: it decides, accuracy is shown beside it
        scores = [m["majority_baseline_val_score"], m["random_baseline_val_score"], m["small_model_val_score"]]
        headers.append(f"validation {m['metric'].replace('_', ' ')}")
        rows = [row + [f"{score:.2%}"] for row, score in zip(rows, scores)]
    best = max(scores)
    return table(headers, rows, numeric=list(range(1, len(headers))), id="baseline-table",
                 row_classes=["best" if s == best else None for s in scores]), scores


def _step_baseline(step: StepRecord, runs: dict, plots: Path) -> Markup:
    m = step.metrics
    if "small_model_val_acc" not in m:  # a record without the numbers: decision and why only
        return Markup("")
    run = _first_run(runs, step)
    model = run["config"]["model"]["name"] if run else "the small model"
    parts = [_baseline_table(m, model)[0]]
    if not m.get("beats_baseline"):
        parts.append(note("The small model DOES NOT BEAT the common-sense baseline: check the "
                          "labels and the data before trusting anything that follows."))
    if run:
        majority, chance = m["majority_baseline_val_acc"], m["random_baseline_val_acc"]
        references = ({"majority class = random guess": majority} if abs(majority - chance) < 1e-9
                      else {"majority class": majority, "random guess": chance})
        curves = figures.training_curves(run["history"], plots / "baseline_curves.png",
                                         f"Step 5: {model}, the small model", references=references)
        parts.append(image(curves, "baseline accuracy and loss per epoch",
                           "The small model's training (blue) and validation (orange) curves; "
                           "the grey dashed levels are the common-sense baselines it must clear."))
    elif step.runs:
        parts.append(_missing(f"The baseline run ({', '.join(step.runs)})"))
    return Markup("".join(parts))


def _step_overfit(step: StepRecord, runs: dict, plots: Path) -> Markup:
    m = step.metrics
    run = _first_run(runs, step)
    if run is None:
        if not step.runs:
            return Markup("")
        return _missing(f"The scaled-up run ({', '.join(step.runs)})")
    history = run["history"]
    epoch = m.get("overfit_epoch")
    curves = figures.training_curves(
        history, plots / "overfit_curves.png", f"Step 6: {m.get('model', '')} without regularisation",
        best_epoch=epoch, best_label=f"overfits after epoch {epoch}" if epoch else None)
    parts = [image(curves, "scaled-up model accuracy and loss per epoch",
                   "Training (blue) vs validation (orange): overfitting is validation loss turning "
                   "up while training loss keeps falling" + (" (dotted line)." if epoch else "."))]
    losses = [(r["epoch"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if losses:
        low_epoch, low = min(losses, key=lambda e: e[1])
        last_epoch, last = losses[-1]
        parts.append(paragraph(f"Validation loss was lowest at epoch {low_epoch} ({low:.4f}) and "
                               f"{last:.4f} at the last epoch ({last_epoch}); training accuracy ended "
                               f"at {history[-1]['train_acc']:.2%}, validation accuracy at "
                               f"{history[-1]['val_acc']:.2%}."))
    return Markup("".join(parts))


def _choice_rule(metric: str, metrics: dict) -> str:
    """How step 7 picked its candidate, in words (selection.choose_candidate)."""
    se = metrics.get("standard_error")
    if se is None:  # a workflow.json from before the one-standard-error rule
        return (f"Candidates are ranked by validation {metric} (step 2's measure), ties broken by "
                "validation loss; the chosen one is highlighted. The test split is not touched.")
    return (f"Candidates are compared by validation {metric} (step 2's measure). One standard error of "
            f"the best score is {se:.2%} here ({metrics.get('scored_images', '?')} validation images): "
            "a candidate at most that far behind counts as tied, and of the tied candidates the one "
            "that regularises most is chosen (the one-standard-error rule). The chosen one is "
            "highlighted. The test split is not touched.")


def _candidates_table(candidates: list[Candidate], chosen: str | None, metric: str) -> Markup:
    folds = max(len(c.runs) for c in candidates)
    over_folds = f" (mean ± std over {folds} folds)" if folds > 1 else ""

    def mean_std(mean: float, std: float) -> str:
        # One hold-out has no spread to show: a "± 0.00%" would read as an exact score.
        return f"{mean:.2%} ± {std:.2%}" if folds > 1 else f"{mean:.2%}"

    headers = ["candidate", "what it changes", "epochs", "validation accuracy" + over_folds]
    rows = [[c.name, c.description, f"{c.settings.get('epochs', '—')}", mean_std(c.val_acc, c.val_acc_std)]
            for c in candidates]
    if metric != "accuracy":
        headers.append(f"validation {metric}" + over_folds)
        rows = [row + ([mean_std(c.val_score, c.val_score_std or 0.0)] if c.val_score is not None else ["—"])
                for row, c in zip(rows, candidates)]
    headers += ["validation loss", "runs"]
    rows = [row + [f"{c.val_loss:.4f}", ", ".join(c.runs)] for row, c in zip(rows, candidates)]
    return table(headers, rows, numeric=list(range(2, len(headers) - 1)), id="candidates-table",
                 row_classes=["best" if c.name == chosen else None for c in candidates])


def _step_tune(step: StepRecord, runs: dict, plots: Path, state: WorkflowState) -> Markup:
    candidates = step.candidates or []
    if not candidates:
        return Markup("")
    chosen = state.chosen.name if state.chosen else None
    metric = (state.metric or "accuracy").replace("_", " ")
    folds = max(len(c.runs) for c in candidates)
    parts = [_candidates_table(candidates, chosen, metric),
             paragraph(_choice_rule(metric, step.metrics), class_="muted")]
    histories = {}
    for c in candidates:
        folds_read = [runs.get(r) for r in c.runs]
        if all(folds_read):
            histories[c.name] = _mean_history([r["history"] for r in folds_read])
    if histories:
        curves = figures.compare_curves(
            histories, plots / "candidates_curves.png",
            "Step 7: candidates on validation" + (f" (mean over {folds} folds)" if folds > 1 else ""))
        parts.append(image(curves, "validation accuracy and loss of every candidate",
                           "Validation (solid) and training (dashed) curves, one colour per "
                           "candidate."))
    if chosen:
        parts.append(tag("h3", "The chosen configuration (retrained in step 8)"))
        parts.append(key_values({tag("code", k): _fmt(v) for k, v in state.chosen.settings.items()}))
    return Markup("".join(parts))


def _final_metrics(final: Path) -> Markup:
    metrics = read_metrics(final)

    def both(v):
        return f"{v:.4f} ({v:.2%})"

    return key_values({
        "test accuracy": both(metrics["accuracy"]),
        "balanced accuracy": both(metrics["balanced_accuracy"]),
        "macro F1": f"{metrics['macro_f1']:.4f}",
        "loss (cross-entropy)": f"{metrics['loss']:.4f}",
        "majority-class baseline": f"{both(metrics['majority_baseline_accuracy'])}, always "
                                   f"predicting '{metrics['majority_class']}'",
        "random baseline": both(metrics["random_baseline_accuracy"]),
        "test images": f"{metrics['num_images']:,}",
    }, id="final-metrics")


def _final_figures(final: Path) -> list[Markup]:
    plots = RunPaths(final).plots
    parts = []
    if not any((plots / name).is_file() for name, _, _ in FINAL_FIGURES):
        parts.append(note(f"The final run's figures are missing: draw them with 'imgflow report "
                          f"{final}' and write this report again."))
    shown = {name: image(plots / name, alt, caption) for name, alt, caption in FINAL_FIGURES
             if (plots / name).is_file()}
    confusion = [shown.pop(name) for name in list(shown) if name.startswith("confusion")]
    parts.append(side_by_side(*confusion))
    parts.extend(shown.values())
    if not (plots / "top_losses.png").is_file() and (plots / "predictions.png").is_file():
        parts.append(paragraph("No top-losses figure: no test image was misclassified.", class_="muted"))
    return parts


def _step_final(step: StepRecord, out: Path) -> Markup:
    runs = step.runs or []
    final = out / runs[0] if runs else None
    parts = []
    if final is not None and RunPaths(final).metrics.is_file():
        parts.append(_final_metrics(final))
    if final is not None and final.is_dir():
        parts.extend(_final_figures(final))
    elif runs:
        parts.append(_missing(f"The final run ({runs[0]})"))
    if step.usage:
        parts.append(tag("h3", "How to use the model"))
        parts.append(tag("pre", tag("code", step.usage)))
    if runs:
        parts.append(paragraph(
            f"The final model (model.safetensors), its configuration, test predictions and its own "
            f"detailed report (report.html: per-class metrics, most-confused pairs, machine and "
            f"library versions) are in the run directory {final}.", class_="muted"))
    return Markup("".join(parts))


# ----------------------------------------------------------------------------------------------
# summary and budget


def _headline(record: WorkflowRecord) -> list[Markup]:
    steps, acc = record.steps, record.test_accuracy
    if acc is None or len(steps) != NUM_STEPS:
        return [note(f"The workflow stopped after step {len(steps)} of {NUM_STEPS}: run the same "
                     "'imgflow workflow' command with the same --out to continue it.")]
    final = steps[-1].metrics
    majority = final.get("majority_baseline_accuracy")
    text = [" on the test split, used once, at the end"]
    if majority is not None:
        text.append(f" — majority-class baseline {majority:.2%}")
    metric = record.state.metric or "accuracy"
    if metric != "accuracy" and final.get(f"test_{metric}") is not None:
        text.append(f"; test {metric.replace('_', ' ')} {final[f'test_{metric}']:.2%}, the "
                    "measure of success chosen in step 2")
    parts = [paragraph("Test accuracy ", tag("span", number(acc, f"{acc:.2%}", id="test-accuracy"), class_="big"),
                       "".join(text) + ".", class_="headline")]
    if majority is not None and acc <= majority:
        parts.append(note("The final model does not beat the majority-class baseline."))
    return parts


def _summary(record: WorkflowRecord) -> Markup:
    parts = _headline(record)
    budget, elapsed = record.budget_minutes, record.elapsed_minutes
    taken = "—"
    if elapsed is not None:
        taken = duration(60 * elapsed) + (f" ({elapsed / budget:.0%} of the budget)" if budget else "")
    parts.append(key_values({"data": record.data, "seed": record.seed,
                             "time budget": duration(60 * budget) if budget else "—",
                             "time taken": taken}, id="workflow-info"))
    rows = [[i, s.name, s.decision, duration(s.seconds)] for i, s in enumerate(record.steps, 1)]
    parts.append(table(["#", "step", "decision", "time"], rows, numeric=[0, 3], id="steps-table"))
    return Markup("".join(parts))


def _tune_command(record: WorkflowRecord, runs: dict) -> str | None:
    """`imgflow tune` with the chosen step-7 run's settings as its base, or None without that run."""
    from imgflow.training.config import OPTION_OF, TrainConfig, command_line_options

    chosen_record = record.state.chosen
    if chosen_record is None:
        return None
    chosen = runs.get(chosen_record.run or next(iter(chosen_record.runs), None))
    if chosen is None:
        return None
    config = TrainConfig.from_dict(chosen["config"]["train"])
    options = command_line_options({k: v for k, v in config.to_dict().items() if k in OPTION_OF})
    out = Path(record.final_run or "runs/x").parent.parent / "tune"  # beside runs/, in OUT
    return " ".join(["imgflow", "tune", shlex.quote(config.data), *options, "--trials", "20", "--out", str(out)])


def _runs_table(steps: list[StepRecord], runs: dict) -> Markup:
    """Every training run, with the epochs and images the budget allowed it."""
    rows = []
    for step_index, step in enumerate(steps, 1):
        for relative in step.runs or []:
            run = runs[relative]
            if run is None:
                continue
            config, result = run["config"], run["config"].get("result", {})
            rows.append([step_index, relative, config["model"]["name"], len(run["history"]),
                         f"{config['data']['num_train']:,}", duration(result.get("train_seconds"))])
    return Markup(paragraph("Every model the workflow trained, with the epochs and training images the "
                            "budget allowed it (fewer images than the training part means a subset).")
                  + tag("div", table(["step", "run", "model", "epochs", "training images", "training time"],
                                     rows, numeric=[0, 3, 4, 5], id="runs-table"), class_="scroll"))


def _share_findings(record: WorkflowRecord, constants: Constants) -> list[str]:
    share = constants.budget_share
    findings = [f"Steps 5, 6 and 7 could spend {share['baseline']:.0%}, {share['overfit']:.0%} and "
                f"{share['tune']:.0%} of the budget; the final run got what they left, less the time its "
                "test evaluation and the reports need."]
    budget, elapsed = record.budget_minutes, record.elapsed_minutes
    if budget and elapsed is not None and elapsed > OVER_BUDGET * budget:
        findings.append(f"The workflow took {duration(60 * elapsed)} for a {duration(60 * budget)} "
                        "budget. The budget sizes the training runs; loading data, measuring speed, "
                        "evaluating and drawing figures come on top and weigh most in small budgets "
                        "(the summary's table has each step's time).")
    if _metric(record.steps, 4, "train_subset"):
        findings.append(f"The baseline model saw a subset of {_metric(record.steps, 4, 'train_subset'):,} "
                        "training images per epoch; more time would train it on all of them.")
    return findings


def _overfit_findings(m: dict, constants: Constants) -> list[str]:
    findings = []
    if m.get("train_subset"):
        findings.append(f"The scaled-up model ({m['model']}) trained on a subset of {m['train_subset']:,} "
                        "images per epoch: more time would use the whole training part.")
    if m.get("model_rule") == "final run affords it" and m.get("model") != constants.scaled_models[0]:
        findings.append(f"{m['model']} was the largest fast model whose final run the budget could give "
                        f"{constants.final_min_epochs} epochs on all the images; more time would buy a larger one.")
    elif m.get("model_rule") == "smallest":
        findings.append(f"Not even {m['model']}'s final run could get {constants.final_min_epochs} epochs on all "
                        "the images within the budget; it was taken as the smallest fast model.")
    if m.get("overfit_epoch"):
        findings.append(f"{m['model']} overfit after epoch {m['overfit_epoch']} of {m['epochs']}: "
                        "the budget was enough to find where more training stops helping.")
    elif m.get("memorises"):
        findings.append(f"{m['model']} memorised its training images within {m['epochs']} epochs "
                        "(step 6), but its validation loss had not turned up: more epochs would show "
                        "where more training stops helping.")
    else:
        findings.append(f"{m['model']} did not overfit within {m['epochs']} epochs: the budget "
                        "ended before the capacity limit was found. More time would buy more "
                        "epochs (until validation loss turns up) and, with them, a better model "
                        "to regularise.")
    return findings


def _tune_findings(record: WorkflowRecord, runs: dict) -> list[str]:
    steps = record.steps
    tune_epochs, overfit_epochs = steps[6].metrics.get("epochs"), _metric(steps, 5, "epochs")
    candidates = steps[6].candidates or []
    # The candidates include "none", the unregularised reference (the step-6 run), and a pretrained
    # backbone's two (planned by step 6, at their own epochs and input size).
    n = sum(1 for c in candidates if c.name != "none" and not c.name.startswith("backbone-"))
    sentence = (f"{plural(n, 'regularised candidate')} trained {tune_epochs} epochs each, compared with the "
                "unregularised reference")
    if tune_epochs and overfit_epochs and tune_epochs < overfit_epochs:
        sentence += (f", fewer than the {overfit_epochs} of the overfitting run: regularisation "
                     "pays off late, so longer candidate runs could rank them differently")
    findings = [sentence + "."]
    if comparison := steps[6].metrics.get("pretrained_comparison"):
        findings.append(f"The pretrained backbone hf:{comparison['backbone']} was tried as two more candidates, "
                        "with their own epochs at its own input size (step 6): frozen features "
                        f"{comparison['frozen']:.4f}, fine-tuned {comparison['finetuned']:.4f}.")
    folds = _metric(steps, 2, "folds")
    if _metric(steps, 2, "kind") == "k-fold" and candidates and max(len(c.runs) for c in candidates) < (folds or 0):
        findings.append(f"Step 3 chose {folds}-fold cross-validation, but the budget paid for no candidate on "
                        f"all {folds} folds: every validation score is fold 0's, a 1/{folds} hold-out.")
    if command := _tune_command(record, runs):
        findings.append(Markup(f"A wider search than these fixed candidates, on the same data, "
                               f"model and epochs (validation only): {tag('code', command)}"))
    return findings


def _final_findings(steps: list[StepRecord], final: dict, split: tuple[int, int], constants: Constants) -> list[str]:
    used, total = final["config"]["data"]["num_train"], sum(split)
    findings = [f"The final model was retrained on {used:,} of the {total:,} training and validation "
                "images; more time would retrain it on all of them." if used < total else
                f"The final model was retrained on all {total:,} training and validation images."]
    epochs, validated = _metric(steps, 7, "epochs"), _metric(steps, 7, "validated_epochs")
    if epochs and validated and epochs < validated:
        findings.append(f"It trained {plural(epochs, 'epoch')}, fewer than the {validated} validated in step 7: "
                        f"the budget cuts passes before it cuts images. More time would give it all {validated}.")
    elif epochs and validated and epochs > validated:
        findings.append(f"It trained {epochs} epochs, more than the {validated} validated in step 7: the rest of "
                        f"the budget paid for them (at most {constants.final_epochs_factor}x the validated epochs).")
    return findings


def _budget(record: WorkflowRecord, runs: dict, split: tuple[int, int] | None) -> Markup:
    """Where the time went (one row per training run) and what the budget cut short."""
    steps = record.steps
    constants = record.constants or Constants.current()
    parts = [_runs_table(steps, runs)]
    if record.constants is None:
        parts.append(note("This workflow.json predates the recorded constants: the budget shares, epochs "
                          "and models quoted below are today's, which may differ from those this run used."))
    findings = _share_findings(record, constants)
    if len(steps) > 5 and "overfit_epoch" in steps[5].metrics:
        findings += _overfit_findings(steps[5].metrics, constants)
    if len(steps) > 6:
        findings += _tune_findings(record, runs)
    final = _first_run(runs, _step(steps, 7))
    if final is not None and split is not None:
        findings += _final_findings(steps, final, split, constants)
    resize = record.state.resize
    if resize is not None and resize.image_size and resize.limit in ("budget", "smallest"):
        (h, w), (H, W) = resize.image_size, resize.typical_size
        findings.append(f"The images were trained at {h}x{w} instead of their {H}x{W} (step 4): more "
                        "time would buy a larger working size, and with it more detail to learn from.")
    parts.append(tag("ul", *(tag("li", f) for f in findings)))
    return Markup("".join(parts))


# ----------------------------------------------------------------------------------------------
# the report


def write_workflow_report(out_dir: Path) -> Path:
    """Write OUT/report.html (and OUT/plots/*.png) from the workflow in `out_dir`; return its path."""
    out = Path(out_dir)
    record_path = out / "workflow.json"
    if not record_path.is_file():
        raise UserError(f"{out} holds no workflow.json: it is not an 'imgflow workflow' output "
                        f"directory (run 'imgflow workflow DATA --out {out}' first)")
    record = read_workflow_record(record_path)
    steps, state = record.steps, record.state
    plots = out / "plots"
    runs = {relative: _run(out, relative) for step in steps for relative in step.runs or []}
    card = steps[0].card if steps else None
    split = _exploration_split(steps, card, state) if card else None
    for name in FIGURES:  # an earlier report's figures: a step that draws none now leaves none
        (plots / name).unlink(missing_ok=True)

    bodies = {
        0: lambda s: _step_data(s, out, split, state),
        4: lambda s: _step_baseline(s, runs, plots),
        5: lambda s: _step_overfit(s, runs, plots),
        6: lambda s: _step_tune(s, runs, plots, state),
        7: lambda s: _step_final(s, out),
    }
    sections = [("summary", "Summary", _summary(record))]
    for i, step in enumerate(steps):
        log.info("report: step %d/%d", i + 1, len(steps))
        body = Markup(paragraph(tag("strong", "Decision: "), step.decision)
                      + paragraph(tag("strong", "Why: "), step.why)
                      + (bodies[i](step) if i in bodies else "")
                      + _recorded(step))
        sections.append((f"step-{i + 1}", f"Step {i + 1}: {step.name}", body))
    sections.append(("budget", "What the budget allowed and what more time would buy",
                     _budget(record, runs, split)))

    html = page(f"imgflow workflow: {record.data or ''}",
                f"The universal workflow of machine learning in {len(steps)} steps, "
                f"from {record_path.name}", sections)
    report = out / "report.html"
    atomic_write_text(report, html)
    log.info("workflow report written to %s", report)
    return report
