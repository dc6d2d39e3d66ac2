"""`imgflow reproduce-seed`: the reference notebook's two experiments, side by side with its numbers."""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

from imgflow.device import resolve_device
from imgflow.errors import UserError
from imgflow.evaluation import evaluate_run
from imgflow.fileio import atomic_write_text, write_json
from imgflow.inference import loss_and_accuracy, predict_logits
from imgflow.preprocess import Preprocessing
from imgflow.precision import set_threads
from imgflow.runs import RunPaths, is_finished, load_run_data, load_trained_model, read_metrics, read_run_config
from imgflow.training.batchnorm import has_batchnorm, reestimate_on_training_part
from imgflow.training.config import TrainConfig, resolve_config
from imgflow.history import read_history
from imgflow.training.batches import split_for_training
from imgflow.training.loop import train
from imgflow.training.rundir import config_differences

log = logging.getLogger(__name__)

# What the reference notebook printed (TensorFlow/Keras, CIFAR-10 official files, 20 epochs).
NOTEBOOK_TEST_ACCURACY = {"seed-baseline": 0.68, "seed-batchnorm": 0.8318}
NOTEBOOK_PARAMS = {"seed-baseline": 156_074, "seed-batchnorm": 1_517_450}
# Training images to re-estimate BatchNorm statistics on for the table's extra column: enough
# for the averages to settle (tens of batches), a minute of seed-batchnorm inference here.
PRECISE_BN_IMAGES = 10_000


def reproduce_seed(data: str, out: Path, precision: str = "fp32", epochs: int = 20,
                   models: list[str] | tuple[str, ...] = ("seed-baseline", "seed-batchnorm"),
                   seed: int = 0, resume: bool = False, progress: bool | None = None,
                   threads: int | None = None, precise_bn: int = PRECISE_BN_IMAGES,
                   test_split: float | None = None, device: str = "auto") -> str:
    """Train and test each notebook model with the notebook's settings; return a Markdown table.

    A model whose run directory already holds a finished run is not retrained; an interrupted
    one continues with `resume`. precise_bn: also test a BatchNorm model's weights with their
    BatchNorm statistics re-estimated on this many training images (0 = don't); the run's own
    model and metrics stay as Keras would leave them. test_split: for data without a test
    split, hold out this fraction as one (as `train --test-split`). device: where the models
    train and are tested (as `train --device`).
    """
    out = Path(out)
    configs = _checked_configs(data, out, models, {"epochs": epochs, "precision": precision, "seed": seed,
                                                   "threads": threads, "test_split": test_split,
                                                   "device": device})
    rows = []
    for name, config in configs.items():
        run_dir = out / name
        paths = RunPaths(run_dir)
        finished = is_finished(run_dir)
        if not finished:
            train(config, run_dir, resume=resume and run_dir.is_dir(), progress=progress)
        if finished and paths.metrics.is_file():
            metrics = read_metrics(run_dir)
        else:
            metrics = evaluate_run(run_dir, progress=progress, device=device)
        run = read_run_config(run_dir)
        history = read_history(paths.history)
        rows.append({
            "model": name, "params": run["model"]["params"], "epochs": run["result"]["epochs_run"],
            "precision": run["precision"], "seed": seed,
            # The notebook's numbers are CIFAR-10's: on other data there is nothing to compare with.
            "notebook_test_accuracy": NOTEBOOK_TEST_ACCURACY.get(name) if run["data"]["name"] == "cifar10" else None,
            "val_accuracy": history[-1]["val_acc"] if history else None, "test_accuracy": metrics["accuracy"],
            "test_accuracy_precise_bn": _test_accuracy_with_precise_bn(run_dir, precise_bn, device)
            if precise_bn else None,
            # The median: a run continued across sessions or paused for other jobs has a few epochs
            # that include the waiting, and a mean would charge them to the model.
            "seconds_per_epoch": statistics.median(row["seconds"] for row in history) if history else None,
            "run_dir": str(run_dir),
        })
    machine = read_run_config(out / models[0])["machine"]
    described = f"{machine['cpu']}" + (f", family/model {machine['cpu_family']}" if "cpu_family" in machine else "") \
        + f", {machine['cpu_count']} cores, torch CPU capability {machine.get('torch_cpu_capability', '?')}"
    table = format_table(rows, machine=described)
    write_json(out / "reproduce.json", rows)
    atomic_write_text(out / "reproduce.md", table + "\n")
    if len(models) > 1:
        from imgflow.reports import compare_runs

        report = compare_runs([out / name for name in models], out / "compare")
        table += f"\n\nside-by-side report: {report}"
    return table


def _checked_configs(data: str, out: Path, models, settings: dict) -> dict[str, TrainConfig]:
    """Each model's run config; every problem the runs would meet is a UserError before any of
    them trains and before anything is written (not after the first model's training)."""
    models = list(models)
    if not models:
        raise UserError("no model given: pass --models NAME [NAME ...] (see 'imgflow models')")
    repeated = sorted({name for name in models if models.count(name) > 1})
    if repeated:
        raise UserError(f"--models lists {', '.join(repeated)} more than once: each model trains into "
                        "OUT/<model>, so list each once")
    configs = {name: resolve_config(data, {"model": name, **settings}, preset="notebook") for name in models}
    resolve_device(settings.get("device") or "auto")  # --device cuda without CUDA: before any run
    for name, config in configs.items():
        # A run of other settings (data, seed, epochs ...) must not be reported as this one.
        if diff := config_differences(out / name, config):
            raise UserError(f"{out / name} holds a {name} run with {', '.join(diff)}: use another --out "
                            "(or the same settings to reuse or continue it)")
    if not all(RunPaths(out / name).metrics.is_file() and is_finished(out / name) for name in models):
        config = next(iter(configs.values()))  # the data and hold-out are the same for every model
        if load_run_data(config.to_dict()).test is None:  # what every run is tested on
            raise UserError(f"{data} has no test split to test the models on: add a test/<class>/ folder, "
                            "or pass --test-split 0.2 to hold out 20% of each class as one")
    return configs


def _test_accuracy_with_precise_bn(run_dir: Path, images: int, device: str = "auto") -> float | None:
    """Test accuracy of a run's saved weights once their BatchNorm statistics are re-estimated on
    `images` of its training part (imgflow.training.batchnorm); None for a model without BatchNorm."""
    model, run = load_trained_model(run_dir, device)
    if not has_batchnorm(model):
        return None
    config = TrainConfig.from_dict(run["train"])
    set_threads(config.threads)
    dataset = load_run_data(run["train"])
    if dataset.test is None:  # evaluate_run has refused such data before this is reached
        raise UserError(f"data set {dataset.name} has no test split")
    train_part, _ = split_for_training(dataset.train, config)
    prep = Preprocessing.from_dict(run["preprocessing"])
    used = reestimate_on_training_part(model, train_part, images, config.seed, prep, run["precision"],
                                       config.eval_batch_size)
    logits = predict_logits(model, dataset.test.images, prep, run["precision"], config.eval_batch_size)
    accuracy = loss_and_accuracy(logits, dataset.test.labels)["accuracy"]
    log.info("%s with BatchNorm statistics re-estimated on %d training images: test accuracy %.4f",
             run_dir, used, accuracy)
    return accuracy


def format_table(rows: list[dict], machine: str = "") -> str:
    lines = ["| model | params | epochs | precision | seed | notebook test acc | imgflow val acc "
             "| imgflow test acc | test acc, BatchNorm statistics re-estimated | s/epoch (median) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nb = "-" if r["notebook_test_accuracy"] is None else f"{r['notebook_test_accuracy']:.4f}"
        val = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        seconds = "-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}"
        precise = "-" if r["test_accuracy_precise_bn"] is None else f"{r['test_accuracy_precise_bn']:.4f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['epochs']} | {r['precision']} | {r['seed']} "
                     f"| {nb} | {val} | {r['test_accuracy']:.4f} | {precise} | {seconds} |")
    if machine:
        lines.append(f"\nMeasured on: {machine}.")
    return "\n".join(lines)
