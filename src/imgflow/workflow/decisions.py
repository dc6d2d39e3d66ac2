"""What each step decided, as data: the steps compute these, `wording` writes the prose from
them, and `metrics()` gives the numbers recorded beside it in workflow.json (keys never renamed:
scripts and the report read them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgflow.workflow.budget import TuneBudget
from imgflow.workflow.record import Candidate, Protocol, Resize


@dataclass
class DataFacts:
    """Step 1: the data card, and the test split held out when the source has none."""

    card: dict[str, Any]  # `imgflow inspect --json`
    test_split: float  # share held out as the test split (0: the source has one)
    resize: Resize | None  # the working size chosen before loading
    image_size: list[int] | None  # the size trained at (None: the data's own)

    @property
    def per_class(self) -> dict[str, int]:
        return self.card["splits"]["train"]["per_class"]

    @property
    def n_min(self) -> int:
        return min(self.per_class.values())

    @property
    def n_max(self) -> int:
        return max(self.per_class.values())

    def metrics(self) -> dict[str, Any]:
        splits = self.card["splits"]
        return {"classes": len(self.card["classes"]), "train_images": splits["train"]["count"],
                "test_images": splits["test"]["count"] if splits.get("test") else None,
                "min_per_class": self.n_min, "max_per_class": self.n_max, "skipped_files": len(self.card["skipped"])}


@dataclass
class MetricChoice:
    """Step 2: plain accuracy while the classes are balanced enough, else balanced accuracy."""

    balance_ratio: float  # largest class / smallest
    limit: float  # the largest ratio at which plain accuracy is fair
    metric: str  # accuracy | balanced_accuracy

    def metrics(self) -> dict[str, Any]:
        return {"balance_ratio": round(self.balance_ratio, 3), "rule_max_over_min": self.limit}


@dataclass
class ProtocolChoice:
    """Step 3: a stratified hold-out when every class is large enough, else k-fold."""

    protocol: Protocol
    n_min: int  # training images in the smallest class
    holdout_min: int  # the fewest per class a hold-out needs
    n_val: int | None = None  # hold-out: its images (of which val_subset score each epoch)

    def metrics(self) -> dict[str, Any]:
        return {"smallest_class_train_images": self.n_min, **self.protocol.to_dict()}


@dataclass
class Preparation:
    """Step 4: per-channel statistics of the training part, and the working size."""

    mean: list[float]
    std: list[float]
    n_images: int  # images the statistics came from (the training part only)
    resize: Resize | None
    image_size: list[int] | None

    def metrics(self) -> dict[str, Any]:
        metrics = {"channel_mean": [round(m, 4) for m in self.mean], "channel_std": [round(s, 4) for s in self.std],
                   "images_used_for_statistics": self.n_images}
        if self.image_size:
            metrics["image_size"] = self.image_size
        return metrics


@dataclass
class BaselineOutcome:
    """Step 5: the small model against always guessing the majority class, or at random."""

    model: str
    epochs: int
    train_subset: int  # 0: all the training part
    images_per_second: float  # the pace the plan assumed
    metric: str  # step 2's measure
    score: float  # the small model's validation score by it
    small_model_val_acc: float
    majority_class: str
    majority_acc: float  # plain accuracy of always guessing the majority class
    random_acc: float  # 1 / classes

    @property
    def balanced(self) -> bool:
        return self.metric != "accuracy"

    @property
    def majority_score(self) -> float:
        # Balanced accuracy gives every constant or random guess 1/classes.
        return self.random_acc if self.balanced else self.majority_acc

    @property
    def beats(self) -> bool:
        return self.score > max(self.majority_score, self.random_acc)

    def metrics(self) -> dict[str, Any]:
        metrics = {"majority_baseline_val_acc": self.majority_acc, "random_baseline_val_acc": self.random_acc,
                   "small_model_val_acc": self.small_model_val_acc, "epochs": self.epochs,
                   "train_subset": self.train_subset, "train_images_per_second": round(self.images_per_second, 1),
                   "beats_baseline": self.beats}
        if self.balanced:
            metrics.update(metric=self.metric, majority_baseline_val_score=self.majority_score,
                           random_baseline_val_score=self.random_acc, small_model_val_score=self.score)
        return metrics


@dataclass
class PretrainedOffer:
    """Step 6, for a folder of photos (or any data with --backbone): the pretrained backbone beside
    the scratch models. Tried when its weights are on this machine (`source`): then priced by its
    measured pace and planned as step 7's two candidates; else step 6 says what it needs."""

    backbone: str  # the hub id, e.g. microsoft/resnet-18, or --backbone's directory
    data: str  # the DATA argument, for the command it suggests
    extra_installed: bool  # the `pretrained` extra (transformers)
    weights_cached: bool  # the backbone's weights are in Hugging Face's cache (nothing downloaded to see)
    source: str | None = None  # the local directory it trains from (None: not tried)
    image_size: list[int] | None = None  # its input size, trained at
    images_per_second: float | None = None  # its training pace there, probed
    frozen_epochs: int | None = None  # the frozen candidate's head epochs (on cached features)
    finetune_epochs: int | None = None  # the fine-tuned candidate's epochs
    finetune_subset: int | None = None  # its training images (0: all)
    seconds: float | None = None  # the part of step 7's share the two have

    @property
    def tried(self) -> bool:
        return self.source is not None

    def metrics(self) -> dict[str, Any]:
        metrics = {"pretrained_backbone": self.backbone, "pretrained_extra_installed": self.extra_installed,
                   "pretrained_weights_cached": self.weights_cached}
        if self.tried:
            metrics.update(pretrained_source=self.source, pretrained_image_size=self.image_size,
                           pretrained_images_per_second=round(self.images_per_second, 1),
                           pretrained_frozen_epochs=self.frozen_epochs, pretrained_finetune_epochs=self.finetune_epochs,
                           pretrained_finetune_subset=self.finetune_subset,
                           pretrained_seconds=round(self.seconds, 1))
        return metrics


@dataclass
class OverfitOutcome:
    """Step 6: the scaled-up model, and whether its curves show it can overfit."""

    model: str
    model_rule: str | None  # why this model: "final run affords it" | "smallest"
    epochs: int
    train_subset: int
    images_per_second: float
    best_epoch: int | None  # where validation loss turned up (None: it did not)
    verdict: str  # selection.overfit_verdict: overfits | memorises | neither
    patience: int  # epochs of rising validation loss that count as the turn
    best_val_acc: float
    final_train_acc: float
    final_val_acc: float
    pretrained: PretrainedOffer | None = None  # photos: the backbone not tried (None: not photos)

    def metrics(self) -> dict[str, Any]:
        return {"model": self.model, "model_rule": self.model_rule, "epochs": self.epochs,
                "train_subset": self.train_subset, "best_val_acc": self.best_val_acc,
                "overfit_epoch": self.best_epoch, "memorises": self.verdict != "neither",
                "train_images_per_second": round(self.images_per_second, 1),
                "final_train_acc": self.final_train_acc, "final_val_acc": self.final_val_acc,
                **(self.pretrained.metrics() if self.pretrained else {})}


@dataclass
class BackboneComparison:
    """Step 7: the pretrained backbone frozen (its head on cached features) against fine-tuned
    (photo augmentation), and which won. A difference of at most one standard error is noise:
    then the frozen one wins, as it trains only the head (the one-standard-error rule's choice
    too) and its final run costs a pass of the backbone instead of its epochs."""

    backbone: str
    frozen: Candidate
    finetuned: Candidate
    frozen_seconds: float  # epochs' time of its runs
    finetuned_seconds: float
    standard_error: float  # of the better score, on the images the scores average over

    @property
    def clear(self) -> bool:
        """The scores differ by more than one standard error."""
        return abs(self.finetuned.val_score - self.frozen.val_score) > self.standard_error

    @property
    def winner(self) -> Candidate:
        ahead = self.finetuned.val_score > self.frozen.val_score
        return self.finetuned if self.clear and ahead else self.frozen

    def metrics(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "frozen": round(self.frozen.val_score, 4),
                "finetuned": round(self.finetuned.val_score, 4), "winner": self.winner.name,
                "clear": self.clear, "standard_error": round(self.standard_error, 4),
                "frozen_seconds": round(self.frozen_seconds, 1), "finetuned_seconds": round(self.finetuned_seconds, 1)}


@dataclass
class TuneOutcome:
    """Step 7: the candidates compared on validation, and the one the rule chose."""

    budget: TuneBudget
    epochs: int  # every candidate's, the step-6 run's
    candidates: list[Candidate]  # "none" (the step-6 configuration) first
    chosen: Candidate
    best: Candidate  # the best-scoring one (the chosen one, unless within one standard error)
    standard_error: float
    scored_images: int  # images each score averages over
    metric: str
    skipped: int  # candidates the budget did not pay for
    seconds_trained: float  # epochs' time of the runs this step trained (the step-6 run is reused)
    backbone: BackboneComparison | None = None  # the pretrained backbone's two candidates (None: not tried)

    @property
    def folds_trained(self) -> int:
        """Runs each score rests on: k only where step 7 trained every fold."""
        return max(len(c.runs) for c in self.candidates)

    def metrics(self) -> dict[str, Any]:
        return {"candidates": {c.name: round(c.val_score, 4) for c in self.candidates}, "metric": self.metric,
                "epochs": self.epochs, "standard_error": round(self.standard_error, 4),
                "scored_images": self.scored_images, "folds_trained": self.folds_trained,
                "seconds_available": round(self.budget.seconds, 1), "seconds_trained": round(self.seconds_trained, 1),
                **({"pretrained_comparison": self.backbone.metrics()} if self.backbone else {})}


@dataclass
class FinalOutcome:
    """Step 8: the chosen configuration retrained and tested once."""

    chosen: str  # the candidate's name
    n_train: int  # the training split
    trained_on: int  # images it trained on (a stratified subset rounds per class)
    subset: bool  # trained on a subset of the training split
    epochs: int
    validated_epochs: int
    metric: str
    test: dict[str, Any]  # metrics.json
    tta: bool  # tested on mirrored and shifted views too
    recipe_changed_to: str | None = None  # the optimiser it trained with when not the explored one's

    def metrics(self) -> dict[str, Any]:
        t = self.test
        return {"test_accuracy": t["accuracy"], "tta": self.tta, "test_balanced_accuracy": t["balanced_accuracy"],
                "test_macro_f1": t["macro_f1"], "test_loss": t["loss"],
                "majority_baseline_accuracy": t["majority_baseline_accuracy"], "epochs": self.epochs,
                "validated_epochs": self.validated_epochs, "train_subset": self.trained_on if self.subset else 0,
                "recipe_changed_to": self.recipe_changed_to}
