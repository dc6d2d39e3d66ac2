"""A run directory on disk: its file names, and loading its config and model back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgflow.errors import MalformedContent, UserError
from imgflow.fileio import expect, field, list_of, read_json, read_json_checked


@dataclass(frozen=True)
class RunPaths:
    """File names inside a run directory (DESIGN.md, 'A run directory')."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint" / "state.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "test_predictions.npz"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def export(self) -> Path:
        return self.root / "export"  # `imgflow export`'s default --out

    def artifacts(self) -> list[Path]:
        """Everything imgflow writes into a run directory, all derived from its model: what
        `train --overwrite` replaces (files the user put there stay)."""
        return [self.config, self.history, self.weights, self.checkpoint_dir, self.metrics,
                self.predictions, self.plots, self.report, self.export]


def holds_run(run_dir: Path) -> bool:
    """True when run_dir holds a training run, finished or not (what `train` refuses to clobber)."""
    paths = RunPaths(Path(run_dir))
    return any(p.exists() for p in (paths.config, paths.history, paths.weights, paths.checkpoint))


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run; a missing directory or file is a UserError saying what to do."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file: give a run directory (the --out of 'imgflow train')")
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} (train one with 'imgflow train')")
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise UserError(f"{run_dir} is not an imgflow run directory: config.json is missing")
    return read_json_checked(paths.config, "run config", check_run_config,
                             "restore it, or train the run again (imgflow train ... --overwrite)")


def check_run_config(config: Any) -> dict:
    """config.json's content if every section the commands read has the right kind of values."""
    from imgflow.preprocess import Preprocessing
    from imgflow.training.config import TrainConfig

    expect(config, "an object", "the file")
    TrainConfig.from_dict(field(config, "train", "an object"))
    data = field(config, "data", "an object")
    for key in ("name", "sha256"):
        field(data, key, "a string", "data.")
    list_of(field(data, "classes", "a list", "data."), "a string", "'data.classes'")
    model = field(config, "model", "an object")
    field(model, "name", "a string", "model.")
    for key in ("num_classes", "in_channels", "params"):
        field(model, key, "an integer", "model.")
    list_of(field(model, "image_size", "a list", "model."), "an integer", "'model.image_size'", 2)
    Preprocessing.from_dict(field(config, "preprocessing", "an object"))
    for section in ("machine", "versions"):
        if section in config:
            field(config, section, "an object")
    if "result" in config:  # written when the run finishes
        result = field(config, "result", "an object")
        for key in ("epochs_run", "best_epoch", "train_seconds", "train_images_per_second",
                    "final_val_accuracy"):
            if result.get(key) is not None:
                field(result, key, "a number", "result.")
    return config


# What reports read from metrics.json (written by imgflow.evaluation.evaluate_run).
METRICS_NUMBERS = ("accuracy", "balanced_accuracy", "loss", "majority_baseline_accuracy",
                   "random_baseline_accuracy")
METRICS_KEYS = (*METRICS_NUMBERS, "per_class", "confusion_matrix", "num_images", "majority_class")


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of an evaluated run, checked: a damaged one says to evaluate again."""
    return read_json_checked(RunPaths(Path(run_dir)).metrics, "metrics file", check_metrics,
                             f"re-run 'imgflow evaluate {run_dir}'")


def check_metrics(metrics: Any) -> dict:
    """metrics.json's content if the numbers, per-class table and confusion matrix are well formed."""
    expect(metrics, "an object", "the file")
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise MalformedContent(f"it lacks {', '.join(missing)} (damaged or from another tool)")
    for key in METRICS_NUMBERS:
        field(metrics, key, "a number")
    field(metrics, "num_images", "an integer")
    field(metrics, "majority_class", "a string")
    per_class = field(metrics, "per_class", "an object")
    for name, scores in per_class.items():
        expect(scores, "an object", f"'per_class.{name}'")
        for key in ("precision", "recall", "f1"):
            field(scores, key, "a number", f"per_class.{name}.")
        field(scores, "support", "an integer", f"per_class.{name}.")
    K = len(per_class)  # one row and column per class
    for row in list_of(field(metrics, "confusion_matrix", "a list"), "a list", "'confusion_matrix'", K):
        list_of(row, "an integer", "a row of 'confusion_matrix'", K)
    return metrics


def unfinished_run_advice(run_dir: Path) -> str:
    """Why a run has no model yet and what to do, as its files tell it (ends a message).

    --resume is only advised when it can get further: a run that diverged would diverge again at
    the same step (same seed, same options), and one without a checkpoint has nothing to resume.
    """
    paths = RunPaths(Path(run_dir))
    config = read_json(paths.config, "run config") if paths.config.is_file() else {}
    diverged = config.get("diverged") if isinstance(config, dict) else None
    if diverged:
        return f"its training diverged: {diverged}"
    if paths.checkpoint.is_file():
        return f"the run has not finished: continue it with 'imgflow train --resume --out {run_dir}'"
    return (f"the run has no finished epoch: train it again with 'imgflow train ... --out {run_dir} "
            "--overwrite' (with a lower --lr if its loss became nan or inf)")


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its weights are saved and config.json holds its result."""
    paths = RunPaths(Path(run_dir))
    return paths.weights.is_file() and paths.config.is_file() and "result" in read_run_config(run_dir)


def load_run_data(train_config: dict, progress: bool = False, remarks: bool = False,
                  run_dir: Path | None = None):
    """The data set a run trains or was trained on, with the same test hold-out (from config.json's
    'train', or the config of a run about to start).

    remarks: warn about skipped files and conversions; off by default, as they were reported
        when the run trained (and are in its report).
    run_dir: the finished or started run whose config.json recorded the data: a missing path is
        then data that moved since, not a DATA mistyped on the command line (None: a new run).
    """
    from imgflow.data import load_dataset
    from imgflow.data.splits import holdout_test

    from imgflow.preprocess import resize_size
    from imgflow.training.config import eval_crop

    image_size = tuple(train_config["image_size"]) if train_config.get("image_size") else None
    if image_size is not None:  # a photo run keeps a margin around its centre crop
        image_size = resize_size(image_size, eval_crop(train_config))
    spec = train_config["data"]
    # Folders are recorded as absolute paths; a missing DATA of a new run is load_dataset's to name.
    if run_dir is not None and Path(spec).is_absolute() and not Path(spec).exists():
        raise UserError(f"the run's data {spec} is gone (moved or deleted): put it back there, as "
                        f"{RunPaths(Path(run_dir)).config} records that path")
    dataset = load_dataset(spec, image_size=image_size, progress=progress, remarks=remarks)
    return holdout_test(dataset, train_config.get("test_split", 0.0))


def create_run_model(config: dict):
    """The untrained model a run's config.json describes (architecture, classes, input)."""
    from imgflow.models import create_model

    m = config["model"]
    # An hf: run rebuilds its architecture from what it recorded, not from the hf: directory.
    recorded = {"hf_config": m["architecture"]} if m.get("architecture") else {}
    return create_model(m["name"], num_classes=m["num_classes"], in_channels=m["in_channels"],
                        image_size=tuple(m["image_size"]), **recorded)


def load_trained_model(run_dir: Path, device: str = "cpu"):
    """(model in eval mode on `device`, config dict) from a finished run's config.json and
    model.safetensors, ready for inference only (BatchNorm folded away where the model can). The
    weights are read on the CPU (where any run's load) and then moved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_run_config(run_dir)
    weights = RunPaths(Path(run_dir)).weights
    if not weights.is_file():
        raise UserError(f"{run_dir} has no model.safetensors: {unfinished_run_advice(run_dir)}")
    model = create_run_model(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {weights}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights} does not match model {config['model']['name']} in config.json "
                        f"({state_dict_mismatch(exc)}): train the run again with --overwrite") from None
    from imgflow.device import resolve_device

    model.eval()
    # Loaded for inference only: a model that can (FastNet) folds its BatchNorm layers into its
    # convolutions, one pass over each activation fewer for evaluate, predict, serve and export.
    if hasattr(model, "fold_batchnorm"):
        model.fold_batchnorm()
    model.to(resolve_device(device))
    return model, config


def state_dict_mismatch(exc: Exception, limit: int = 300) -> str:
    """PyTorch's multi-line load_state_dict error as one line: what is missing, unexpected, or
    of another shape (its first line, 'Error(s) in loading state_dict for X:', says nothing)."""
    lines = [line.strip().rstrip(".").strip() for line in str(exc).splitlines()[1:] if line.strip()]
    text = "; ".join(lines) or str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
