"""OUT/workflow.json: its schema, as the typed record and state that the steps and the report share.

workflow.json is read back for two purposes: to continue a workflow, whose next steps read what
the finished ones left in the state (so all of that must be there), and to write the report,
which can be written from as little as the steps' decisions, and from records of older versions
(fields added since then are optional, with the value those versions meant). Every `from_dict`
checks kinds as it reads, so a damaged file is one UserError naming the field at fault
(`read_workflow_record`), never a KeyError in a later step. `to_dict` writes the same keys, in
the same order, as the versions before the state was typed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

from imgflow.errors import MalformedContent
from imgflow.fileio import describe, expect, field, list_of, read_json_checked
from imgflow.workflow import budget

STEP_NAMES = [
    "define the problem and assemble the data",
    "choose a measure of success",
    "decide an evaluation protocol",
    "prepare the data",
    "beat a common-sense baseline",
    "scale up until it overfits",
    "regularise and tune",
    "test once and deploy",
]
NUM_STEPS = len(STEP_NAMES)  # a record with fewer is an interrupted workflow
# What a finished step leaves in the state for the steps after it, by step number.
STATE_LEFT_BY_STEP = {1: ("test_split", "classes"), 2: ("metric",), 3: ("protocol",), 6: ("scaled",),
                      7: ("chosen",)}
METRICS = ("accuracy", "balanced_accuracy")  # step 2's measures of success
PROTOCOLS = ("hold-out", "k-fold")  # step 3's evaluation protocols
FIX = "restore it, or choose another --out to start the workflow over"


# ----------------------------------------------------------------------------------------------
# reading helpers: each returns the value or raises MalformedContent naming it


def _optional(obj: dict, key: str, kind: str, where: str = "", default: Any = None) -> Any:
    """obj[key] checked as `kind`, or `default` when it is absent or null."""
    value = obj.get(key)
    return default if value is None else expect(value, kind, f"'{where}{key}'")


def _size(value: Any, name: str) -> list[int] | None:
    """An (H, W) as a list of 2 integers, or None."""
    return None if value is None else list_of(value, "an integer", name, 2)


def _optional_flag(obj: dict, key: str, where: str) -> bool | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        raise MalformedContent(f"'{where}{key}' is {describe(value)}, expected true or false")
    return value


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise MalformedContent(f"{name} is {value!r}, expected one of {', '.join(allowed)}")
    return value


def _without_none(d: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None or k in keep}


# ----------------------------------------------------------------------------------------------
# the state the steps leave for each other


# What the size rule leaves for step 4 to word when it chose a size other than the data's.
RULE_FACTS = ("typical_size", "sampled", "train_files", "same_shape", "images_per_second_32x32",
              "passes_per_image", "limit")


@dataclass
class Resize:
    """The working image size, decided before anything is decoded (step 1; worded in step 4)."""

    image_size: list[int] | None  # [H, W] to train at; None: the data's own size
    chosen_by: str | None = None  # "--image-size" when the user chose it
    # What the size rule saw and concluded (image_size.working_image_size):
    typical_size: list[int] | None = None  # the most common [H, W] of the sampled images
    sampled: int | None = None  # image headers read
    train_files: int | None = None  # files in the training split
    same_shape: bool | None = None  # one shape (kept) or several (stretched to squares)
    images_per_second_32x32: float | None = None  # fast-small's training pace at 32x32
    passes_per_image: float | None = None  # training passes over every image the budget pays for
    limit: str | None = None  # what stopped a larger size: top | budget | memory | smallest

    @property
    def by_option(self) -> bool:
        return self.chosen_by == "--image-size"

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self), keep=("image_size",))

    @classmethod
    def from_dict(cls, d: Any, where: str = "state.resize.") -> Resize:
        expect(d, "an object", f"'{where[:-1]}'")
        resize = cls(image_size=_size(d.get("image_size"), f"'{where}image_size'"),
                     chosen_by=_optional(d, "chosen_by", "a string", where),
                     typical_size=_size(d.get("typical_size"), f"'{where}typical_size'"),
                     sampled=_optional(d, "sampled", "an integer", where),
                     train_files=_optional(d, "train_files", "an integer", where),
                     same_shape=_optional_flag(d, "same_shape", where),
                     images_per_second_32x32=_optional(d, "images_per_second_32x32", "a number", where),
                     passes_per_image=_optional(d, "passes_per_image", "a number", where),
                     limit=_optional(d, "limit", "a string", where))
        if resize.image_size is not None and not resize.by_option:  # the rule chose it: step 4 words its facts
            missing = [key for key in RULE_FACTS if getattr(resize, key) is None]
            if missing:
                raise MalformedContent(f"'{where}{missing[0]}' is missing")
        return resize


@dataclass
class Protocol:
    """Step 3's evaluation protocol."""

    kind: str  # hold-out | k-fold
    val_split: float | None = None  # hold-out: the share of each class held out
    val_subset: int | None = None  # hold-out: each epoch scored on this many of them (None: all)
    folds: int | None = None  # k-fold: k
    scored_per_class: list[int] | None = None  # images per class a candidate's score averages over

    @property
    def k_fold(self) -> bool:
        return self.kind == "k-fold"

    @property
    def runs_per_candidate(self) -> int:
        return self.folds if self.k_fold else 1

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Any, where: str = "state.protocol.") -> Protocol:
        expect(d, "an object", f"'{where[:-1]}'")
        kind = _one_of(field(d, "kind", "a string", where), PROTOCOLS, f"'{where}kind'")
        scored = _optional(d, "scored_per_class", "a list", where)
        protocol = cls(kind, scored_per_class=None if scored is None else list_of(
            scored, "an integer", f"'{where}scored_per_class'"))
        if protocol.k_fold:
            protocol.folds = field(d, "folds", "an integer", where)
        else:
            protocol.val_split = field(d, "val_split", "a number", where)
            protocol.val_subset = _optional(d, "val_subset", "an integer", where)
        return protocol


@dataclass
class Plan:
    """A run's settings and what they were based on, saved before the run starts (steps 5, 6, 8)."""

    images_per_second: float  # the training pace the plan assumed
    settings: dict[str, Any]  # TrainConfig fields (resolve_config's overrides)
    model_rule: str | None = None  # step 6: why this model ("final run affords it" | "smallest")

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Plan:
        expect(d, "an object", f"'{where[:-1]}'")
        return cls(field(d, "images_per_second", "a number", where), field(d, "settings", "an object", where),
                   _optional(d, "model_rule", "a string", where))


@dataclass
class Scaled:
    """Step 6's run: the unregularised reference step 7 trains its candidates like."""

    model: str
    epochs: int
    train_subset: int  # 0: all the training part
    best_epoch: int | None  # where validation loss turned up (None: it did not)
    settings: dict[str, Any]
    run: str  # its directory, relative to OUT
    final_val_acc: float
    final_val_loss: float
    final_val_score: float | None  # by step 2's measure (None: a record from before it was kept)
    seconds_per_epoch: float  # its median epoch time, which step 7 plans with

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self), keep=("best_epoch",))

    @classmethod
    def from_dict(cls, d: Any, where: str = "state.scaled.") -> Scaled:
        expect(d, "an object", f"'{where[:-1]}'")
        settings = field(d, "settings", "an object", where)  # what later runs start from: checked first
        return cls(model=field(d, "model", "a string", where), epochs=field(d, "epochs", "an integer", where),
                   train_subset=field(d, "train_subset", "an integer", where),
                   best_epoch=_optional(d, "best_epoch", "an integer", where), settings=settings,
                   run=field(d, "run", "a string", where),
                   final_val_acc=field(d, "final_val_acc", "a number", where),
                   final_val_loss=field(d, "final_val_loss", "a number", where),
                   final_val_score=_optional(d, "final_val_score", "a number", where),
                   seconds_per_epoch=field(d, "seconds_per_epoch", "a number", where))


@dataclass
class Candidate:
    """One configuration step 7 compared on validation (the step-6 run is the one named 'none')."""

    name: str
    description: str
    settings: dict[str, Any]
    val_acc: float  # mean over its folds (one run on a hold-out)
    val_acc_std: float
    val_loss: float
    runs: list[str]  # its run directories (one per fold), relative to OUT
    regularisation: int = 0  # how many regularisers it adds: the one-standard-error rule's rank
    val_score: float | None = None  # by step 2's measure (None: a record from before it)
    val_score_std: float | None = None
    run: str | None = None  # the first of runs (None: a record from before it)

    def to_dict(self) -> dict[str, Any]:
        return _without_none({"name": self.name, "description": self.description, "settings": self.settings,
                              "regularisation": self.regularisation, "val_acc": self.val_acc,
                              "val_acc_std": self.val_acc_std, "val_score": self.val_score,
                              "val_score_std": self.val_score_std, "val_loss": self.val_loss,
                              "runs": self.runs, "run": self.run})

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Candidate:
        expect(d, "an object", f"'{where[:-1]}'")
        settings = field(d, "settings", "an object", where)  # what step 8 retrains: checked first
        return cls(name=field(d, "name", "a string", where), description=field(d, "description", "a string", where),
                   settings=settings, val_acc=field(d, "val_acc", "a number", where),
                   val_acc_std=field(d, "val_acc_std", "a number", where),
                   val_loss=field(d, "val_loss", "a number", where),
                   runs=list_of(field(d, "runs", "a list", where), "a string", f"'{where}runs'"),
                   regularisation=_optional(d, "regularisation", "an integer", where, 0),
                   val_score=_optional(d, "val_score", "a number", where),
                   val_score_std=_optional(d, "val_score_std", "a number", where),
                   run=_optional(d, "run", "a string", where))


@dataclass
class WorkflowState:
    """What the steps decided that later steps (and a continued workflow) need, by the step that
    leaves it; None until that step ran."""

    image_size: list[int] | None = None  # before step 1: the working size (None: the data's own)
    resize: Resize | None = None  # before step 1: how that size was chosen
    test_split: float | None = None  # step 1: share held out as the test split (0: the source has one)
    balance_ratio: float | None = None  # step 1: largest class / smallest
    classes: list[str] | None = None  # step 1
    metric: str | None = None  # step 2: accuracy | balanced_accuracy
    protocol: Protocol | None = None  # step 3
    plans: dict[str, Plan] = dataclass_field(default_factory=dict)  # run name -> its plan (steps 5, 6, 8)
    scaled: Scaled | None = None  # step 6
    chosen: Candidate | None = None  # step 7
    final_run: str | None = None  # step 8: the final run's directory
    test_accuracy: float | None = None  # step 8

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["plans"] = {name: plan.to_dict() for name, plan in self.plans.items()} or None
        for key in ("resize", "protocol", "scaled", "chosen"):
            d[key] = d[key].to_dict() if d[key] is not None else None
        return _without_none(d, keep=("image_size",))

    @classmethod
    def from_dict(cls, d: Any, where: str = "state.") -> WorkflowState:
        expect(d, "an object", f"'{where[:-1]}'")
        plans = _optional(d, "plans", "an object", where, {})
        classes = _optional(d, "classes", "a list", where)
        metric = _optional(d, "metric", "a string", where)
        return cls(
            image_size=_size(d.get("image_size"), f"'{where}image_size'"),
            resize=Resize.from_dict(d["resize"], f"{where}resize.") if d.get("resize") is not None else None,
            test_split=_optional(d, "test_split", "a number", where),
            balance_ratio=_optional(d, "balance_ratio", "a number", where),
            classes=None if classes is None else list_of(classes, "a string", f"'{where}classes'"),
            metric=None if metric is None else _one_of(metric, METRICS, f"'{where}metric'"),
            protocol=Protocol.from_dict(d["protocol"], f"{where}protocol.") if "protocol" in d else None,
            plans={name: Plan.from_dict(plan, f"{where}plans.{name}.") for name, plan in plans.items()},
            scaled=Scaled.from_dict(d["scaled"], f"{where}scaled.") if "scaled" in d else None,
            chosen=Candidate.from_dict(d["chosen"], f"{where}chosen.") if "chosen" in d else None,
            final_run=_optional(d, "final_run", "a string", where),
            test_accuracy=_optional(d, "test_accuracy", "a number", where))


# ----------------------------------------------------------------------------------------------
# the steps' records and the constants their prose rests on


@dataclass
class StepRecord:
    """One finished step: what it decided and why, in words, with its numbers."""

    name: str
    decision: str
    why: str
    metrics: dict[str, Any] = dataclass_field(default_factory=dict)  # the step's numbers, its own keys
    card: dict[str, Any] | None = None  # step 1: the data card (`imgflow inspect --json`)
    figures: dict[str, str] | None = None  # step 1: figure name -> file in OUT
    runs: list[str] | None = None  # training runs it made (or reused), relative to OUT
    candidates: list[Candidate] | None = None  # step 7: every candidate compared
    usage: str | None = None  # step 8: how to use the model
    seconds: float | None = None  # wall time of the step in the invocation that finished it

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.candidates is not None:
            d["candidates"] = [c.to_dict() for c in self.candidates]
        return _without_none(d)

    @classmethod
    def from_dict(cls, d: Any, number: int) -> StepRecord:
        where = f"steps.{number}."
        expect(d, "an object", f"'steps.{number}'")
        candidates = _optional(d, "candidates", "a list", where)
        runs = _optional(d, "runs", "a list", where)
        return cls(name=field(d, "name", "a string", where), decision=field(d, "decision", "a string", where),
                   why=field(d, "why", "a string", where), metrics=_optional(d, "metrics", "an object", where, {}),
                   card=_optional(d, "card", "an object", where), figures=_optional(d, "figures", "an object", where),
                   runs=None if runs is None else list_of(runs, "a string", f"'{where}runs'"),
                   candidates=None if candidates is None else [
                       Candidate.from_dict(c, f"{where}candidates.{i}.") for i, c in enumerate(candidates, 1)],
                   usage=_optional(d, "usage", "a string", where), seconds=_optional(d, "seconds", "a number", where))


@dataclass
class Constants:
    """The workflow's constants that the report's prose quotes, as the run that wrote the record
    had them: the report explains an old workflow.json with its own numbers, not today's."""

    budget_share: dict[str, float]  # budget.BUDGET_SHARE
    final_min_epochs: int  # budget.FINAL_MIN_EPOCHS
    final_epochs_factor: int  # budget.FINAL_EPOCHS_FACTOR
    scaled_models: list[str]  # budget.SCALED_MODELS, largest first

    @classmethod
    def current(cls) -> Constants:
        """Today's values (read when called, so a test's monkeypatch counts)."""
        return cls(dict(budget.BUDGET_SHARE), budget.FINAL_MIN_EPOCHS, budget.FINAL_EPOCHS_FACTOR,
                   list(budget.SCALED_MODELS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "constants.") -> Constants:
        expect(d, "an object", f"'{where[:-1]}'")
        shares = field(d, "budget_share", "an object", where)
        for key, share in shares.items():
            expect(share, "a number", f"'{where}budget_share.{key}'")
        return cls(shares, field(d, "final_min_epochs", "an integer", where),
                   field(d, "final_epochs_factor", "an integer", where),
                   list_of(field(d, "scaled_models", "a list", where), "a string", f"'{where}scaled_models'"))


@dataclass
class WorkflowRecord:
    """OUT/workflow.json: the workflow's settings, its finished steps and the state they left."""

    data: str | None = None  # DATA as given
    seed: int | None = None
    budget_minutes: float | None = None
    image_size: list[int] | None = None  # --image-size as given (None: the workflow chose)
    backbone: str | None = None  # --backbone as given (None: none given)
    constants: Constants | None = None  # None: a record from before they were recorded
    steps: list[StepRecord] = dataclass_field(default_factory=list)
    state: WorkflowState = dataclass_field(default_factory=WorkflowState)
    elapsed_minutes: float | None = None  # time spent so far, over all invocations
    final_run: str | None = None  # written when the workflow ends
    test_accuracy: float | None = None
    report: str | None = None  # OUT/report.html, once written

    def to_dict(self) -> dict[str, Any]:
        return _without_none({
            "data": self.data, "seed": self.seed, "budget_minutes": self.budget_minutes,
            "image_size": self.image_size, "backbone": self.backbone,
            "constants": self.constants.to_dict() if self.constants else None,
            "steps": [s.to_dict() for s in self.steps], "state": self.state.to_dict(),
            "elapsed_minutes": self.elapsed_minutes, "final_run": self.final_run,
            "test_accuracy": self.test_accuracy, "report": self.report}, keep=("image_size",))

    @classmethod
    def from_dict(cls, d: Any, to_continue: bool = False) -> WorkflowRecord:
        """Check and read workflow.json's content. to_continue: the workflow will run its next
        steps, so every setting it continues from, and what the finished steps left in the state
        for them, must be there (a report needs less)."""
        expect(d, "an object", "the file")
        for key, kind in (("data", "a string"), ("seed", "an integer"), ("budget_minutes", "a number"),
                          ("elapsed_minutes", "a number"), ("steps", "a list"), ("state", "an object"),
                          ("test_accuracy", "a number"), ("final_run", "a string"), ("report", "a string"),
                          ("image_size", "a list"), ("backbone", "a string"), ("constants", "an object")):
            _optional(d, key, kind)
        steps = d.get("steps") or []
        if len(steps) > NUM_STEPS:
            raise MalformedContent(f"'steps' has {len(steps)} items, at most {NUM_STEPS}")
        record = cls(data=d.get("data"), seed=d.get("seed"), budget_minutes=d.get("budget_minutes"),
                     image_size=_size(d.get("image_size"), "'image_size'"), backbone=d.get("backbone"),
                     constants=Constants.from_dict(d["constants"]) if d.get("constants") is not None else None,
                     steps=[StepRecord.from_dict(step, number) for number, step in enumerate(steps, 1)],
                     state=WorkflowState.from_dict(d.get("state") or {}), elapsed_minutes=d.get("elapsed_minutes"),
                     final_run=d.get("final_run"), test_accuracy=d.get("test_accuracy"), report=d.get("report"))
        if to_continue:
            record._check_continuable(d)
        return record

    def _check_continuable(self, d: dict) -> None:
        # final_run, test_accuracy and report are written once the workflow ends; image_size is
        # absent from records of versions before --image-size (None: the data's own size, as they
        # trained); constants from those before they were recorded.
        for key, kind in (("data", "a string"), ("seed", "an integer"), ("budget_minutes", "a number"),
                          ("elapsed_minutes", "a number"), ("steps", "a list"), ("state", "an object")):
            field(d, key, kind)
        for number in range(1, len(self.steps) + 1):
            for key in STATE_LEFT_BY_STEP.get(number, ()):
                if getattr(self.state, key) is None:
                    raise MalformedContent(f"step {number} is finished but 'state.{key}', which it leaves for "
                                           "the steps after it, is missing")


def read_workflow_record(path: Path, to_continue: bool = False) -> WorkflowRecord:
    """OUT/workflow.json, checked: a damaged one is a UserError naming the field at fault."""
    return read_json_checked(path, "workflow record", lambda d: WorkflowRecord.from_dict(d, to_continue), FIX)
