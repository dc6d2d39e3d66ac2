"""The eight steps. Each computes its decision as data (`decisions`), leaves what later steps
need in ctx.state, and returns its record with the decision worded by `wording`.

The test split is touched exactly once, in the last step. Steps 5, 6 and 8 save their plan
before their run starts (`plan_once`), so a resumed step continues the same run; step 7's
settings derive from step 6's saved ones and the fixed budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from imgflow.fileio import read_json
from imgflow.history import run_history
from imgflow.reports import report_run
from imgflow.runs import RunPaths
from imgflow.workflow.budget import (BUDGET_SHARE, EXPECTED_FINAL_SHARE, FINAL_EPOCHS_FACTOR, FINAL_MIN_EPOCHS,
                                     MAX_EPOCHS, MIN_EPOCHS_TO_SEE_OVERFITTING, SCALED_MODELS, VALIDATION_SPEEDUP,
                                     final_reserve_seconds, final_run_seconds, plan_epochs, plan_final_run, plan_tune)
from imgflow.workflow.backbone import (BACKBONE_SHARE_OF_TUNE, DEFAULT_BACKBONE, DESCRIPTIONS, FROZEN_RUN,
                                       REGULARISATION, backbone_settings, is_photo_folder, plan_backbone_runs)
from imgflow.workflow.context import Context, base_settings, dataset, protocol_split, train_part
from imgflow.workflow.decisions import (BackboneComparison, BaselineOutcome, DataFacts, FinalOutcome, MetricChoice,
                                        OverfitOutcome, Preparation, PretrainedOffer, ProtocolChoice, TuneOutcome)
from imgflow.workflow.recipes import CANDIDATES, candidate_settings, fast_recipe, final_recipe
from imgflow.workflow.record import STEP_NAMES, Candidate, Plan, Protocol, Scaled, StepRecord
from imgflow.workflow.selection import (OVERFIT_PATIENCE, choose_candidate, detect_overfitting, overfit_verdict,
                                        score_standard_error)
from imgflow.workflow.throughput import measure_throughput, observed_throughput
from imgflow.workflow.training_runs import last_val_acc, plan_once, train_run, val_score
from imgflow.workflow.wording import (baseline_words, data_words, final_words, metric_words, overfit_words,
                                      preparation_words, protocol_words, tune_words)

BALANCE_LIMIT = 1.5  # max/min class count up to which plain accuracy is a fair measure
HOLDOUT_MIN_PER_CLASS = 50  # fewer training images in a class -> k-fold (a 20% hold-out would leave < 10)
K_FOLDS = 5
TEST_HOLDOUT = 0.2  # share of the data held out as the test split when the source has none
VALIDATION_CAP = 5000  # held-out images scored per exploration epoch (std error <= 0.71 points)
SMALL_MODEL = "seed-baseline"


def _record(index: int, words: tuple[str, str], decision, **extra) -> StepRecord:
    decided, why = words
    return StepRecord(STEP_NAMES[index], decided, why, decision.metrics(), **extra)


def _relative(ctx: Context, run_dir: Path) -> str:
    return str(run_dir.relative_to(ctx.out))


# ----------------------------------------------------------------------------------------------
# 1-4: the problem, the measure, the protocol, the data


def step_data(ctx: Context) -> StepRecord:
    from imgflow.data.card import inspect

    size = ctx.state.image_size
    card = inspect(ctx.data, out_dir=ctx.out, image_size=tuple(size) if size else None)
    facts = DataFacts(card, 0.0 if card["splits"].get("test") else TEST_HOLDOUT, ctx.state.resize, size)
    ctx.state.test_split = facts.test_split
    ctx.state.balance_ratio = facts.n_max / max(facts.n_min, 1)
    ctx.state.classes = card["classes"]
    return _record(0, data_words(facts), facts, card=card, figures={"examples": "examples.png"})


def step_metric(ctx: Context) -> StepRecord:
    ratio = ctx.state.balance_ratio
    choice = MetricChoice(ratio, BALANCE_LIMIT, "accuracy" if ratio <= BALANCE_LIMIT else "balanced_accuracy")
    ctx.state.metric = choice.metric
    return _record(1, metric_words(choice), choice)


def step_protocol(ctx: Context) -> StepRecord:
    from imgflow.data.splits import split_train_val

    train = train_part(ctx)
    n_min = int(np.bincount(train.labels).min())
    n_val = None
    if n_min >= HOLDOUT_MIN_PER_CLASS:
        protocol = Protocol("hold-out", val_split=0.2)
        n_val = len(split_train_val(train, protocol.val_split, "stratified", ctx.seed)[1])
        if n_val > VALIDATION_CAP:
            protocol.val_subset = VALIDATION_CAP
    else:
        protocol = Protocol("k-fold", folds=max(2, min(K_FOLDS, n_min)))
    ctx.state.protocol = protocol  # first: the hold-out split below reads it from the state
    protocol.scored_per_class = _scored_per_class(ctx)
    choice = ProtocolChoice(protocol, n_min, HOLDOUT_MIN_PER_CLASS, n_val)
    return _record(2, protocol_words(choice), choice)


def _per_class(ctx: Context, labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=len(ctx.state.classes or [])).tolist()


def _scored_per_class(ctx: Context) -> list[int]:
    """Images per class a candidate's validation score averages over, every fold trained: the
    same validation images every time on a hold-out, every training image once under k-fold."""
    return _per_class(ctx, train_part(ctx).labels if ctx.state.protocol.k_fold else protocol_split(ctx)[1].labels)


def _scored_class_counts(ctx: Context, folds_trained: int) -> list[int]:
    """_scored_per_class, as step 3 recorded it, or fold 0's alone when step 7 trained no other."""
    protocol = ctx.state.protocol
    if protocol.k_fold and folds_trained < protocol.folds:
        return _per_class(ctx, protocol_split(ctx)[1].labels)
    if protocol.scored_per_class is None:  # a workflow.json from before step 3 recorded it
        protocol.scored_per_class = _scored_per_class(ctx)
    return protocol.scored_per_class


def step_prepare(ctx: Context) -> StepRecord:
    from imgflow.data import channel_stats

    part, _ = protocol_split(ctx)
    mean, std = channel_stats(part.images)
    preparation = Preparation(list(mean), list(std), len(part), ctx.state.resize, ctx.state.image_size)
    return _record(3, preparation_words(preparation), preparation)


# ----------------------------------------------------------------------------------------------
# 5-6: a baseline, then a model large enough to overfit


def step_baseline(ctx: Context) -> StepRecord:
    part, val = protocol_split(ctx)
    majority = int(np.bincount(part.labels).argmax())

    def plan() -> Plan:
        batch_size = 64 if len(part) < 5000 else 128
        ips = measure_throughput(ctx, SMALL_MODEL, batch_size)
        epochs, subset = plan_epochs(BUDGET_SHARE["baseline"] * ctx.budget_seconds, ips, len(part), len(val),
                                     MAX_EPOCHS["baseline"], min_epochs=2)
        return Plan(ips, {**base_settings(ctx), "model": SMALL_MODEL, "epochs": epochs, "train_subset": subset,
                          "optimizer": "adam", "lr": 1e-3, "batch_size": batch_size})

    planned = plan_once(ctx, "5-baseline", plan)
    run_dir, history = train_run(ctx, "5-baseline", planned.settings)
    outcome = BaselineOutcome(
        model=planned.settings["model"], epochs=planned.settings["epochs"],
        train_subset=planned.settings["train_subset"], images_per_second=planned.images_per_second,
        metric=ctx.state.metric, score=val_score(ctx, run_dir, history), small_model_val_acc=last_val_acc(history),
        majority_class=ctx.state.classes[majority], majority_acc=float((val.labels == majority).mean()),
        random_acc=1.0 / len(ctx.state.classes))
    return _record(4, baseline_words(outcome), outcome, runs=[_relative(ctx, run_dir)])


def scaled_model_and_plan(ctx: Context, n_train: int, n_val: int) -> tuple[str, int, int, float, str]:
    """(model, epochs, train_subset, images/s, why) of step 6: the largest fast model whose final run
    the budget pays for FINAL_MIN_EPOCHS epochs of all the images, explored on what step 6's share
    buys; why is "final run affords it", or "smallest" when none does."""
    seconds = BUDGET_SHARE["overfit"] * ctx.budget_seconds
    final_images = EXPECTED_FINAL_SHARE * ctx.budget_seconds  # x images/s = images the final run sees
    n_all = len(train_part(ctx))

    def plan(model: str, batch_size: int) -> tuple[int, int, float]:
        ips = measure_throughput(ctx, model, batch_size)
        return *plan_epochs(seconds, ips, n_train, n_val, MAX_EPOCHS["overfit"],
                            min_epochs=MIN_EPOCHS_TO_SEE_OVERFITTING), ips

    batch_size = fast_recipe(n_train, MIN_EPOCHS_TO_SEE_OVERFITTING)["batch_size"]
    for model in SCALED_MODELS:
        epochs, subset, ips = plan(model, batch_size)
        affords = final_images * ips >= FINAL_MIN_EPOCHS * n_all
        if affords or model == SCALED_MODELS[-1]:
            trained_batch = fast_recipe(subset or n_train, epochs)["batch_size"]
            if trained_batch != batch_size:  # a small subset trains with small batches, at another speed
                epochs, subset, ips = plan(model, trained_batch)
            return model, epochs, subset, ips, "final run affords it" if affords else "smallest"
    raise AssertionError("unreachable")


def step_overfit(ctx: Context) -> StepRecord:
    part, val = protocol_split(ctx)

    def plan() -> Plan:
        model, epochs, subset, ips, rule = scaled_model_and_plan(ctx, len(part), len(val))
        settings = {**base_settings(ctx), **fast_recipe(subset or len(part), epochs), "model": model,
                    "epochs": epochs, "train_subset": subset, "augment": "none", "weight_decay": 0.0,
                    "label_smoothing": 0.0}
        return Plan(ips, settings, rule)

    planned = plan_once(ctx, "6-overfit", plan)
    settings = planned.settings
    run_dir, history = train_run(ctx, "6-overfit", settings)
    best_epoch, last = detect_overfitting(history), history[-1]
    ctx.state.scaled = Scaled(
        model=settings["model"], epochs=settings["epochs"], train_subset=settings["train_subset"],
        best_epoch=best_epoch, settings=settings, run=_relative(ctx, run_dir), final_val_acc=last["val_acc"],
        final_val_loss=last["val_loss"], final_val_score=val_score(ctx, run_dir, history),
        seconds_per_epoch=float(np.median([r["seconds"] for r in history])))
    outcome = OverfitOutcome(
        model=settings["model"], model_rule=planned.model_rule, epochs=settings["epochs"],
        train_subset=settings["train_subset"], images_per_second=planned.images_per_second, best_epoch=best_epoch,
        verdict=overfit_verdict(best_epoch, last["train_acc"], last["val_acc"]), patience=OVERFIT_PATIENCE,
        best_val_acc=max(r["val_acc"] for r in history), final_train_acc=last["train_acc"],
        final_val_acc=last["val_acc"], pretrained=pretrained_offer(ctx))
    return _record(5, overfit_words(outcome), outcome, runs=[_relative(ctx, run_dir)])


def backbone_name(ctx: Context) -> str:
    """The pretrained backbone as the user knows it: --backbone's source, or the default hub id."""
    return ctx.backbone.removeprefix("hf:") if ctx.backbone is not None else DEFAULT_BACKBONE


def pretrained_offer(ctx: Context) -> PretrainedOffer | None:
    """The pretrained backbone beside the scratch models: --backbone's, or for a folder of photos
    (typical images larger than the largest working size) the default one when Hugging Face's cache
    holds it; None for other data. Priced and planned for step 7 when its weights are here."""
    from imgflow.models.hf import cached_snapshot, extra_installed

    if ctx.backbone is not None:
        offer = PretrainedOffer(backbone_name(ctx), ctx.data, True, False, source=ctx.backbone_dir)
    elif is_photo_folder(ctx):
        snapshot = cached_snapshot(DEFAULT_BACKBONE) if extra_installed() else None
        offer = PretrainedOffer(DEFAULT_BACKBONE, ctx.data, extra_installed(), snapshot is not None,
                                source=str(snapshot) if snapshot is not None else None)
    else:
        return None
    if offer.tried:
        frozen, finetuned = plan_backbone_runs(ctx, offer.source)
        offer.image_size, offer.images_per_second = finetuned.settings["image_size"], finetuned.images_per_second
        offer.frozen_epochs, offer.finetune_epochs = frozen.settings["epochs"], finetuned.settings["epochs"]
        offer.finetune_subset = finetuned.settings["train_subset"]
        offer.seconds = BUDGET_SHARE["tune"] * ctx.budget_seconds * BACKBONE_SHARE_OF_TUNE
    return offer


# ----------------------------------------------------------------------------------------------
# 7: regularise and tune


def _train_candidate(ctx: Context, name: str, label: str, settings: dict, regularisation: int,
                     trained: dict[int, str] | None = None) -> tuple[Candidate, float]:
    """Train one candidate (on every fold under k-fold) and score it on validation; return it and
    the epochs' seconds of the runs trained.

    trained: fold -> run directory (relative to OUT) of a fold already trained with these settings.
    """
    trained = trained or {}
    accs, scores, losses, runs, seconds = [], [], [], [], 0.0
    for fold in range(settings.get("folds") or 1):  # k-fold: every fold validates once
        if fold in trained:
            run_dir = ctx.out / trained[fold]
            history = run_history(run_dir)
        else:
            fold_settings = {**settings, "fold": fold} if settings.get("folds") else settings
            suffix = f"-fold{fold}" if settings.get("folds") else ""
            run_dir, history = train_run(ctx, f"7-{name}{suffix}", fold_settings)
            seconds += sum(r["seconds"] for r in history)
        accs.append(last_val_acc(history))
        scores.append(val_score(ctx, run_dir, history))
        losses.append(history[-1]["val_loss"])
        runs.append(_relative(ctx, run_dir))
    candidate = Candidate(name=name, description=label, settings=settings, regularisation=regularisation,
                          val_acc=float(np.mean(accs)), val_acc_std=float(np.std(accs)),
                          val_score=float(np.mean(scores)), val_score_std=float(np.std(scores)),
                          val_loss=float(np.mean(losses)), runs=runs, run=runs[0])
    return candidate, seconds


def _reference_as_trained(ctx: Context, scaled: Scaled) -> Candidate:
    """The step-6 run as step 7's unregularised reference, already trained and scored."""
    score = scaled.final_val_score
    if score is None:  # a workflow.json from before it was kept
        run_dir = ctx.out / scaled.run
        score = val_score(ctx, run_dir, run_history(run_dir))
    return Candidate(name="none", description="no regularisation (the step-6 run)", settings=scaled.settings,
                     regularisation=0, val_acc=scaled.final_val_acc, val_acc_std=0.0, val_score=score,
                     val_score_std=0.0, val_loss=scaled.final_val_loss, runs=[scaled.run], run=scaled.run)


def step_tune(ctx: Context) -> StepRecord:
    scaled, protocol = ctx.state.scaled, ctx.state.protocol
    # Candidates train exactly like the step-6 run (same model, data, epochs) but for the
    # regularisation, so they are compared fairly with it and with each other. The budget
    # decides how many of them run. The unregularised reference is the step-6 run; under k-fold
    # that run is its fold 0 and its other folds come out of this step's budget too, unless not
    # even one candidate fits beside them: then nothing more is trained and step 6's
    # configuration goes on unchanged.
    backbone_runs = backbone_settings(ctx.state.plans)  # step 6 planned them: a pretrained backbone is here
    budget = plan_tune(ctx.budget_seconds, scaled.epochs, scaled.seconds_per_epoch, protocol.runs_per_candidate,
                       len(CANDIDATES), 1 - BACKBONE_SHARE_OF_TUNE if backbone_runs else 1.0)
    seconds = 0.0
    if budget.folds == 1 or budget.candidates == 0:
        results = [_reference_as_trained(ctx, scaled)]
    else:
        reference, seconds = _train_candidate(ctx, "none", "no regularisation (fold 0 is the step-6 run)",
                                              scaled.settings, 0, trained={0: scaled.run})
        results = [reference]
    for recipe in CANDIDATES[:budget.candidates]:
        candidate, trained = _train_candidate(ctx, recipe.name, recipe.description,
                                              candidate_settings(scaled.settings, recipe), recipe.regularisation)
        results.append(candidate)
        seconds += trained
    pretrained = [_train_candidate(ctx, name.removeprefix("7-"), DESCRIPTIONS[name], settings, REGULARISATION[name])
                  for name, settings in backbone_runs]
    results += [candidate for candidate, _ in pretrained]
    seconds += sum(trained for _, trained in pretrained)
    counts = _scored_class_counts(ctx, folds_trained=max(len(c.runs) for c in results))
    balanced = ctx.state.metric != "accuracy"
    standard_error = lambda score: score_standard_error(score, counts, balanced)  # noqa: E731
    chosen, best, se = choose_candidate(results, standard_error)
    ctx.state.chosen = chosen
    outcome = TuneOutcome(budget=budget, epochs=scaled.epochs, candidates=results, chosen=chosen, best=best,
                          standard_error=se, scored_images=sum(counts), metric=ctx.state.metric,
                          skipped=len(CANDIDATES) - budget.candidates, seconds_trained=seconds,
                          backbone=_comparison(backbone_name(ctx), pretrained, standard_error))
    return _record(6, tune_words(outcome), outcome, runs=[run for c in results for run in c.runs],
                   candidates=results)


def _comparison(name: str, pretrained: list[tuple[Candidate, float]], standard_error) -> BackboneComparison | None:
    """The pretrained backbone's frozen and fine-tuned candidates (with their seconds), compared."""
    if not pretrained:
        return None
    (frozen, frozen_seconds), (finetuned, finetuned_seconds) = pretrained
    return BackboneComparison(name, frozen, finetuned, frozen_seconds, finetuned_seconds,
                              standard_error(max(frozen.val_score, finetuned.val_score)))


# ----------------------------------------------------------------------------------------------
# 8: test once and deploy


def _final_epochs(ctx: Context, settings: dict, ips: float, n_train: int, validated: int) -> tuple[int, int]:
    """(epochs, train_subset) the final run can afford at `ips` images/s in what the budget leaves it."""
    test = dataset(ctx).test
    seconds = final_run_seconds(ctx.remaining(), final_reserve_seconds(len(test) if test is not None else 0, ips),
                                ctx.budget_seconds)
    if settings.get("freeze_backbone") and FROZEN_RUN in ctx.state.plans:
        # Its epochs train the head on cached features, and their pace leaves out the one pass of
        # the backbone that computes them: that pass, priced at the probed pace, comes off first.
        seconds -= n_train / (VALIDATION_SPEEDUP * ctx.state.plans[FROZEN_RUN].images_per_second)
    return plan_final_run(seconds, ips, n_train, validated, FINAL_EPOCHS_FACTOR * validated)


def _final_plan(ctx: Context, chosen: Candidate, n_train: int) -> Plan:
    validated = chosen.settings["epochs"]
    settings = {k: v for k, v in chosen.settings.items() if k not in ("folds", "fold")}
    # The chosen candidate's own run trained this model at this batch with this augmentation:
    # its pace predicts the final run's better than a probe does.
    ips = (observed_throughput(ctx.out, chosen.run or chosen.runs[0])
           or measure_throughput(ctx, settings["model"], settings["batch_size"]))
    epochs, subset = _final_epochs(ctx, settings, ips, n_train, validated)
    # On the images it can afford, a fast model that explored with SGD on fewer may call for Muon's
    # recipe: planned again at that recipe's pace, and taken if it still trains on enough images.
    muon = final_recipe(settings, subset or n_train)
    if muon is not settings:
        # A probe times the step alone; a run also assembles and augments batches. The chosen
        # run's observed pace over its probed one carries that share over (CIFAR-10, 15 minutes,
        # seed 0: Muon probed at 1,243 images/s trained at 1,140, and the run overran by 40 s).
        overhead = min(1.0, ips / measure_throughput(ctx, settings["model"], settings["batch_size"]))
        muon_ips = overhead * measure_throughput(ctx, muon["model"], muon["batch_size"])
        muon_epochs, muon_subset = _final_epochs(ctx, muon, muon_ips, n_train, validated)
        if final_recipe(settings, muon_subset or n_train) is not settings:
            settings, ips, epochs, subset = muon, muon_ips, muon_epochs, muon_subset
    if epochs != validated:
        # The schedule keeps its shape: the same fraction of the run warms up.
        settings["warmup_epochs"] = round(settings.get("warmup_epochs", 0.0) * epochs / validated, 2)
    settings.update(epochs=epochs, val_split=0.0, val_subset=0, train_subset=subset, early_stopping=0)
    return Plan(ips, settings)


def step_final(ctx: Context) -> StepRecord:
    from imgflow.evaluation import evaluate_run

    chosen = ctx.state.chosen
    n_train = len(train_part(ctx))
    settings = plan_once(ctx, "8-final", lambda: _final_plan(ctx, chosen, n_train)).settings
    run_dir, _ = train_run(ctx, "8-final", settings)
    # A stratified subset rounds per class: the run's own count is the one to quote.
    trained_on = read_json(RunPaths(run_dir).config, "run config")["data"]["num_train"]
    # A model trained on mirrored and shifted images is tested on those views too, averaged.
    tta = "flip" in settings.get("augment", "none")
    test = evaluate_run(run_dir, tta=tta, progress=ctx.progress, device=ctx.device)
    ctx.state.final_run, ctx.state.test_accuracy = str(run_dir), test["accuracy"]
    report_run(run_dir)
    outcome = FinalOutcome(chosen=chosen.name, n_train=n_train, trained_on=trained_on,
                           subset=bool(settings["train_subset"]), epochs=settings["epochs"],
                           validated_epochs=chosen.settings["epochs"], metric=ctx.state.metric, test=test, tta=tta,
                           recipe_changed_to=(settings["optimizer"] if settings.get("optimizer") !=
                                              chosen.settings.get("optimizer") else None))
    usage = (f"imgflow predict {run_dir} IMAGE.jpg [IMAGE ...]   # top classes per image\n"
             f"imgflow export {run_dir} --format onnx            # deploy without imgflow")
    return _record(7, final_words(outcome), outcome, runs=[_relative(ctx, run_dir)], usage=usage)


STEPS: list[Callable[[Context], StepRecord]] = [step_data, step_metric, step_protocol, step_prepare,
                                                step_baseline, step_overfit, step_tune, step_final]
