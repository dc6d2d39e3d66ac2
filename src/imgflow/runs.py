"""A run directory on disk: its file names, and loading its config and model back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgflow.errors import UserError
from imgflow.fileio import read_json


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
    return read_json(paths.config, "run config")


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


def load_run_data(train_config: dict, progress: bool = False, remarks: bool = False):
    """The data set a run was trained on, with the same test hold-out (from config.json's 'train').

    remarks: warn about skipped files and conversions; off by default, as they were reported
    when the run trained (and are in its report).
    """
    from imgflow.data import load_dataset
    from imgflow.data.splits import holdout_test

    image_size = tuple(train_config["image_size"]) if train_config.get("image_size") else None
    spec = train_config["data"]
    if Path(spec).is_absolute() and not Path(spec).exists():  # folders are recorded as absolute paths
        raise UserError(f"the run's data {spec} is gone (moved or deleted): put it back there, as "
                        "its config.json records that path")
    dataset = load_dataset(spec, image_size=image_size, progress=progress, remarks=remarks)
    return holdout_test(dataset, train_config.get("test_split", 0.0))


def create_run_model(config: dict):
    """The untrained model a run's config.json describes (architecture, classes, input)."""
    from imgflow.models import create_model

    m = config["model"]
    return create_model(m["name"], num_classes=m["num_classes"], in_channels=m["in_channels"],
                        image_size=tuple(m["image_size"]))


def load_trained_model(run_dir: Path):
    """(model in eval mode, config dict) from a finished run's config.json and model.safetensors."""
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
    model.eval()
    return model, config


def state_dict_mismatch(exc: Exception, limit: int = 300) -> str:
    """PyTorch's multi-line load_state_dict error as one line: what is missing, unexpected, or
    of another shape (its first line, 'Error(s) in loading state_dict for X:', says nothing)."""
    lines = [line.strip().rstrip(".").strip() for line in str(exc).splitlines()[1:] if line.strip()]
    text = "; ".join(lines) or str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
