"""`imgflow workflow`: the eight steps, the budget logic, resume, and bad input."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import imgflow.workflow as wf
from datagen import make_image_folder
from imgflow.cli import main
from imgflow.errors import UserError
from imgflow.workflow import budget, context, image_size, recipes, selection, steps, throughput, training_runs, wording
from imgflow.workflow import run as wf_run
from imgflow.workflow.decisions import OverfitOutcome
from imgflow.workflow.record import STATE_LEFT_BY_STEP, Candidate, Protocol, Resize, Scaled, StepRecord, WorkflowState


@pytest.fixture(scope="module")
def workflow_data(tmp_path_factory) -> Path:
    """80 8x8 images per class in one folder (a test split is held out, and then enough remain
    for a validation hold-out), plus one broken file."""
    root = make_image_folder(tmp_path_factory.mktemp("wf") / "data", per_class=80, size=(8, 8), test=False)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


@pytest.fixture(scope="module")
def finished_workflow(workflow_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wf-out") / "out"
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        # A cap under the hold-out's size, as CIFAR-10 meets it: exploration validates on part of it.
        mp.setattr(steps, "VALIDATION_CAP", 24)
        record = wf.run_workflow(str(workflow_data), out, budget_minutes=0.5, seed=0, progress=False, threads=1)
    return out, record, time.perf_counter() - t0


def test_workflow_walks_through_the_eight_steps_in_order(finished_workflow):
    out, record, seconds = finished_workflow
    print(f"tiny workflow took {seconds:.1f} s")
    saved = json.loads((out / "workflow.json").read_text())
    assert [s["name"] for s in saved["steps"]] == wf.STEP_NAMES
    for step in saved["steps"]:
        assert step["decision"] and step["why"] and isinstance(step["metrics"], dict)
    assert saved["budget_minutes"] == 0.5 and saved["elapsed_minutes"] > 0
    # The constants the report quotes, as this run had them (issue 23, defect c).
    assert saved["constants"] == {"budget_share": budget.BUDGET_SHARE, "final_min_epochs": budget.FINAL_MIN_EPOCHS,
                                  "final_epochs_factor": budget.FINAL_EPOCHS_FACTOR,
                                  "scaled_models": list(budget.SCALED_MODELS)}
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    final = Path(saved["final_run"])
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["accuracy"] == saved["test_accuracy"]
    assert saved["test_accuracy"] > metrics["majority_baseline_accuracy"]  # the data is learnable


def test_workflow_decisions_and_broken_files(finished_workflow):
    out, record, _ = finished_workflow
    steps = {s["name"]: s for s in record["steps"]}
    assert steps["define the problem and assemble the data"]["metrics"]["skipped_files"] == 1
    assert steps["choose a measure of success"]["metrics"]["balance_ratio"] <= 1.5
    assert steps["choose a measure of success"]["decision"] == "measure success by accuracy"
    assert steps["decide an evaluation protocol"]["metrics"]["kind"] == "hold-out"
    assert steps["decide an evaluation protocol"]["metrics"]["val_subset"] == 24  # the fixture's cap
    overfit = json.loads((out / "runs" / "6-overfit" / "config.json").read_text())
    final = json.loads((out / "runs" / "8-final" / "config.json").read_text())
    assert overfit["data"]["num_val"] == 24 and final["data"]["num_val"] == 0
    assert final["train"]["val_subset"] == 0 and final["train"]["val_split"] == 0
    assert overfit["train"]["threads"] == final["train"]["threads"] == 1  # the workflow's --threads
    baseline = steps["beat a common-sense baseline"]["metrics"]
    assert baseline["majority_baseline_val_acc"] == pytest.approx(1 / 3, abs=0.05)
    assert baseline["beats_baseline"] is True
    tune = steps["regularise and tune"]
    assert len(tune["candidates"]) >= 1 and tune["decision"].startswith("chose")
    assert all((out / run).is_dir() for step in record["steps"] for run in step.get("runs", []))
    assert (out / "examples.png").is_file()
    # The final model trained on flips and shifts is tested on those views (TTA), and only then.
    final_metrics = json.loads((out / "runs" / "8-final" / "metrics.json").read_text())
    assert final_metrics["tta"] == ("flip" in final["train"]["augment"])
    assert steps["test once and deploy"]["metrics"]["tta"] == final_metrics["tta"]


def test_rerunning_a_finished_workflow_redoes_nothing(finished_workflow, workflow_data, monkeypatch):
    out, record, _ = finished_workflow
    calls = []
    monkeypatch.setattr(wf_run, "STEPS", [lambda ctx, i=i: calls.append(i) for i in range(8)])
    again = wf.run_workflow(str(workflow_data), out, budget_minutes=0.5, seed=0, progress=False)
    assert calls == [] and again["test_accuracy"] == record["test_accuracy"]
    assert again["elapsed_minutes"] == record["elapsed_minutes"]  # rewriting the report adds no time


def test_interrupted_workflow_resumes_after_the_last_finished_step(workflow_data, tmp_path, monkeypatch):
    calls = []
    left = {"test_split": 0.0, "classes": ["a", "b"], "metric": "accuracy",
            "protocol": Protocol("hold-out", val_split=0.2)}

    def fake(i):
        def step(ctx):
            calls.append(i)
            if i == 4 and calls.count(4) == 1:
                raise KeyboardInterrupt
            for key in STATE_LEFT_BY_STEP.get(i + 1, ()):
                setattr(ctx.state, key, left.get(key))
            return StepRecord(wf.STEP_NAMES[i], f"d{i}", "w")
        return step

    monkeypatch.setattr(wf_run, "STEPS", [fake(i) for i in range(8)])
    with pytest.raises(KeyboardInterrupt):
        wf.run_workflow(str(workflow_data), tmp_path / "out", budget_minutes=1, progress=False)
    assert calls == [0, 1, 2, 3, 4]
    assert len(json.loads((tmp_path / "out" / "workflow.json").read_text())["steps"]) == 4
    wf.run_workflow(str(workflow_data), tmp_path / "out", budget_minutes=1, progress=False)
    assert calls == [0, 1, 2, 3, 4, 4, 5, 6, 7]


def test_a_step_interrupted_before_it_ends_continues_with_its_saved_plan(workflow_data, tmp_path,
                                                                            monkeypatch):
    """Re-planning on resume would change the run's settings (and the engine would refuse them)."""
    import imgflow.training.loop as training_loop

    real_train = training_loop.train
    speeds = iter([1e6] + [5.0] * 20)  # the machine looks 200,000x slower on the second invocation
    monkeypatch.setattr(steps, "measure_throughput", lambda ctx, model, batch: next(speeds))

    def interrupted(config, run_dir, **kwargs):
        real_train(config, run_dir, **kwargs)
        raise KeyboardInterrupt  # after the baseline run's last checkpoint, before the step ends

    monkeypatch.setattr(training_loop, "train", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        wf.run_workflow(str(workflow_data), out, budget_minutes=0.5, seed=0, progress=False)
    record = json.loads((out / "workflow.json").read_text())
    planned = record["state"]["plans"]["5-baseline"]["settings"]
    assert len(record["steps"]) == 4 and record["elapsed_minutes"] > 0  # the time spent is counted
    elapsed_before = record["elapsed_minutes"]

    monkeypatch.setattr(training_loop, "train", real_train)
    monkeypatch.setattr(wf_run, "STEPS", steps.STEPS[:5])  # the baseline step is what this test is about
    again = wf.run_workflow(str(workflow_data), out, budget_minutes=0.5, seed=0, progress=False)
    baseline = again["steps"][4]["metrics"]
    assert (baseline["epochs"], baseline["train_subset"]) == (planned["epochs"], planned["train_subset"])
    assert baseline["train_images_per_second"] == 1e6  # the first plan's probe, not a new one
    config = json.loads((out / "runs" / "5-baseline" / "config.json").read_text())["train"]
    assert config["epochs"] == planned["epochs"] and again["elapsed_minutes"] > elapsed_before


def test_a_workflow_continues_only_with_its_own_budget(workflow_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wf_run, "STEPS", steps.STEPS[:2])
    wf.run_workflow(str(workflow_data), tmp_path / "out", budget_minutes=1, progress=False)
    assert main(["workflow", str(workflow_data), "--budget-minutes", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1-minute budget" in err and "--budget-minutes 1" in err
    assert json.loads((tmp_path / "out" / "workflow.json").read_text())["budget_minutes"] == 1


def test_balanced_accuracy_scores_a_run_by_mean_per_class_recall(finished_workflow, monkeypatch):
    """A model that always says the majority class: accuracy = its share, balanced accuracy = 1/K."""
    import torch

    import imgflow.inference

    out, record, _ = finished_workflow
    state = json.loads((out / "workflow.json").read_text())["state"]
    ctx = context.Context(data=record["data"], out=out, seed=0, budget_seconds=30, started=time.perf_counter(),
                          elapsed_before=0.0, progress=False,
                          state=WorkflowState.from_dict({**state, "metric": "balanced_accuracy"}))
    part, val = context.protocol_split(ctx)
    calls = []

    def always_class_0(model, images, prep, *args, **kwargs):
        calls.append(len(images))
        return torch.tensor([[5.0, 0.0, 0.0]]).repeat(len(images), 1)

    monkeypatch.setattr(imgflow.inference, "predict_logits", always_class_0)
    run_dir = out / "runs" / "6-overfit"
    score = training_runs.val_score(ctx, run_dir, history=[])
    assert calls == [len(val)]  # the run's own validation part, rebuilt from its config
    assert score == pytest.approx(1 / 3)
    ctx.state.metric = "accuracy"
    assert training_runs.val_score(ctx, run_dir, [{"val_acc": 0.75}]) == 0.75


def _k_fold_tune(tmp_path, monkeypatch, tune_seconds: float):
    """A context for step 7 under 3-fold cross-validation whose training is faked: every run's
    epochs take 1 s, the reference scores 0.52 and a candidate 0.50 (a tie on 30 images,
    standard error ~0.09). Returns (context, names of the runs trained)."""
    trained = []
    monkeypatch.setattr(steps, "train_run", lambda ctx, name, settings: (
        trained.append((name, settings.get("fold"))),
        (ctx.out / "runs" / name, [{"val_acc": 0.5, "val_loss": 1.0, "seconds": 1.0}] * 2))[1])
    monkeypatch.setattr(steps, "val_score", lambda ctx, run_dir, history: 0.5 if "augment" in str(run_dir) else 0.52)
    monkeypatch.setattr(steps, "run_history", lambda run_dir: [{"val_acc": 0.4, "val_loss": 1.1, "seconds": 1.0}])
    # fold 0 validates on 2 images of each class (of the 30 in all)
    fold0 = SimpleNamespace(labels=np.repeat(np.arange(3), 2))
    monkeypatch.setattr(steps, "protocol_split", lambda ctx: (None, fold0))
    settings = {"model": "fast-small", "epochs": 2, "folds": 3, "fold": 0, **recipes.fast_recipe(5_000, 2)}
    scaled = Scaled(model="fast-small", epochs=2, train_subset=0, best_epoch=None, settings=settings,
                    run="runs/6-overfit", final_val_acc=0.4, final_val_loss=1.1, final_val_score=0.4,
                    seconds_per_epoch=1.0)
    ctx = context.Context(data="x", out=tmp_path, seed=0, budget_seconds=tune_seconds / wf.BUDGET_SHARE["tune"],
                          started=time.perf_counter(), elapsed_before=0.0, progress=False,
                          state=WorkflowState(scaled=scaled, metric="accuracy", classes=["a", "b", "c"],
                                              protocol=Protocol("k-fold", folds=3, scored_per_class=[10, 10, 10])))
    return ctx, trained


def test_k_fold_reuses_the_step_6_run_as_fold_0_of_the_reference(tmp_path, monkeypatch):
    # 3 folds x (3 + 2 x 1 s) = 15 s per candidate; the reference's 2 extra folds cost 10 s.
    ctx, trained = _k_fold_tune(tmp_path, monkeypatch, tune_seconds=25)
    step = steps.step_tune(ctx)
    assert ("7-none-fold0", 0) not in trained  # fold 0 of the reference is the step-6 run
    assert [n for n, _ in trained if n.startswith("7-none")] == ["7-none-fold1", "7-none-fold2"]
    none = step.candidates[0]
    assert none.runs[0] == "runs/6-overfit" and len(none.runs) == 3
    assert len(step.candidates) == 2  # 25 s pays the reference's 10 s and one 15-s candidate
    assert ctx.state.chosen.name == wf.CANDIDATES[0][0] and "one-standard-error rule" in step.why
    assert step.metrics["scored_images"] == 30 and 0.08 < step.metrics["standard_error"] < 0.1
    assert step.metrics["folds_trained"] == 3 and "(3-fold cross-validation)" in step.why

    trained.clear()  # 9 s pays not even the reference's other folds: nothing more is trained
    ctx.budget_seconds = 9 / wf.BUDGET_SHARE["tune"]
    step = steps.step_tune(ctx)
    assert trained == [] and [c.name for c in step.candidates] == ["none"]
    assert step.candidates[0].runs == ["runs/6-overfit"] and "NO regularised candidate" in step.why


def test_k_fold_is_claimed_only_where_k_folds_are_trained(tmp_path, monkeypatch):
    """Issue 23, defect a: under k-fold steps 5 and 6 train fold 0 alone, and step 7 trains the
    other folds only when its budget pays for a candidate on all of them."""
    data = make_image_folder(tmp_path / "small", per_class=12, size=(8, 8))
    step = steps.step_protocol(_context(tmp_path, data, test_split=0.0, classes=["a", "b", "c"]))
    assert "steps 5 and 6 validate on fold 0 alone" in step.decision
    assert "each candidate is scored on 5 folds" not in step.why and "fold 0 (a 1/5 hold-out)" in step.why

    ctx, _ = _k_fold_tune(tmp_path, monkeypatch, tune_seconds=9)
    step = steps.step_tune(ctx)
    assert step.metrics["folds_trained"] == 1
    assert step.metrics["scored_images"] == 6  # fold 0's validation images, not all 30 of the folds
    assert "there was no cross-validation" in step.why and "fold 0 (6 images)" in step.why


def test_step_7_says_the_time_it_had_and_used(tmp_path, monkeypatch):
    """Issue 23, defect b: with no candidate affordable the words said "the step had 0 s" of a
    share nothing had used."""
    ctx, _ = _k_fold_tune(tmp_path, monkeypatch, tune_seconds=24)
    step = steps.step_tune(ctx)
    assert "the step had 24 s (20% of the budget) and trained nothing in them" in step.why
    assert "One candidate takes 15 s (3 folds of 2 epochs)" in step.why
    assert "other 2 folds would take 10 s: 25 s in all" in step.why
    assert step.metrics["seconds_available"] == 24 and step.metrics["seconds_trained"] == 0

    ctx.budget_seconds = 40 / wf.BUDGET_SHARE["tune"]  # the reference's 10 s and two 15-s candidates
    step = steps.step_tune(ctx)
    assert "The step had 40 s (20% of the budget); its runs trained for 16 s." in step.why  # 8 runs of 2 s
    assert step.metrics["seconds_trained"] == 16


# ---------------------------------------------------------------------------------------------
# decisions and budget logic on their own


def test_standard_error_of_accuracy_and_of_balanced_accuracy():
    # 5,000 images at 0.70: about 0.0065 (Agresti-Coull moves it in the 5th decimal)
    assert wf.score_standard_error(0.70, [500] * 10, balanced=False) == pytest.approx(0.00648, abs=1e-5)
    # balanced classes: balanced accuracy has the same error as accuracy
    assert wf.score_standard_error(0.70, [500] * 10, balanced=True) == pytest.approx(
        wf.score_standard_error(0.70, [500] * 10, balanced=False))
    # uneven classes: each recall rests on fewer images, so the mean of recalls is noisier
    uneven = [1000, 100]
    assert wf.score_standard_error(0.7, uneven, balanced=True) > 1.5 * wf.score_standard_error(0.7, uneven, False)
    assert wf.score_standard_error(1.0, [20, 20], balanced=False) > 0.02  # a perfect score is not exact
    assert wf.score_standard_error(0.5, [], balanced=False) == 0.0


def test_one_standard_error_rule_takes_the_most_regularised_of_the_tied_candidates():
    def result(name, score, regularisation, loss=1.0):
        return Candidate(name=name, description=name, settings={}, val_acc=score, val_acc_std=0.0, val_loss=loss,
                         runs=[], regularisation=regularisation, val_score=score)

    def choose(results, se):
        return wf.choose_candidate(results, lambda score: se)[0].name

    tie = [result("none", 0.7012, 0), result("augment", 0.7010, 1)]
    assert choose(tie, 0.0065) == "augment"
    assert choose(tie, 0.0001) == "none"  # 0.0002 behind is more than one standard error here
    exactly_one_se = [result("none", 0.75, 0), result("augment", 0.5, 1)]  # binary fractions: exact
    assert choose(exactly_one_se, 0.25) == "augment"  # at most one standard error behind: tied
    assert choose(exactly_one_se, 0.2499) == "none"
    clear = [result("none", 0.7212, 0), result("augment", 0.7386, 1), result("more", 0.7200, 2)]
    assert choose(clear, 0.0065) == "augment"  # 'more' is 1.9 points behind
    assert choose(clear, 0.05) == "more"  # on few images, everything is noise
    # a learning-rate change is no more regularisation: among equals, the better score wins...
    same = [result("none", 0.70, 0), result("decay", 0.69, 2), result("decay+half-lr", 0.695, 2)]
    assert choose(same, 0.05) == "decay+half-lr"
    # ...then the lower validation loss
    assert choose([result("a", 0.7, 1, loss=0.9), result("b", 0.7, 1, loss=0.8)], 0.0) == "b"
    assert choose([result("a", 0.7, 1, loss=0.8), result("b", 0.7, 1, loss=0.9)], 0.0) == "a"
    assert choose([result("none", float("nan"), 0)], 0.01) == "none"


def _decay_per_image(settings):
    return settings["lr"] * settings["weight_decay"] / (1 - settings["momentum"]) / settings["batch_size"]


def test_first_candidate_decays_weights_per_image_as_the_airbench94_preset_does():
    from imgflow.training.config import PRESETS

    theirs = _decay_per_image(PRESETS["airbench94"])  # the SGD recipe the workflow's candidates follow
    assert _decay_per_image(PRESETS["best"]) == pytest.approx(theirs, rel=0.05)  # and the Muon one
    for reference in (recipes.fast_recipe(500, 6), recipes.fast_recipe(50_000, 6), recipes.muon_recipe()):
        first = recipes.candidate_settings(reference, wf.CANDIDATES[0])
        assert _decay_per_image(first) == pytest.approx(theirs, rel=0.05), reference
        assert first["label_smoothing"] == PRESETS["airbench94"]["label_smoothing"]
        assert first["augment"] == PRESETS["airbench94"]["augment"]
    # a halved learning rate halves the decay per image too (decay is coupled to the lr)
    half = recipes.candidate_settings(recipes.fast_recipe(5_000, 6), wf.CANDIDATES[3])
    assert _decay_per_image(half) == pytest.approx(theirs / 2, rel=0.05)


def test_exploration_trains_with_sgd_and_a_final_run_on_20000_images_switches_to_muon():
    from imgflow.training.config import PRESETS

    assert recipes.fast_recipe(50_000, 6)["optimizer"] == "sgd"  # steps 6-7, at any size
    muon = recipes.muon_recipe()
    assert {k: muon[k] for k in ("optimizer", "muon_lr", "lr", "batch_size", "whiten_bias_epochs")} == \
        {k: PRESETS["best"][k] for k in ("optimizer", "muon_lr", "lr", "batch_size", "whiten_bias_epochs")}
    assert muon["warmup_epochs"] == 0 and muon["lookahead"] == 0
    assert recipes.fast_recipe(5_000, 10)["warmup_epochs"] == 2.0  # SGD warms up for a fifth of the run

    explored = {"model": "fast-large", **recipes.fast_recipe(14_000, 6), "epochs": 6, "label_smoothing": 0.2}
    chosen = recipes.candidate_settings(explored, wf.CANDIDATES[0])
    final = recipes.final_recipe(chosen, 50_000)
    assert final["optimizer"] == "muon" and final["batch_size"] == 1000 and final["lr"] == PRESETS["best"]["lr"]
    assert final["augment"] == chosen["augment"] and final["label_smoothing"] == 0.2  # the regularisation stays
    assert _decay_per_image(final) == pytest.approx(_decay_per_image(chosen))
    half = recipes.final_recipe(recipes.candidate_settings(explored, wf.CANDIDATES[3]), 50_000)
    assert half["lr"] == pytest.approx(PRESETS["best"]["lr"] / 2)
    assert _decay_per_image(half) == pytest.approx(_decay_per_image(chosen) / 2)
    # nothing changes below 20,000 images, or for a pretrained backbone's run
    assert recipes.final_recipe(chosen, 19_999) is chosen
    assert recipes.final_recipe(chosen, 20_000)["optimizer"] == "muon"
    adamw = {"model": "hf:x", "optimizer": "adamw", "lr": 1e-3, "batch_size": 64}
    assert recipes.final_recipe(adamw, 50_000) is adamw


def test_final_run_plan_cuts_epochs_before_images_and_uses_the_budget():
    plan = lambda seconds: wf.plan_final_run(budget.RUN_OVERHEAD_SECONDS + seconds, 1000, 10_000, 6)  # noqa: E731
    assert plan(100) == (6, 0)  # fits
    assert plan(1000) == (6, 0)  # never more than validated, unless allowed
    more = lambda seconds: wf.plan_final_run(budget.RUN_OVERHEAD_SECONDS + seconds, 1000, 10_000, 6, 12)  # noqa: E731
    assert more(95) == (9, 0) and more(1000) == (12, 0) and more(30) == plan(30) and more(34) == plan(34)
    assert plan(30) == (3, 0)  # 3 epochs of everything fit exactly
    assert plan(33) == (3, 0)  # 3.3: all images for 3 epochs leaves 9% of the time unused: fine
    assert plan(34) == (4, 8500)  # 3.4 would leave 12%: one more epoch, on 85% of the images
    assert plan(15) == (2, 7500)  # 1.5: 1 epoch would leave a third unused
    assert plan(11) == (1, 0)  # 1.1: 9% unused
    assert plan(17) == (2, 8500)
    assert plan(4) == (1, 4000)  # not even one epoch: a subset
    assert plan(0) == (1, 64)  # floor
    for seconds in range(1, 60):  # every plan uses at least 90% of its time, and never more
        epochs, subset = plan(seconds)
        used = epochs * (subset or 10_000) / 1000
        assert 0.9 * seconds - 1e-9 <= used <= seconds + 1e-9 or subset == 64, seconds


def test_plan_epochs_fits_the_budget_or_takes_a_subset():
    overhead = budget.RUN_OVERHEAD_SECONDS
    # 1000 img/s, 10k train, no val: 10 s per epoch.
    assert budget.plan_epochs(overhead + 55, 1000, 10_000, 0, max_epochs=30) == (5, 0)
    assert budget.plan_epochs(overhead + 1000, 1000, 10_000, 0, max_epochs=30) == (30, 0)
    epochs, subset = budget.plan_epochs(overhead + 30, 1000, 10_000, 0, max_epochs=30, min_epochs=6)
    assert epochs == 6 and subset == 5000  # 30 s buys 30k images: 6 epochs of 5k


def test_observed_throughput_is_a_runs_median_pace_by_the_plans_cost_model(tmp_path):
    run = tmp_path / "runs" / "7-augment"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"num_train": 900, "num_val": 300}}))
    rows = "\n".join(f"{i},1.0,0.5,1.0,0.5,0.1,{s}" for i, s in enumerate([2.0, 100.0, 2.0], 1))
    (run / "history.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n" + rows + "\n")
    # (900 training + 300 validation images at 3x the speed) / the median 2 s; the 100 s epoch
    # (a moment of load) does not move it.
    assert throughput.observed_throughput(tmp_path, "runs/7-augment") == pytest.approx(500.0)
    assert throughput.observed_throughput(tmp_path, "runs/7-missing") is None


def test_final_run_is_planned_at_the_chosen_candidates_observed_pace(finished_workflow):
    out, record, _ = finished_workflow
    state = record["state"]
    observed = throughput.observed_throughput(out, state["chosen"]["run"])
    assert observed and state["plans"]["8-final"]["images_per_second"] == pytest.approx(observed)


@pytest.mark.parametrize("val_losses, expected", [
    ([1.0, 0.8, 0.7, 0.75, 0.8], 3),  # rises twice after epoch 3
    ([1.0, 0.8, 0.7, 0.6, 0.5], None),  # still improving
    ([1.0, 0.8, 0.7, 0.75], None),  # one rise is not yet a trend
])
def test_detect_overfitting(val_losses, expected):
    history = [{"val_loss": v, "train_loss": 1.0 - 0.1 * i} for i, v in enumerate(val_losses)]
    assert wf.detect_overfitting(history) == expected


def _overfit_words(model, epochs, best_epoch, train_acc, val_acc):
    """Step 6's (decision, why, memorises) for the last epoch's accuracies and the curves' turn."""
    outcome = OverfitOutcome(model=model, model_rule=None, epochs=epochs, train_subset=0, images_per_second=1.0,
                             best_epoch=best_epoch, verdict=selection.overfit_verdict(best_epoch, train_acc, val_acc),
                             patience=selection.OVERFIT_PATIENCE, best_val_acc=val_acc, final_train_acc=train_acc,
                             final_val_acc=val_acc)
    return (*wording.overfit_words(outcome), outcome.metrics()["memorises"])


def test_step_6_names_memorisation_that_the_loss_curve_has_not_shown_yet():
    # The seed-0 CIFAR-10 run's last epoch: validation loss was lowest there, the gap 23 points.
    decision, why, memorises = _overfit_words("fast-large", 6, None, 0.9936, 0.7610)
    assert memorises and "memorises its training images (training accuracy 0.994, validation 0.761)" in decision
    assert "A gap of 23 points" in why
    decision, why, memorises = _overfit_words("fast-small", 6, None, 0.72, 0.70)
    assert not memorises and decision == "fast-small did not overfit within 6 epochs" and "2 points apart" in why
    decision, _, memorises = _overfit_words("fast-small", 6, 4, 0.72, 0.70)
    assert memorises and "lowest at epoch 4" in decision


def _context(tmp_path, data, **state):
    return context.Context(data=str(data), out=tmp_path, seed=0, budget_seconds=60, started=time.perf_counter(),
                           elapsed_before=0.0, progress=False, state=WorkflowState(**state))


def test_small_data_gets_k_fold_and_imbalanced_data_balanced_accuracy(tmp_path):
    data = make_image_folder(tmp_path / "small", per_class=12, size=(8, 8))
    ctx = _context(tmp_path, data, test_split=0.0, balance_ratio=3.0, classes=["a", "b", "c"])
    assert steps.step_protocol(ctx).metrics["kind"] == "k-fold"
    assert ctx.state.protocol.to_dict() == {"kind": "k-fold", "folds": 5, "scored_per_class": [12, 12, 12]}
    assert steps.step_metric(ctx).decision == "measure success by balanced accuracy"


def test_a_large_hold_out_is_scored_on_a_fixed_stratified_part_during_exploration(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "big", per_class=60, size=(8, 8))
    ctx = _context(tmp_path, data, test_split=0.0, balance_ratio=1.0, classes=["a", "b", "c"])
    monkeypatch.setattr(steps, "VALIDATION_CAP", 15)
    step = steps.step_protocol(ctx)
    assert ctx.state.protocol.to_dict() == {"kind": "hold-out", "val_split": 0.2, "val_subset": 15,
                                            "scored_per_class": [5, 5, 5]}
    assert "same stratified 15" in step.decision
    part, val = context.protocol_split(ctx)
    assert len(val) == 15 and sorted(set(val.labels.tolist())) == [0, 1, 2]
    assert context.base_settings(ctx)["val_subset"] == 15  # the runs validate on the same images
    monkeypatch.setattr(steps, "VALIDATION_CAP", 1000)  # a hold-out under the cap is used whole
    steps.step_protocol(ctx)
    assert "val_subset" not in ctx.state.protocol.to_dict() and len(context.protocol_split(ctx)[1]) == 36
    assert ctx.state.protocol.scored_per_class == [12, 12, 12]
    ctx.state.protocol.scored_per_class = None  # a workflow.json from before step 3 recorded it
    assert steps._scored_class_counts(ctx, folds_trained=1) == [12, 12, 12]


def test_data_without_test_split_gets_one_held_out(tmp_path):
    data = make_image_folder(tmp_path / "flat", per_class=20, size=(8, 8), flat=True, test=False)
    ctx = _context(tmp_path, data)
    step = steps.step_data(ctx)
    assert ctx.state.test_split == steps.TEST_HOLDOUT and "held out" in step.decision
    assert len(context.train_part(ctx)) == 48  # 80% of 60


def test_workflow_cli_bad_input(tmp_path, capsys):
    assert main(["workflow", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    data = make_image_folder(tmp_path / "d", per_class=4, size=(8, 8))
    for minutes in ("0", "inf", "nan"):
        assert main(["workflow", str(data), "--budget-minutes", minutes, "--out", str(tmp_path / "o")]) == 2
        assert "--budget-minutes" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--seed", "99999999999999999999"], "--seed"),
                                           (["--threads", "99999"], "--threads")])
def test_workflow_checks_seed_and_threads_before_writing_anything(tmp_path, capsys, args, message):
    data = make_image_folder(tmp_path / "d", per_class=4, size=(8, 8))
    out = tmp_path / "o"
    assert main(["workflow", str(data), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # so the same --out with a valid value is a new workflow, not a stuck one


def test_workflow_refuses_a_single_class_before_writing_anything(tmp_path, capsys):
    data = make_image_folder(tmp_path / "one", classes=("only",), per_class=10, test=False)
    assert main(["workflow", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least 2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_workflow_refuses_an_out_holding_a_training_run(tiny_run, workflow_data, tmp_path, capsys):
    import shutil

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / "report.html").write_text("the run's report")
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["workflow", str(workflow_data), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a training run" in err and "another --out" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / "report.html").read_text() == "the run's report"


def test_a_workflow_continues_with_another_spelling_of_its_data_folder(workflow_data, tmp_path, monkeypatch):
    monkeypatch.setattr(wf_run, "STEPS", steps.STEPS[:2])
    monkeypatch.chdir(workflow_data.parent)
    out = tmp_path / "out"
    first = wf.run_workflow(workflow_data.name, out, budget_minutes=1, progress=False)
    for spelling in (f"./{workflow_data.name}", str(workflow_data), f"{workflow_data.name}/"):
        again = wf.run_workflow(spelling, out, budget_minutes=1, progress=False)
        assert again["steps"] == first["steps"]
    # Another folder is still another workflow.
    other = make_image_folder(tmp_path / "other", per_class=4, size=(8, 8))
    with pytest.raises(UserError, match="use the same DATA"):
        wf.run_workflow(str(other), out, budget_minutes=1, progress=False)


_STEP = {"name": "define the problem and assemble the data", "decision": "d", "why": "w"}


@pytest.mark.parametrize("change, detail", [
    (lambda r: [], "the file is a list, expected an object"),
    (lambda r: {k: v for k, v in r.items() if k != "steps"}, "'steps' is missing"),
    (lambda r: {k: v for k, v in r.items() if k != "state"}, "'state' is missing"),
    (lambda r: {**r, "steps": "x"}, "'steps' is a string (\"x\"), expected a list"),
    (lambda r: {**r, "steps": [1]}, "'steps.1' is a number (1), expected an object"),
    (lambda r: {**r, "state": []}, "'state' is a list, expected an object"),
    (lambda r: {**r, "elapsed_minutes": "x"}, "'elapsed_minutes' is a string (\"x\"), expected a number"),
    (lambda r: {**r, "steps": [_STEP], "state": {"metric": 1}}, "'state.metric' is a number (1), expected a string"),
    (lambda r: {**r, "steps": [_STEP], "state": {"test_split": 0.0}},
     "step 1 is finished but 'state.classes', which it leaves for the steps after it, is missing"),
    (lambda r: {**r, "steps": [_STEP] * 6, "state": {"test_split": 0.0, "classes": ["a", "b"], "metric": "accuracy",
                                                      "protocol": {"kind": "hold-out", "val_split": 0.2}}},
     "step 6 is finished but 'state.scaled', which it leaves for the steps after it, is missing"),
    (lambda r: {**r, "image_size": 64}, "'image_size' is a number (64), expected a list"),
    (lambda r: {**r, "state": {"image_size": [64]}}, "'state.image_size' has 1 items, expected 2"),
    (lambda r: {**r, "state": {"image_size": [8, 8], "resize": {"image_size": [8, 8]}}},
     "'state.resize.typical_size' is missing"),
])
def test_a_damaged_workflow_json_is_one_line(workflow_data, tmp_path, capsys, change, detail):
    out = tmp_path / "out"
    out.mkdir()
    record = {"data": str(workflow_data), "seed": 0, "budget_minutes": 1.0, "steps": [], "state": {},
              "elapsed_minutes": 0.0}
    (out / "workflow.json").write_text(json.dumps(change(record)))
    assert main(["workflow", str(workflow_data), "--budget-minutes", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"imgflow: error: {out / 'workflow.json'} is not a valid imgflow workflow record: {detail}; "
                   "restore it, or choose another --out to start the workflow over")
    assert sorted(p.name for p in out.iterdir()) == ["workflow.json"]


# the working image size

def _sample(sizes, train_files=100):
    from imgflow.data.folder import SizeSample
    return SizeSample(train_files=train_files, sizes=list(sizes))


def _no_probe():
    raise AssertionError("small images need no speed probe")


def test_small_images_keep_their_own_size_without_a_probe():
    assert wf.working_image_size(_sample([(32, 32)] * 5), 60, _no_probe, None).image_size is None
    assert wf.working_image_size(_sample([(28, 20), (8, 8)]), 60, _no_probe, None).image_size is None
    assert wf.working_image_size(_sample([]), 60, _no_probe, None) == Resize(image_size=None)


def test_large_images_train_at_the_largest_side_the_budget_pays_for():
    photos = _sample([(480, 640)] * 9 + [(481, 640)], train_files=240)  # one shape, within 5%
    # 120 s at 2,700 img/s (32x32): 96x128 still pays for 112 passes per image.
    roomy = wf.working_image_size(photos, 120, lambda: 2700.0, None)
    assert roomy.image_size == [96, 128] and roomy.same_shape and roomy.passes_per_image >= 40
    assert roomy.limit == "top"  # no larger rung to try
    assert roomy.typical_size == [480, 640] and roomy.train_files == 240
    # At 100 img/s 36x48 pays for only 30 passes: the longer side drops to 32.
    slow = wf.working_image_size(photos, 120, lambda: 100.0, None)
    assert slow.image_size == [24, 32] and slow.limit == "budget"
    # Not even 32 is affordable: the smallest side anyway, never the full size.
    tiny_budget = wf.working_image_size(photos, 1, lambda: 100.0, None)
    assert tiny_budget.image_size == [24, 32] and tiny_budget.limit == "smallest"
    # Memory: 240 images of 96x128 need 2 x 8.8 MB, over 80% of 20 MB; 72x96 fits.
    tight = wf.working_image_size(photos, 120, lambda: 2700.0, 20_000_000)
    assert tight.image_size == [72, 96] and tight.limit == "memory"
    # A long, thin shape keeps the models' 8 pixels a side.
    strips = _sample([(40, 400)] * 3, train_files=240)
    assert wf.working_image_size(strips, 1, lambda: 100.0, None).image_size == [8, 32]


def test_mixed_shapes_become_squares_and_affordable_native_sizes_stay():
    mixed = _sample([(300, 400), (400, 300), (300, 400)], train_files=240)
    decision = wf.working_image_size(mixed, 120, lambda: 2700.0, None)
    assert decision.image_size == [128, 128] and not decision.same_shape
    medium = _sample([(40, 56)] * 3, train_files=240)  # 56 px is on no rung; below 128 it is kept
    assert wf.working_image_size(medium, 120, lambda: 2700.0, None).image_size is None
    assert wf.working_image_size(medium, 5, lambda: 2700.0, None).image_size == [23, 32]


def test_workflow_trains_large_images_at_a_working_size_and_says_why(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "photos", classes=("a", "b"), per_class=30, size=(40, 56),
                             test_per_class=6)
    monkeypatch.setattr(image_size, "PASSES_PER_IMAGE", 1e12)  # no budget affords it: the smallest rung
    out = tmp_path / "out"
    record = wf.run_workflow(str(data), out, budget_minutes=0.3, seed=0, progress=False, threads=1)
    assert record["state"]["image_size"] == [23, 32]
    steps = record["steps"]
    assert "[23, 32, 3]" in steps[0]["decision"] and "resized from 40x56" in steps[0]["decision"]
    assert steps[3]["decision"].startswith("images resized to 23x32 from 40x56 (keeping their shape)")
    assert "Training time grows with the pixels" in steps[3]["why"] and steps[3]["metrics"]["image_size"] == [23, 32]
    final = json.loads((out / record["final_run"] / "config.json").read_text())
    assert final["train"]["image_size"] == [23, 32] and final["model"]["image_size"] == [23, 32]
    # predict resizes a full-size photo as training did
    capsys.readouterr()
    assert main(["predict", str(out / record["final_run"]), str(data / "test" / "a" / "000.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == "a"
    # the run continues only at the size it started with
    assert main(["workflow", str(data), "--budget-minutes", "0.3", "--out", str(out), "--image-size", "32"]) == 2
    assert "without --image-size" in capsys.readouterr().err


def test_workflow_image_size_option_wins_and_is_kept_on_continue(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=30, size=(8, 8), test_per_class=4)
    out = tmp_path / "out"
    monkeypatch.setattr(wf_run, "STEPS", steps.STEPS[:4])  # the size is decided by step 4
    assert main(["workflow", str(data), "--budget-minutes", "1", "--out", str(out), "--image-size", "12x10"]) == 0
    record = json.loads((out / "workflow.json").read_text())
    assert record["image_size"] == [12, 10] and record["state"]["image_size"] == [12, 10]
    assert "[12, 10, 3]" in record["steps"][0]["decision"]
    assert record["steps"][3]["decision"].startswith("images resized to 12x10 (--image-size)")
    assert main(["workflow", str(data), "--budget-minutes", "1", "--out", str(out)]) == 2
    assert "with --image-size 12x10" in capsys.readouterr().err
    assert main(["workflow", str(data), "--budget-minutes", "1", "--out", str(out), "--image-size", "12x10"]) == 0


@pytest.mark.parametrize("budget, speeds, expected", [
    # Not even fast-small's final run affords 8 epochs in 60 s: the smallest is taken anyway,
    # explored on the 366 images 6 epochs of its 7.2 s pay for.
    (60, {"fast-large": 100.0, "fast-medium": 200.0, "fast-small": 1000.0}, ("fast-small", 6, 366)),
    # fast-medium's final run affords 0.57 * 1000 s * 200 img/s / 10,000 = 11.4 epochs >= 8 (fast-large's
    # 5.7 do not), so step 6 explores it on what its own 120 s pay for: 6 epochs of 3,566 images.
    (1000, {"fast-large": 100.0, "fast-medium": 200.0, "fast-small": 5000.0}, ("fast-medium", 6, 3566)),
    (1000, {"fast-large": 1000.0, "fast-medium": 2000.0, "fast-small": 5000.0}, ("fast-large", 14, 0)),
])
def test_step_6_scales_up_to_the_largest_model_whose_final_run_fits(tmp_path, monkeypatch, budget, speeds,
                                                                      expected):
    ctx = _context(tmp_path, "x")
    ctx.budget_seconds = budget
    monkeypatch.setattr(steps, "train_part", lambda ctx: range(10_000))  # what the final run trains on
    monkeypatch.setattr(steps, "measure_throughput", lambda ctx, model, batch: speeds[model])
    model, epochs, subset, ips, why = steps.scaled_model_and_plan(ctx, 8000, 1000)
    assert (model, epochs, subset) == expected and ips == speeds[model]
    assert why == ("smallest" if budget == 60 else "final run affords it")


def test_final_reserve_covers_a_tta_test_pass_at_inference_speed_and_the_reports():
    # 10,000 test images x 6 views (airbench94's, as inference.tta_views) at 3 x 500 img/s, plus the reports.
    import torch
    from imgflow.inference import tta_views
    assert len(tta_views(torch.zeros(1, 8, 8, 3))) == budget.TTA_VIEWS == 6
    assert wf.final_reserve_seconds(10_000, 500) == pytest.approx(60_000 / 1500 + budget.REPORT_SECONDS)
    assert wf.final_reserve_seconds(0, 500) == budget.REPORT_SECONDS


def test_workflow_refuses_an_image_size_its_models_cannot_take(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=30, size=(8, 8))
    assert main(["workflow", str(data), "--out", str(tmp_path / "out"), "--image-size", "4"]) == 2
    assert "at least 8 pixels" in capsys.readouterr().err and not (tmp_path / "out").exists()


# the package's layout

# What the workflow package may import of imgflow (it sits above all of these; none imports it).
WORKFLOW_MAY_IMPORT = {"training", "runs", "history", "data", "models", "evaluation", "export", "reports",
                       "inference", "precision", "device", "preprocess", "fileio", "text", "errors", "progress"}


def _imgflow_imports(path: Path, src: Path) -> set[str]:
    """Modules of imgflow that `path` imports, `from package import module` resolved to the module."""
    import ast

    def resolved(module: str, name: str) -> str:
        package = src.parent.joinpath(*module.split("."))
        is_module = (package / f"{name}.py").is_file() or (package / name / "__init__.py").is_file()
        return f"{module}.{name}" if is_module else module

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("imgflow")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("imgflow"):
            found |= {resolved(node.module, alias.name) for alias in node.names}
    return found


def test_the_workflow_package_imports_only_downward_without_cycles():
    import imgflow

    src = Path(imgflow.__file__).parent
    importers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                       if not p.is_relative_to(src / "workflow")
                       and any(m.startswith("imgflow.workflow") for m in _imgflow_imports(p, src)))
    # The command line (cli.py, or a cli/ package) and the Python API call the workflow.
    assert importers and all(Path(p).parts[0] in ("api.py", "cli.py", "cli") for p in importers), importers
    graph = {}
    for path in (src / "workflow").glob("*.py"):
        imports = _imgflow_imports(path, src)
        outside = {m.split(".")[1] for m in imports if not m.startswith("imgflow.workflow")}
        assert outside <= WORKFLOW_MAY_IMPORT, f"{path.name} imports {outside - WORKFLOW_MAY_IMPORT}"
        if path.name != "__init__.py":
            graph[path.stem] = {m.split(".")[2] for m in imports if m.startswith("imgflow.workflow.")}
    # The report is written from workflow.json: it reads the record, never the steps' code.
    assert graph["report"] == {"record"}
    done: list[str] = []
    while len(done) < len(graph):  # peel off modules whose imports are all peeled: a cycle stops it
        ready = sorted(m for m in graph if m not in done and graph[m] <= set(done))
        assert ready, f"an import cycle among {sorted(set(graph) - set(done))}"
        done += ready


def test_a_final_run_on_enough_images_trains_with_muon_and_keeps_the_chosen_regularisation(
        finished_workflow, workflow_data, tmp_path, monkeypatch):
    out, record, _ = finished_workflow
    assert record["state"]["plans"]["6-overfit"]["settings"]["optimizer"] == "sgd"  # tiny data: SGD throughout
    n_final = json.loads((out / "runs" / "8-final" / "config.json").read_text())["data"]["num_train"]
    monkeypatch.setattr(recipes, "MUON_MIN_IMAGES", n_final)  # exploration stays below it, the final run not
    monkeypatch.setattr(steps, "VALIDATION_CAP", 24)
    record = wf.run_workflow(str(workflow_data), tmp_path / "out", budget_minutes=0.5, seed=0, progress=False,
                             threads=1)
    chosen = record["state"]["chosen"]["settings"]
    final = json.loads((tmp_path / "out" / "runs" / "8-final" / "config.json").read_text())["train"]
    assert chosen["optimizer"] == "sgd" and final["optimizer"] == "muon" and final["batch_size"] == 1000
    for key in ("augment", "label_smoothing", "model"):
        assert final[key] == chosen[key]
    step = record["steps"][7]
    assert step["metrics"]["recipe_changed_to"] == "muon" and "with Muon" in step["decision"]
