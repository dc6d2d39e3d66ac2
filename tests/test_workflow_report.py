"""The workflow report: OUT/report.html tells the eight steps in order, self-contained, escaped.

A full `run_workflow` takes about a minute here, so the fixture builds a consistent workflow
output directory for less: steps 1-4 are the workflow's own (cheap) step functions on a tiny
k-fold-sized folder; steps 5-8 point at copies of one tiny trained run, with an overfitting
history written for step 6 and judged by the workflow's own detector.
"""
from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import time
from pathlib import Path

import pytest

import imgflow.workflow as wf
from conftest import train_tiny
from datagen import make_image_folder
from imgflow.errors import UserError
from imgflow.workflow import steps as wf_steps
from imgflow.workflow.budget import BUDGET_SHARE, FINAL_MIN_EPOCHS
from imgflow.workflow.context import Context
from imgflow.workflow.record import Candidate, StepRecord, WorkflowState
from imgflow.workflow.report import FIGURES, FINAL_FIGURES, _exploration_split, _step_tune, write_workflow_report

CLASSES = ("a", "b", "<c&d>")  # a class name that would be markup if not escaped
CANDIDATES = ("augment", "augment+smooth+decay")
FOLDS = 5  # what step 3 decides for 16 training images per class
OVERFIT_VAL_LOSS = [1.0, 0.8, 0.7, 0.75, 0.8]  # lowest at epoch 3, then rises twice
# Constants unlike today's, as an older version would have recorded them: the report quotes these.
RECORDED_CONSTANTS = {"budget_share": {"baseline": 0.07, "overfit": 0.2, "tune": 0.3, "final": 0.25},
                      "final_min_epochs": 5, "final_epochs_factor": 2,
                      "scaled_models": ["fast-large", "fast-medium", "fast-small"]}


def _write_history(path: Path, val_losses: list[float]) -> list[dict]:
    rows = [{"epoch": i + 1, "train_loss": 1.0 - 0.15 * i, "train_acc": 0.5 + 0.1 * i,
             "val_loss": v, "val_acc": 0.6 + 0.05 * i, "lr": 0.01, "seconds": 0.1}
            for i, v in enumerate(val_losses)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def workflow_out(tmp_path_factory) -> Path:
    from imgflow.evaluation import evaluate_run
    from imgflow.reports import report_run
    from imgflow.history import run_history

    root = tmp_path_factory.mktemp("wfr")
    data = make_image_folder(root / "data", classes=CLASSES, per_class=20, size=(8, 8))
    (data / "train" / "a" / "broken.png").write_bytes(b"not a png")
    out = root / "out"
    ctx = Context(data=str(data), out=out, seed=0, budget_seconds=18, started=time.perf_counter(),
                  elapsed_before=0.0, progress=False, state=WorkflowState())
    steps = [wf_steps.step_data(ctx), wf_steps.step_metric(ctx), wf_steps.step_protocol(ctx),
             wf_steps.step_prepare(ctx)]
    assert ctx.state.protocol.kind == "k-fold" and ctx.state.protocol.folds == FOLDS

    runs = out / "runs"
    final = runs / "8-final"
    train_tiny(data, final, epochs=2, folds=FOLDS, fold=0)
    metrics = evaluate_run(final, progress=False)
    report_run(final)
    top_losses = final / "plots" / "top_losses.png"
    if not top_losses.exists():  # the tiny model makes no mistakes: stand in for one that does
        shutil.copy(final / "plots" / "predictions.png", top_losses)
    history = run_history(final)
    folds = [f"7-{c}-fold{k}" for c in CANDIDATES for k in range(FOLDS)]
    for name in ["5-baseline", "6-overfit", *folds]:
        shutil.copytree(final, runs / name,
                        ignore=shutil.ignore_patterns("plots", "report.html", "checkpoint"))
    overfit = _write_history(runs / "6-overfit" / "history.csv", OVERFIT_VAL_LOSS)

    score = history[-1]["val_acc"]
    steps.append(StepRecord(wf.STEP_NAMES[4], "seed-baseline beats both", "baselines",
                            {"majority_baseline_val_acc": 1 / 3, "random_baseline_val_acc": 1 / 3,
                             "small_model_val_acc": score, "epochs": 2, "train_subset": 0,
                             "beats_baseline": score > 1 / 3}, runs=["runs/5-baseline"]))
    epoch = wf.detect_overfitting(overfit)
    steps.append(StepRecord(wf.STEP_NAMES[5], f"overfits after epoch {epoch}", "curves",
                            {"model": "seed-baseline", "epochs": len(overfit), "train_subset": 0,
                             "overfit_epoch": epoch, "final_train_acc": overfit[-1]["train_acc"],
                             "final_val_acc": overfit[-1]["val_acc"]}, runs=["runs/6-overfit"]))
    # Candidates as a record from before val_score and regularisation were kept has them.
    candidates = [Candidate(name=c, description=f"{c} <b>", settings={"epochs": 2, "augment": c},
                            val_acc=score - 0.01 * i, val_acc_std=0.02, val_loss=0.9,
                            runs=[f"runs/7-{c}-fold{k}" for k in range(FOLDS)])
                  for i, c in enumerate(CANDIDATES)]
    ctx.state.chosen = candidates[0]
    steps.append(StepRecord(wf.STEP_NAMES[6], f"chose '{CANDIDATES[0]}'", "validation only",
                            {"candidates": {c.name: c.val_acc for c in candidates}, "epochs": 2,
                             "standard_error": 0.0913, "scored_images": 60},
                            runs=[r for c in candidates for r in c.runs], candidates=candidates))
    steps.append(StepRecord(wf.STEP_NAMES[7], "retrained and tested once", "test once",
                            {"test_accuracy": metrics["accuracy"],
                             "majority_baseline_accuracy": metrics["majority_baseline_accuracy"],
                             "epochs": 2, "validated_epochs": 3}, runs=["runs/8-final"],
                            usage=f"imgflow predict {final} IMAGE.jpg"))
    for step in steps:
        step.seconds = 1.0
    record = {"data": str(data), "seed": 0, "budget_minutes": 0.3, "elapsed_minutes": 0.5,
              "constants": RECORDED_CONSTANTS, "steps": [s.to_dict() for s in steps], "state": ctx.state.to_dict(),
              "final_run": str(final), "test_accuracy": metrics["accuracy"]}
    (out / "workflow.json").write_text(json.dumps(record))
    return out


@pytest.fixture(scope="module")
def report(workflow_out) -> str:
    path = write_workflow_report(workflow_out)
    assert path == workflow_out / "report.html"
    return path.read_text(encoding="utf-8")


def test_the_eight_steps_appear_in_order_then_the_budget(report):
    headings = re.findall(r"<h2>(.*?)</h2>", report)
    assert headings == (["Summary"] + [f"Step {i}: {name}" for i, name in enumerate(wf.STEP_NAMES, 1)]
                        + ["What the budget allowed and what more time would buy"])
    assert "overfit after epoch 3 of 5" in report  # the budget section reads step 6's detection
    assert "mean ± std over 5 folds" in report  # the k-fold candidate table
    assert "9.13% here (60 validation images)" in report and "one-standard-error rule" in report
    assert "fewer than the 3 validated" in report  # step 8 cut epochs to keep all the images
    assert "2 regularised candidates trained 2 epochs each" in report  # "none" would not count
    assert re.search(r"<code>imgflow tune \S+ --model seed-baseline .*--folds 5.* --trials 20 --out \S+/tune</code>",
                     report)  # a wider search, based on the chosen run


def test_every_figure_is_embedded_from_its_file(workflow_out, report):
    final_plots = workflow_out / "runs" / "8-final" / "plots"
    final_figures = [final_plots / name for name, _, _ in FINAL_FIGURES]
    expected = ([workflow_out / "examples.png"] + [workflow_out / "plots" / f for f in FIGURES]
                + [p for p in final_figures if p.is_file()])
    assert all(p.is_file() for p in expected[:4])  # examples + the workflow's three figures
    assert {"confusion_normalized.png", "predictions.png", "top_losses.png"} <= {p.name for p in expected}
    sources = re.findall(r'<img src="([^"]*)"', report)
    assert sources == [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"
                       for p in expected]


def test_report_is_self_contained_and_escaped(report):
    assert "<script" not in report.lower() and "http:" not in report and "https:" not in report
    assert "<link" not in report and "@import" not in report and "url(" not in report
    assert all(v.startswith("data:image/png;base64,") for v in re.findall(r'\ssrc="([^"]*)"', report))
    assert all(v.startswith("#") for v in re.findall(r'\shref="([^"]*)"', report))
    assert "<c&d>" not in report and "&lt;c&amp;d&gt;" in report
    assert "<b>" not in report and "augment &lt;b&gt;" in report
    assert "broken.png" in report  # the skipped-files list of step 1


def test_headline_test_accuracy_is_workflow_json_s(workflow_out, report):
    record = json.loads((workflow_out / "workflow.json").read_text())
    value = re.search(r'id="test-accuracy" class="value" data-value="([^"]+)"', report).group(1)
    assert float(value) == record["test_accuracy"]
    assert f"{record['test_accuracy']:.2%}" in report


def test_an_interrupted_workflow_gets_a_report_of_its_steps_so_far(workflow_out, tmp_path):
    record = json.loads((workflow_out / "workflow.json").read_text())
    record["steps"] = record["steps"][:4]
    del record["final_run"], record["test_accuracy"]
    shutil.copy(workflow_out / "examples.png", tmp_path / "examples.png")
    (tmp_path / "workflow.json").write_text(json.dumps(record))
    html = write_workflow_report(tmp_path).read_text()
    assert re.findall(r"<h2>Step (\d):", html) == ["1", "2", "3", "4"]
    assert "stopped after step 4 of 8" in html and 'id="test-accuracy"' not in html


def test_a_record_of_decisions_only_still_gets_a_report(tmp_path):
    steps = [{"name": name, "decision": f"d{i}", "why": "w", "metrics": {}}
             for i, name in enumerate(wf.STEP_NAMES)]
    (tmp_path / "workflow.json").write_text(json.dumps({"data": "d", "steps": steps}))
    html = write_workflow_report(tmp_path).read_text()
    assert re.findall(r"<h2>Step (\d):", html) == [str(i) for i in range(1, 9)]
    assert "<img" not in html


@pytest.mark.parametrize("record, detail", [
    ([], "the file is a list, expected an object"),
    ({"data": "d", "steps": "x"}, "'steps' is a string (\"x\"), expected a list"),
    ({"data": "d", "steps": [{"name": "n", "decision": 3, "why": "w"}]}, "'steps.1.decision' is a number (3)"),
    ({"data": "d", "steps": [], "state": {"chosen": {"settings": []}}}, "'state.chosen.settings' is a list"),
])
def test_a_damaged_workflow_json_gets_no_report(tmp_path, record, detail):
    (tmp_path / "workflow.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=re.escape(f"workflow.json is not a valid imgflow workflow record: {detail}")):
        write_workflow_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_missing_workflow_json_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no workflow\.json.*imgflow workflow DATA --out"):
        write_workflow_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_final_model_sentence_counts_the_whole_training_split(workflow_out, report):
    record = json.loads((workflow_out / "workflow.json").read_text())
    card = record["steps"][0]["card"]
    used = json.loads((workflow_out / "runs" / "8-final" / "config.json").read_text())["data"]["num_train"]
    total = card["splits"]["train"]["count"]
    assert f"retrained on {used:,} of the {total:,} training and validation images" in report


def test_exploration_split_is_the_training_part_and_all_of_validation():
    # A hold-out scores its epochs on a fixed subset (5,000 of CIFAR-10's 10,000 held out);
    # the split is still 40,000 + 10,000.
    card = {"splits": {"train": {"count": 50_000}}}
    steps = [StepRecord(name, "", "") for name in wf.STEP_NAMES[:4]]
    assert _exploration_split(steps[:3], card, WorkflowState()) == (50_000, 0)  # before step 4 made a split
    steps[3].metrics["images_used_for_statistics"] = 40_000
    assert _exploration_split(steps, card, WorkflowState()) == (40_000, 10_000)
    steps[3].metrics["images_used_for_statistics"] = 32_000  # the source had no test split
    assert _exploration_split(steps, card, WorkflowState(test_split=0.2)) == (32_000, 8_000)


def test_a_single_hold_out_shows_no_spread_in_the_candidate_table(tmp_path):
    # One run per candidate: a "± 0.00%" would read as an exact score.
    candidates = [Candidate(name=name, description=name, settings={"epochs": 6}, val_acc=acc, val_acc_std=0.0,
                            val_score=acc, val_score_std=0.0, val_loss=0.9, runs=[f"runs/{name}"])
                  for name, acc in (("none", 0.698), ("augment", 0.7022))]
    state = WorkflowState(metric="balanced_accuracy", chosen=candidates[1])
    html = str(_step_tune(StepRecord("regularise and tune", "", "", candidates=candidates), {}, tmp_path, state))
    assert "70.22%" in html and "±" not in html


def _decisions_record(**extra) -> dict:
    """A record of decisions only, in which step 6 took fast-medium as the largest affordable model."""
    steps = [StepRecord(name, f"d{i}", "w") for i, name in enumerate(wf.STEP_NAMES)]
    steps[5].metrics = {"model": "fast-medium", "model_rule": "final run affords it", "epochs": 6,
                        "overfit_epoch": None}
    return {"data": "d", "steps": [s.to_dict() for s in steps], **extra}


def test_an_old_record_is_explained_with_the_constants_its_run_used(tmp_path, report):
    """Issue 23, defect c: the report quoted today's constants for any workflow.json."""
    assert "Steps 5, 6 and 7 could spend 7%, 20% and 30% of the budget" in report and "predates" not in report
    (tmp_path / "workflow.json").write_text(json.dumps(_decisions_record(constants=RECORDED_CONSTANTS)))
    html = write_workflow_report(tmp_path).read_text()
    assert "fast-medium was the largest fast model whose final run the budget could give 5 epochs" in html
    assert "predates" not in html
    # A record from before the constants were recorded: today's, and the report says so.
    (tmp_path / "workflow.json").write_text(json.dumps(_decisions_record()))
    html = write_workflow_report(tmp_path).read_text()
    assert f"could give {FINAL_MIN_EPOCHS} epochs" in html and "predates the recorded constants" in html
    assert f"could spend {BUDGET_SHARE['baseline']:.0%}" in html


def test_a_damaged_constants_record_gets_no_report(tmp_path):
    (tmp_path / "workflow.json").write_text(json.dumps(_decisions_record(constants={**RECORDED_CONSTANTS,
                                                                                     "final_min_epochs": "8"})))
    detail = "'constants.final_min_epochs' is a string (\"8\"), expected an integer"
    with pytest.raises(UserError, match=re.escape(detail)):
        write_workflow_report(tmp_path)


def test_imgflow_report_of_a_workflow_directory_writes_the_workflow_report(workflow_out, tmp_path, capsys):
    from imgflow.cli import main

    (workflow_out / "report.html").unlink(missing_ok=True)
    assert main(["report", str(workflow_out)]) == 0
    assert "<h2>Step 8: test once and deploy</h2>" in (workflow_out / "report.html").read_text()
    assert main(["report", str(workflow_out), "--out", str(tmp_path / "r")]) == 2
    assert "is a workflow" in capsys.readouterr().err
