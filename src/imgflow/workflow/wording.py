"""Each step's decision and its why, in words, written from what the step decided (`decisions`).

Kept apart from the steps so that the numbers are decided in one place and the prose cannot
claim more than they say: a sentence here only words fields of a decision.
"""
from __future__ import annotations

from imgflow.text import plural
from imgflow.workflow.budget import BUDGET_SHARE
from imgflow.workflow.decisions import (BackboneComparison, BaselineOutcome, DataFacts, FinalOutcome, MetricChoice,
                                        OverfitOutcome, Preparation, PretrainedOffer, ProtocolChoice, TuneOutcome)
from imgflow.workflow.image_size import PASSES_PER_IMAGE, WORKING_SIDES
from imgflow.workflow.record import Resize


def metric_name(metric: str) -> str:
    return metric.replace("_", " ")


def _resized_from(resize: Resize | None, image_size: list[int] | None) -> str:
    """' (resized from HxW, ...)' when the workflow trains at another size than the data's, else ''."""
    if not image_size:
        return ""
    if resize is not None and resize.by_option:
        return " (resized as --image-size asked)"
    H, W = resize.typical_size
    return f" (resized from {H}x{W}, the most common size, for the time budget: step 4)"


def data_words(facts: DataFacts) -> tuple[str, str]:
    card = facts.card
    held = (f"; the source has no test split, so {facts.test_split:.0%} of each class is held out as one "
            "and not looked at until the last step") if facts.test_split else ""
    return (f"{len(card['classes'])} classes, {card['splits']['train']['count']} training images of shape "
            f"{card['image_shape']}{_resized_from(facts.resize, facts.image_size)}{held}",
            "Single-label image classification: each image gets one of the folder/class names. "
            f"Class counts range from {facts.n_min} to {facts.n_max}; {len(card['skipped'])} unreadable files "
            "were skipped.")


def metric_words(choice: MetricChoice) -> tuple[str, str]:
    return (f"measure success by {metric_name(choice.metric)}",
            f"The largest class is {choice.balance_ratio:.2f}x the smallest. Up to {choice.limit}x plain accuracy "
            "is fair; beyond it a model could score well by favouring big classes, and balanced accuracy (mean "
            "per-class recall) would be used instead. "
            + ("Here plain accuracy is fair. " if choice.metric == "accuracy" else
               "Here it is beyond that, so balanced accuracy decides. ")
            + "Per-class precision/recall/F1 and the confusion matrix are always reported.")


def protocol_words(choice: ProtocolChoice) -> tuple[str, str]:
    protocol, n_min = choice.protocol, choice.n_min
    if protocol.k_fold:
        # Only step 7 trains folds beyond fold 0, and only when its budget pays for a candidate
        # on all of them: the words promise no more than that (step 7 says what it trained).
        k = protocol.folds
        decision = (f"{k}-fold cross-validation (stratified) for step 7's candidates, where the budget pays "
                    f"for {k} runs of each; steps 5 and 6 validate on fold 0 alone")
        why = (f"The smallest class has only {n_min} training images (< {choice.holdout_min}): a single hold-out "
               f"would be too noisy to choose between candidates, so step 7 scores each on all {k} folds when its "
               f"share of the budget pays for that. Steps 5 and 6 only check the data is learnable and size the "
               f"model and its epochs: they train one run each, validated on fold 0 (a 1/{k} hold-out).")
        return decision + "; the test split is used once, at the end", why
    decision = "hold-out validation: a stratified 20% of the training images"
    why = (f"Every class has at least {choice.holdout_min} training images ({n_min} in the "
           "smallest), so a 20% hold-out gives a usable validation estimate at the cost of one training run.")
    if protocol.val_subset:
        cap, n_val = protocol.val_subset, choice.n_val
        decision += f" (of {n_val}, each epoch is scored on the same stratified {cap})"
        why += (f" Scoring every epoch on {cap} of the {n_val} held-out images keeps the "
                "accuracy's standard error at most 0.71 points and leaves the time to training; "
                "the other held-out images are used by no run but the final one.")
    return decision + "; the test split is used once, at the end", why


def _resize_words(resize: Resize | None, image_size: list[int] | None) -> tuple[str, str]:
    """Step 4's words on the image size: (decision prefix, why), both '' when nothing was resized."""
    if not image_size:
        return "", ""
    h, w = image_size
    if resize is not None and resize.by_option:
        return f"images resized to {h}x{w} (--image-size); ", ""
    H, W = resize.typical_size
    shape = ("keeping their shape" if resize.same_shape else
             "stretched to squares, as the sampled images come in several shapes")
    rungs, passes = ", ".join(map(str, WORKING_SIDES)), f"{resize.passes_per_image:.0f}"
    if resize.limit == "smallest":
        rule = (f"The rule takes the largest longer side of {rungs} px at which it pays for at least "
                f"{PASSES_PER_IMAGE}; none does, so the smallest is used ({passes} at {h}x{w})")
    elif resize.limit == "memory":
        rule = (f"{h}x{w} is the largest of {rungs} px (longer side) that pays for at least "
                f"{PASSES_PER_IMAGE} ({passes}) and whose decoded images fit in memory")
    else:
        rule = (f"The working size is the largest longer side of {rungs} px at which it pays for at "
                f"least {PASSES_PER_IMAGE} ({passes} at {h}x{w})")
    why = (f"Training time grows with the pixels: at {H}x{W} (the most common size of "
           f"{resize.sampled} images sampled) the budget would pay for about "
           f"{resize.passes_per_image * h * w / (H * W):.1f} passes over each of the "
           f"{resize.train_files} training images. {rule}, at "
           f"{resize.images_per_second_32x32:.0f} images/s measured at 32x32 and scaled by the pixel count. "
           "More time, or --image-size, buys more detail; predictions resize new images the same way. ")
    return f"images resized to {h}x{w} from {H}x{W} ({shape}); ", why


def preparation_words(preparation: Preparation) -> tuple[str, str]:
    resized, resize_why = _resize_words(preparation.resize, preparation.image_size)
    return (resized + "pixels scaled to [0, 1], then standardised per channel with the training part's mean and std",
            resize_why + "Statistics come from the training part only, never validation or test, so no information "
            "leaks into the evaluation. Images stay uint8 in memory and are converted per batch.")


def baseline_words(outcome: BaselineOutcome) -> tuple[str, str]:
    o, name = outcome, metric_name(outcome.metric)
    verdict = ("beats both" if o.beats else
               "DOES NOT BEAT the common-sense baseline: check the labels and the data before going further")
    return (f"{o.model} reaches {o.score:.3f} validation {name} in {o.epochs} epochs: {verdict}",
            f"Always predicting the most common class ('{o.majority_class}') scores "
            f"{o.majority_score:.3f}, guessing at random {o.random_acc:.3f}"
            + (f" (by {name}; plain accuracy of the majority guess: {o.majority_acc:.3f})" if o.balanced else "")
            + ". A model must clear these before it means anything.")


def pretrained_words(offer: PretrainedOffer | None) -> str:
    """One sentence on the pretrained backbone step 6 puts beside the scratch models ('' when the
    data are not photos and no --backbone was given): how it is priced and tried, or, when it
    cannot be, what it would have tried and what that needs."""
    if offer is None:
        return ""
    if offer.tried:
        size = "x".join(map(str, offer.image_size)) if offer.image_size else "the data's size"
        subset = f" on {offer.finetune_subset} images" if offer.finetune_subset else ""
        where = "" if offer.source == offer.backbone else f" (weights from {offer.source})"
        return (f" Beside them, the pretrained backbone hf:{offer.backbone}{where} trains "
                f"at {offer.images_per_second:.1f} images/s at its input size {size} (probed): step 7 tries it "
                f"frozen ({offer.frozen_epochs} epochs of its head on features computed once) and fine-tuned "
                f"({plural(offer.finetune_epochs, 'epoch')}{subset}, photo augmentation) in {offer.seconds:.0f} s, "
                "half of that step's share.")
    tried = (f"Not tried: a backbone pretrained on ImageNet and fine-tuned (hf:{offer.backbone}) usually "
             "beats small models trained from scratch on a folder of photos")
    if not offer.extra_installed:
        return f" {tried}; it needs the pretrained extra: pip install 'imgflow[pretrained]'."
    command = f"imgflow train {offer.data} --model hf:{offer.backbone} --finetune"
    return (f" {tried}; its weights are not on this machine and the workflow downloads nothing: "
            f"{command} --pretrained fetches them once (the workflow then finds them), or "
            "imgflow workflow --backbone hf:DIR trains one saved in DIR.")


def backbone_words(comparison: BackboneComparison, metric: str) -> str:
    """Which of the pretrained backbone's two candidates won, and why, in one sentence."""
    c = comparison
    frozen, finetuned = c.frozen.val_score, c.finetuned.val_score
    scores = (f"validation {metric_name(metric)} {finetuned:.4f} fine-tuned ({c.finetuned_seconds:.1f} s of "
              f"training), {frozen:.4f} frozen ({c.frozen_seconds:.1f} s)")
    if c.clear:
        winner = "fine-tuning" if c.winner is c.finetuned else "frozen features"
        return (f" Pretrained hf:{c.backbone}: {winner} won, more than one standard error ({c.standard_error:.4f}) "
                f"ahead: {scores}.")
    return (f" Pretrained hf:{c.backbone}: frozen features won, as the two are within one standard error "
            f"({c.standard_error:.4f}) of each other ({scores}) and the frozen backbone trains only its head, "
            "on features computed once.")


def overfit_words(outcome: OverfitOutcome) -> tuple[str, str]:
    decided, why = _overfit_words(outcome)
    return decided, why + pretrained_words(outcome.pretrained)


def _overfit_words(outcome: OverfitOutcome) -> tuple[str, str]:
    o = outcome
    if o.verdict == "overfits":
        return (f"{o.model} overfits: validation loss is lowest at epoch {o.best_epoch} and rises after "
                "it while training loss keeps falling",
                "Capacity is now enough to memorise the training data, which is what regularisation "
                "needs to work on.")
    gap = o.final_train_acc - o.final_val_acc
    if o.verdict == "memorises":
        return (f"{o.model} memorises its training images (training accuracy {o.final_train_acc:.3f}, validation "
                f"{o.final_val_acc:.3f}), though its validation loss had not turned up within {o.epochs} epochs",
                f"A gap of {100 * gap:.0f} points between training and validation accuracy, without any "
                "regularisation, is capacity to spare: the model learns its training images' particulars. "
                "The curves did not show the turn this step looks for (validation loss rising for "
                f"{o.patience} epochs while training loss falls), but regularisation has enough to work on.")
    return (f"{o.model} did not overfit within {o.epochs} epochs",
            f"Training and validation accuracy ended {100 * gap:.0f} points apart and validation loss did "
            "not turn up: more epochs or a larger model (more budget) would be the next move. "
            "Regularisation is tuned on this model anyway.")


def _no_candidate_why(o: TuneOutcome) -> str:
    b = o.budget
    why = (f"NO regularised candidate fitted the budget: the step had {b.seconds:.0f} s "
           f"({BUDGET_SHARE['tune']:.0%} of the budget"
           + (f", {b.scratch_share:.0%} of it for these" if b.scratch_share < 1 else "")
           + ")" + (" and trained nothing in them" if o.backbone is None else "") + ". One candidate takes "
           f"{b.per_candidate:.0f} s ({plural(b.folds, 'fold')} of {o.epochs} epochs)")
    if b.folds > 1:
        why += (f", and beside the first one the reference's other {plural(b.folds - 1, 'fold')} would take "
                f"{b.reference_seconds:.0f} s: {b.reference_seconds + b.per_candidate:.0f} s in all")
    why += (". The step-6 configuration is retrained as it is; a larger --budget-minutes would compare candidates."
            if o.backbone is None else ".")
    if b.folds > 1:
        why += (f" No fold but fold 0 was trained, so there was no cross-validation: the step-6 run's score on "
                f"fold 0 ({o.scored_images} images) is the only one.")
    return why


def tune_words(outcome: TuneOutcome) -> tuple[str, str]:
    o, b = outcome, outcome.budget
    if b.candidates == 0:
        why = _no_candidate_why(o)
    else:
        why = (f"{plural(b.candidates, 'regularised candidate')} trained like the step-6 run ({o.epochs} epochs) "
               "and compared with it on validation only"
               + (f" ({o.folds_trained}-fold cross-validation)" if o.folds_trained > 1 else "")
               + (f"; {o.skipped} more did not fit the budget" if o.skipped else "")
               + f". The step had {b.seconds:.0f} s ({BUDGET_SHARE['tune']:.0%} of the budget"
               + (f", {b.scratch_share:.0%} of it for these" if b.scratch_share < 1 else "")
               + f"); its runs trained for {o.seconds_trained:.0f} s.")
    if o.chosen is not o.best:
        why += (f" '{o.best.name}' scored best ({o.best.val_score:.4f}), but '{o.chosen.name}' is at most "
                f"one standard error ({o.standard_error:.4f} on {o.scored_images} images) behind it and "
                "regularises more: a difference that small is noise, so the one-standard-error rule takes "
                "the more regularised candidate.")
    if o.backbone is not None:
        why += backbone_words(o.backbone, o.metric)
    return (f"chose '{o.chosen.name}' ({o.chosen.description}): validation {metric_name(o.metric)} "
            f"{o.chosen.val_score:.4f}", why)


def final_words(outcome: FinalOutcome) -> tuple[str, str]:
    o = outcome
    images = (f"{o.trained_on} of the {o.n_train} training images" if o.subset else f"all {o.n_train} training images")
    decision = (f"retrained '{o.chosen}' on {images} for {plural(o.epochs, 'epoch')}"
                + (f" ({o.validated_epochs} validated; what the rest of the budget paid for)"
                   if o.epochs != o.validated_epochs or o.subset else "")
                + (" with Muon, the `best` preset's recipe" if o.recipe_changed_to == "muon" else "")
                + f"; test {metric_name(o.metric)} {o.test[o.metric]:.4f}"
                + (" with test-time augmentation" if o.tta else "")
                + f" (majority baseline {o.test['majority_baseline_accuracy']:.4f})")
    switched = (f" On {o.trained_on} images a batch of 1,000 leaves enough steps per epoch for airbench94_muon's "
                "recipe (Muon for the convolution filters), which reaches in fewer epochs what the SGD recipe "
                "explored with does; the chosen regularisation is kept." if o.recipe_changed_to == "muon" else "")
    views = (" It trained on mirrored and shifted images, so each test image is classified by the weighted "
             "average of six views: itself and its mirror, and both shifted by a pixel down-right and up-left, "
             "each with its mirror (airbench94's)." if o.tta else "")
    why = ("The chosen configuration is retrained with the validation images added back, then evaluated "
           "once on the untouched test split: this number was not used for any decision." + switched + views)
    return decision, why
