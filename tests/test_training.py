"""The training loop: learning, determinism, exact resume, guards, and the files it writes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny
from datagen import make_image_folder
from imgflow.cli import main
from imgflow.data import Split
from imgflow.data.splits import holdout_test, kfold_split, split_train_val, stratified_subset
from imgflow.errors import UserError
from imgflow.training.config import MAX_LR
from imgflow.history import read_history
from imgflow.training.batches import epoch_order
from imgflow.training.step import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def _history_without_time(run_dir: Path) -> list[dict]:
    rows = read_history(run_dir / "history.csv")
    for row in rows:
        row.pop("seconds")
    return rows


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# learning and the files written


def test_loss_falls_and_accuracy_beats_chance(tiny_run):
    history = read_history(tiny_run / "history.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8 > 1 / 3  # 3 classes: chance is 1/3


def test_run_directory_files(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "history.csv", "model.safetensors", "checkpoint", "metrics.json"} <= names
    with open(tiny_run / "history.csv") as f:
        assert next(csv.reader(f)) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["train"]["model"] == "seed-baseline" and config["train"]["seed"] == 0
    assert config["data"]["classes"] == ["a", "b", "c"]
    assert config["model"]["params"] > 0 and config["versions"]["torch"] == torch.__version__
    assert config["result"]["epochs_run"] == 3
    assert config["preprocessing"]["image_size"] == [16, 16]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("accuracy", "loss", "per_class", "confusion_matrix", "majority_baseline_accuracy"):
        assert key in metrics
    assert set(metrics["per_class"]["a"]) == {"precision", "recall", "f1", "support"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["num_images"] == 39


def test_same_seed_gives_identical_history_and_weights(tiny_data, tmp_path):
    for name in ("one", "two"):
        train_tiny(tiny_data, tmp_path / name, model="seed-batchnorm", epochs=2, threads=1,
                   augment="flip+translate+cutout")
    assert _history_without_time(tmp_path / "one") == _history_without_time(tmp_path / "two")
    assert _same_weights(tmp_path / "one", tmp_path / "two")
    train_tiny(tiny_data, tmp_path / "other-seed", model="seed-batchnorm", epochs=2, threads=1,
               augment="flip+translate+cutout", seed=1)
    assert not _same_weights(tmp_path / "one", tmp_path / "other-seed")


# ---------------------------------------------------------------------------------------------
# exact resume


def _train_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imgflow", "-q", "train", str(data), "--model", "seed-batchnorm",
            "--epochs", "3", "--batch-size", "8", "--threads", "1", "--precision", "fp32",
            "--augment", "flip+translate", "--out", str(run_dir), *extra]


def _wait_for_mid_epoch_checkpoint(proc: subprocess.Popen, checkpoint: Path, timeout: float = 120) -> dict:
    """Poll until the checkpoint is mid-epoch, past the first epoch; return what it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training finished before it could be interrupted"
        if checkpoint.is_file():
            try:
                state = torch.load(checkpoint, weights_only=True)
            except Exception:
                state = None
            if state and state["epoch"] >= 1 and 0 < state["step"]:
                return state
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


@pytest.mark.slow
def test_resume_after_kill_9_mid_epoch_matches_uninterrupted_run(tiny_data, tmp_path):
    env = {**os.environ, "IMGFLOW_CHECKPOINT_SECONDS": "0"}  # checkpoint after every step
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(_train_command(tiny_data, reference), env=env, check=True)

    proc = subprocess.Popen(_train_command(tiny_data, interrupted), env=env)
    state = _wait_for_mid_epoch_checkpoint(proc, interrupted / "checkpoint" / "state.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "model.safetensors").exists()
    print("killed at epoch", state["epoch"] + 1, "step", state["step"])

    subprocess.run(_train_command(tiny_data, interrupted, "--resume"), env=env, check=True)
    assert _history_without_time(interrupted) == _history_without_time(reference)
    assert _same_weights(interrupted, reference)


# The airbench options add state (lookahead's slow weights) and per-group learning rates: the
# Ctrl-C test runs with them, so both kinds of run are covered by a resume-parity test.
AIRBENCH_OPTIONS = ("--optimizer", "sgd", "--lr", "0.05", "--schedule", "onecycle", "--warmup-epochs", "1",
                    "--bn-lr-scale", "8", "--lookahead", "3", "--flip", "alternate", "--lr-floor", "0.07")
# Muon's momentum and the whitening bias stopped after epoch 2 (of 3), on the airbench layout.
MUON_OPTIONS = ("--model", "fast-small", "--optimizer", "muon", "--lr", "0.05", "--muon-lr", "0.1",
                "--schedule", "onecycle", "--bn-lr-scale", "8", "--whiten-bias-epochs", "2")


@pytest.mark.slow
@pytest.mark.parametrize("options", [AIRBENCH_OPTIONS, MUON_OPTIONS], ids=["airbench", "muon"])
def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tiny_data, tmp_path, options):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(_train_command(tiny_data, reference, *options), check=True)
    env = {**os.environ, "IMGFLOW_CHECKPOINT_SECONDS": "0"}
    proc = subprocess.Popen(_train_command(tiny_data, interrupted, *options), env=env,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_mid_epoch_checkpoint(proc, interrupted / "checkpoint" / "state.pt")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    subprocess.run(_train_command(tiny_data, interrupted, *options, "--resume"), check=True)
    assert _history_without_time(interrupted) == _history_without_time(reference)
    assert _same_weights(interrupted, reference)


def test_run_files_get_the_usual_permissions(tiny_run):
    """Written atomically via a 0600 temp file, but shared like any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "history.csv", "metrics.json"):
        assert (tiny_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_resume_of_a_finished_run_changes_nothing(tiny_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    train_tiny(tiny_data, run_dir, epochs=1)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    with caplog.at_level("INFO"):
        result = train_tiny(tiny_data, run_dir, epochs=1, resume=True)
    assert "already finished" in caplog.text and "resuming" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()} == before
    assert len(result.history) == 1


def test_resume_without_checkpoint_starts_from_the_beginning(tiny_data, tmp_path):
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    train_tiny(tiny_data, run_dir, epochs=1)  # resume=False on an empty dir is fine too
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    from imgflow.training.config import resolve_config
    from imgflow.training.loop import train

    config = resolve_config(str(tiny_data), dict(model="seed-baseline", epochs=1, batch_size=16, precision="fp32"))
    train(config, fresh, resume=True, progress=False)
    assert _same_weights(run_dir, fresh)


def test_weights_that_turn_nan_at_an_epochs_last_step_are_not_saved(tiny_data, tmp_path, monkeypatch):
    """The loss of that step was still finite: only the end-of-epoch check can see it."""
    import imgflow.training.step as training_step

    real_build = training_step.build_optimizer

    def poisoning_optimizer(model, config):
        optimizer = real_build(model, config)
        real_step, calls = optimizer.step, []

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 6:  # the last of epoch 1's 6 steps (96 images, batch 16)
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            return result

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(training_step, "build_optimizer", poisoning_optimizer)
    with pytest.raises(TrainingDiverged, match="weights became inf/nan in epoch 1"):
        train_tiny(tiny_data, tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_exploding_lr_stops_the_run_instead_of_saving_broken_weights(tiny_data, tmp_path):
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train_tiny(tiny_data, tmp_path / "run", optimizer="sgd", lr=MAX_LR)  # the largest lr allowed
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("option, value, allowed", [
    ("--lr", "1e39", "> 0 and <= 100"),
    ("--weight-decay", "1e308", ">= 0 and <= 1"),
    ("--bn-lr-scale", "1e308", "> 0 and <= 1000"),
    ("--warmup-epochs", "inf", ">= 0 and <= 1000"),
])
def test_numbers_too_large_to_train_with_are_refused_up_front(tiny_data, tmp_path, capsys, option, value,
                                                             allowed):
    """They used to overflow float32 inside the optimiser (or the warmup's step count): a traceback."""
    run_dir = tmp_path / "r"
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-batchnorm", "--schedule",
                         "onecycle", option, value, "--out", str(run_dir))
    assert code == 2 and err == f"imgflow: error: {option} must be {allowed}, got {float(value)}"
    assert not run_dir.exists()


def test_an_update_that_overflows_float32_is_reported_as_divergence(tiny_data, tmp_path, monkeypatch):
    import imgflow.training.step as training_step

    real_build = training_step.build_optimizer

    def overflowing_optimizer(model, config):
        optimizer = real_build(model, config)

        def step(*args, **kwargs):  # what PyTorch raises for lr x scale beyond float32
            raise RuntimeError("value cannot be converted to type float without overflow")

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(training_step, "build_optimizer", overflowing_optimizer)
    with pytest.raises(TrainingDiverged, match="the update overflowed float32 at epoch 1, step 1: lower --lr"):
        train_tiny(tiny_data, tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_one_class_is_not_a_classification_problem(tmp_path, capsys):
    data = make_image_folder(tmp_path / "one", classes=("only",), per_class=10, test=False)
    code, err = _run_cli(capsys, "train", str(data), "--model", "seed-baseline", "--out", str(tmp_path / "r"))
    assert code == 2 and "at least 2" in err and not (tmp_path / "r").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    import imgflow.training.step as training_step

    real = training_step.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 10 else loss  # step 11 is in epoch 2 (8 steps/epoch)

    monkeypatch.setattr(training_step.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        train_tiny(tiny_data, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_early_stopping_restores_the_best_weights(tiny_data, tmp_path):
    from imgflow.inference import loss_and_accuracy, predict_logits
    from imgflow.runs import load_trained_model
    from imgflow.preprocess import Preprocessing
    from imgflow.data import load_dataset

    result = train_tiny(tiny_data, tmp_path / "run", epochs=8, lr=3e-2, early_stopping=1)
    history = read_history(tmp_path / "run" / "history.csv")
    best = min(history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]
    model, config = load_trained_model(tmp_path / "run")
    train_part, val_part = split_train_val(load_dataset(str(tiny_data), progress=False).train, 0.2, "last", 0)
    logits = predict_logits(model, val_part.images, Preprocessing.from_dict(config["preprocessing"]))
    assert loss_and_accuracy(logits, val_part.labels)["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert config["result"]["final_val_accuracy"] == best["val_acc"]  # of the weights it saved


def test_a_loaded_fast_run_has_its_batchnorm_folded_and_the_validation_loss_it_trained_to(tiny_data, tmp_path):
    from imgflow.data import load_dataset
    from imgflow.inference import loss_and_accuracy, predict_logits
    from imgflow.preprocess import Preprocessing
    from imgflow.runs import load_trained_model

    train_tiny(tiny_data, tmp_path / "run", model="fast-small", epochs=2, lr=0.05)
    last = read_history(tmp_path / "run" / "history.csv")[-1]
    model, config = load_trained_model(tmp_path / "run")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    _, val_part = split_train_val(load_dataset(str(tiny_data), progress=False).train, 0.2, "last", 0)
    logits = predict_logits(model, val_part.images, Preprocessing.from_dict(config["preprocessing"]))
    assert loss_and_accuracy(logits, val_part.labels)["loss"] == pytest.approx(last["val_loss"], rel=1e-4)


def test_ctrl_c_in_the_epoch_that_stops_early_still_finishes_the_run(tiny_data, tmp_path, monkeypatch):
    import imgflow.training.loop as training_loop

    real_record = training_loop._record_for_early_stopping

    def record_then_ctrl_c(loop, val_loss, model):
        real_record(loop, val_loss, model)
        if loop.best["bad_epochs"] >= 1:  # this epoch stops the run: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(training_loop, "_record_for_early_stopping", record_then_ctrl_c)
    result = train_tiny(tiny_data, tmp_path / "run", epochs=8, lr=3e-2, early_stopping=1)
    assert result.stopped_early and len(result.history) < 8
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["result"]["stopped_early"] is True


def test_ema_training_learns_and_saves_the_averaged_weights(tiny_data, tmp_path):
    from safetensors.torch import load_file

    result = train_tiny(tiny_data, tmp_path / "run", ema=0.9, epochs=4)
    assert result.history[-1]["val_acc"] > 0.6
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert saved.keys() == state["ema"].keys()
    assert all(torch.equal(saved[k], state["ema"][k]) for k in saved)
    live = state["model"]
    assert any(not torch.equal(saved[k], live[k]) for k in saved if saved[k].is_floating_point())


# ---------------------------------------------------------------------------------------------
# data split and order


def _labelled_split(n_per_class=(50, 30, 20)) -> Split:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    images = np.arange(len(labels), dtype=np.uint8).repeat(4).reshape(-1, 2, 2, 1)
    return Split(images, labels)


def test_last_split_is_keras_validation_split_of_the_seeded_shuffle():
    split = _labelled_split()
    train, val = split_train_val(split, 0.2, "last", seed=3)
    assert len(train) == 80 and len(val) == 20
    order = np.random.default_rng([3, 0x5EED]).permutation(100)
    assert np.array_equal(val.labels, split.labels[order[80:]])
    again = split_train_val(split, 0.2, "last", seed=3)[1]
    assert np.array_equal(again.images, val.images)


def test_stratified_split_keeps_class_proportions():
    _, val = split_train_val(_labelled_split(), 0.2, "stratified", seed=0)
    assert np.bincount(val.labels).tolist() == [10, 6, 4]


def test_kfold_folds_partition_the_data_and_are_stratified():
    split = _labelled_split()
    seen = []
    for fold in range(5):
        train, val = kfold_split(split, 5, fold, seed=0)
        assert len(train) + len(val) == 100
        assert np.bincount(val.labels).tolist() == [10, 6, 4]
        seen.extend(val.images[:, 0, 0, 0].tolist())
    assert sorted(seen) == list(range(100))  # every image validates exactly once


def test_holdout_test_makes_a_stratified_test_split_only_when_missing():
    from imgflow.data import Dataset

    split = _labelled_split()
    ds = Dataset("x", "x", "0", ["a", "b", "c"], split)
    held = holdout_test(ds, 0.2, seed=0)
    assert np.bincount(held.test.labels).tolist() == [10, 6, 4]
    assert len(held.train) == 80 and "held out" in held.notes[-1]
    assert not set(held.test.images[:, 0, 0, 0]) & set(held.train.images[:, 0, 0, 0])
    assert holdout_test(held, 0.5) is held


def test_stratified_subset_keeps_proportions():
    sub = stratified_subset(_labelled_split(), 50, seed=0)
    assert np.bincount(sub.labels).tolist() == [25, 15, 10]


def test_train_with_test_split_and_folds(tmp_path):
    from imgflow.evaluation import evaluate_run

    data = make_image_folder(tmp_path / "flat", per_class=15, size=(8, 8), flat=True, test=False)
    result = train_tiny(data, tmp_path / "run", epochs=2, test_split=0.2, folds=3, fold=1)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["num_train"] == 24 and config["data"]["num_val"] == 12
    metrics = evaluate_run(tmp_path / "run", progress=False)
    assert metrics["num_images"] == 9
    assert result.history[-1]["val_acc"] is not None


def test_val_subset_validates_on_a_stratified_part_of_the_hold_out():
    from imgflow.training.config import TrainConfig
    from imgflow.training.batches import split_for_training

    split = _labelled_split((100, 60, 40))
    full = split_for_training(split, TrainConfig("x", "seed-baseline", val_split=0.5, val_mode="stratified"))
    capped = split_for_training(split, TrainConfig("x", "seed-baseline", val_split=0.5, val_mode="stratified",
                                                   val_subset=50))
    assert len(full[1]) == 100 and len(capped[1]) == 50
    assert np.bincount(capped[1].labels).tolist() == [25, 15, 10]
    assert set(capped[1].images[:, 0, 0, 0].tolist()) <= set(full[1].images[:, 0, 0, 0].tolist())
    assert len(capped[0]) == len(full[0])  # training is untouched


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 3))
    assert not torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 4))
    assert sorted(epoch_order(50, 1, 0).tolist()) == list(range(50))


# ---------------------------------------------------------------------------------------------
# CLI guards: one line, exit 2, nothing written


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--val-split", "1.5"], "--val-split"),
    (["--val-split", "-0.1"], "--val-split"),
    (["--model", "no-such-model"], "unknown model"),
    (["--precision", "fp64"], "--precision"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--preset", "nope"], "unknown preset"),
    (["--lr", "inf"], "--lr"),
    (["--momentum", "-1"], "--momentum"),
    (["--momentum", "5"], "--momentum"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--fold", "1"], "--fold 1 needs --folds"),
    (["--val-split", "0.001"], "empty training or validation part"),
    (["--train-subset", "1"], "1 training image left"),
])
def test_invalid_train_options_exit_2_and_write_nothing(tiny_data, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    argv = ["train", str(tiny_data), "--out", str(out)]
    if "--model" not in args:
        argv += ["--model", "seed-baseline"]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv + args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def _run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def test_existing_run_is_never_overwritten_without_a_flag(tiny_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = (run_dir / "model.safetensors").read_bytes()
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline", "--out", str(run_dir))
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (run_dir / "model.safetensors").read_bytes() == before


def _with_derived_artifacts(run_dir: Path) -> Path:
    """A run directory as export and report leave it, plus a file of the user's."""
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.json").write_text("{}")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "curves.png").write_bytes(b"png")
    (run_dir / "report.html").write_text("<html></html>")
    (run_dir / "notes.txt").write_text("mine")
    return run_dir


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_overwrite_replaces_a_run(tiny_run, tiny_data, tmp_path, capsys):
    run_dir = _with_derived_artifacts(shutil.copytree(tiny_run, tmp_path / "run"))
    code, _ = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                       "--out", str(run_dir), "--overwrite")
    assert code == 0
    assert len(read_history(run_dir / "history.csv")) == 1
    # What was made from the old model went with it; the user's own file stays.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint", "config.json", "history.csv", "model.safetensors", "notes.txt"]


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_train_refuses_a_workflow_folder(tiny_data, tmp_path, capsys, flag):
    out = tmp_path / "wf"
    out.mkdir()
    (out / "workflow.json").write_text("{}")
    (out / "report.html").write_text("the workflow's report")
    code, err = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                         "--out", str(out), *flag)
    assert code == 2 and "holds a workflow" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "workflow.json"]


# The largest lr allowed, with plain SGD: the loss becomes nan at the 3rd of the 6 steps of epoch 1.
DIVERGING = ("--optimizer", "sgd", "--lr", str(MAX_LR), "--batch-size", "16")


def test_a_failed_overwrite_keeps_the_earlier_run(tiny_run, tiny_data, tmp_path, capsys):
    run_dir = _with_derived_artifacts(shutil.copytree(tiny_run, tmp_path / "run"))
    before = _snapshot(run_dir)
    code, err = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                         "--out", str(run_dir), "--overwrite", *DIVERGING)
    assert code == 2 and "lower --lr" in err and len(err.splitlines()) == 1
    assert _snapshot(run_dir) == before


def test_ctrl_c_during_an_overwrite_keeps_the_earlier_run(tiny_run, tiny_data, tmp_path, monkeypatch, capsys):
    import imgflow.training.loop as training_loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = _with_derived_artifacts(shutil.copytree(tiny_run, tmp_path / "run"))
    before = _snapshot(run_dir)
    monkeypatch.setattr(training_loop, "write_history", interrupted)  # at the end of the first epoch
    code, err = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                         "--out", str(run_dir), "--overwrite")
    assert code == 130 and "keeps its earlier run" in err
    assert _snapshot(run_dir) == before


def test_a_killed_overwrite_leaves_the_earlier_run_and_the_next_one_cleans_up(tiny_run, tiny_data, tmp_path,
                                                                              capsys):
    from imgflow.training.rundir import OVERWRITE_STAGING

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / OVERWRITE_STAGING / "checkpoint").mkdir(parents=True)  # as a kill -9 mid-overwrite leaves it
    (run_dir / OVERWRITE_STAGING / "config.json").write_text("{}")
    code, _ = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                       "--out", str(run_dir), "--overwrite")
    assert code == 0 and len(read_history(run_dir / "history.csv")) == 1
    assert not (run_dir / OVERWRITE_STAGING).exists()


def test_a_run_that_diverged_is_not_advised_to_resume(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _ = _run_cli(capsys, "-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "1",
                       "--out", str(run_dir), *DIVERGING)
    assert code == 2 and not (run_dir / "checkpoint").exists()
    assert "lower --lr" in json.loads((run_dir / "config.json").read_text())["diverged"]
    for command in ("report", "evaluate", "export"):
        code, err = _run_cli(capsys, command, str(run_dir))
        assert code == 2 and "diverged" in err and "--overwrite" in err and "--resume" not in err, err
    # A run stopped before its first checkpoint (killed early) has nothing to resume either.
    config = json.loads((run_dir / "config.json").read_text())
    del config["diverged"]
    (run_dir / "config.json").write_text(json.dumps(config))
    code, err = _run_cli(capsys, "report", str(run_dir))
    assert code == 2 and "no finished epoch" in err and "--overwrite" in err and "--resume" not in err


def test_resume_on_a_missing_directory_is_an_error(tiny_data, tmp_path, capsys):
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline",
                         "--out", str(tmp_path / "nope"), "--resume")
    assert code == 2 and "does not exist" in err


def test_resume_with_different_options_is_an_error(tiny_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline", "--batch-size", "16",
                         "--epochs", "3", "--lr", "0.5", "--precision", "fp32", "--out", str(run_dir), "--resume")
    assert code == 2 and "lr=0.001" in err


def test_a_run_from_before_an_option_existed_resumes_with_that_options_default(tiny_run, tiny_data, tmp_path,
                                                                                capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    for newer in ("lookahead", "bn_lr_scale", "flip", "lr_floor"):
        del config["train"][newer]
    (run_dir / "config.json").write_text(json.dumps(config))
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline", "--batch-size", "16",
                         "--epochs", "3", "--precision", "fp32", "--out", str(run_dir), "--resume")
    assert code == 0, err
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline", "--batch-size", "16",
                         "--epochs", "3", "--precision", "fp32", "--lookahead", "5", "--out", str(run_dir),
                         "--resume")
    assert code == 2 and "lookahead=0" in err


def test_output_path_that_is_a_file_is_an_error(tiny_data, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, err = _run_cli(capsys, "train", str(tiny_data), "--model", "seed-baseline", "--out", str(target))
    assert code == 2 and "is a file" in err
    assert target.read_text() == "x"


def test_evaluate_errors(tiny_run, tmp_path, capsys):
    code, err = _run_cli(capsys, "evaluate", str(tmp_path / "missing"))
    assert code == 2 and "not found" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    code, err = _run_cli(capsys, "evaluate", str(broken))
    assert code == 2 and "cannot read" in err and len(err.splitlines()) == 1


def _interrupted_copy(tiny_run, run_dir: Path, **checkpoint_changes) -> Path:
    """A copy of tiny_run stopped after epoch 1: no model.safetensors, a checkpoint to resume."""
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "model.safetensors").unlink()
    checkpoint = run_dir / "checkpoint" / "state.pt"
    state = torch.load(checkpoint, weights_only=True)
    state.update(epoch=1, step=0, **checkpoint_changes)
    torch.save(state, checkpoint)
    return checkpoint


@pytest.mark.parametrize("content", [b"garbage" * 10, b"", "a list", "another model"])
def test_an_unreadable_checkpoint_is_one_line_saying_how_to_start_over(tiny_run, tmp_path, capsys, monkeypatch,
                                                                       content):
    """Never PyTorch's multi-line message, with its advice to load with weights_only=False."""
    import imgflow.training.loop as training_loop

    run_dir = tmp_path / "run"
    checkpoint = _interrupted_copy(tiny_run, run_dir)
    if content != "another model":  # refused before the data set loads and prints its remarks
        monkeypatch.setattr(training_loop, "load_run_data", lambda *a, **k: pytest.fail("loaded the data first"))
    if content == "a list":
        torch.save([1, 2], checkpoint)
    elif content == "another model":
        _interrupted_copy(tiny_run, tmp_path / "other", model={"conv.weight": torch.zeros(2)})
        shutil.copy(tmp_path / "other" / "checkpoint" / "state.pt", checkpoint)
    else:
        checkpoint.write_bytes(content)
    before = checkpoint.read_bytes()
    code, err = _run_cli(capsys, "-q", "train", "--resume", "--out", str(run_dir))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"imgflow: error: checkpoint {checkpoint} is unreadable (")
    assert err.endswith(f"delete {checkpoint.parent} to start the run over, or train again with --overwrite")
    assert "weights_only" not in err
    if content == "another model":
        assert 'Missing key(s) in state_dict: "' in err and "conv.weight" in err
    assert checkpoint.read_bytes() == before


def test_weights_of_another_model_are_one_complete_line(tiny_run, tmp_path, capsys):
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    save_file({"dense.weight": torch.zeros(2, 2)}, str(run_dir / "model.safetensors"))
    code, err = _run_cli(capsys, "evaluate", str(run_dir))
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not match model seed-baseline in config.json (Missing key(s) in state_dict: " in err
    assert 'Unexpected key(s) in state_dict: "dense.weight"' in err
    assert err.endswith("): train the run again with --overwrite")


@pytest.mark.parametrize("change, detail", [
    (lambda c: [], "the file is a list, expected an object"),
    (lambda c: {**c, "train": 3}, "'train' is a number (3), expected an object"),
    (lambda c: {**c, "train": {**c["train"], "epochs": "x"}}, "'train.epochs' is a string (\"x\"), expected an integer"),
    (lambda c: {**c, "train": {**c["train"], "data": 5}}, "'train.data' is a number (5), expected a string"),
    (lambda c: {**c, "train": {**c["train"], "image_size": 5}}, "'train.image_size' is a number (5), expected a list"),
])
def test_resume_with_a_damaged_config_json_is_one_line(tiny_run, tmp_path, capsys, change, detail):
    run_dir = tmp_path / "run"
    _interrupted_copy(tiny_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(change(config)))
    code, err = _run_cli(capsys, "train", "--resume", "--out", str(run_dir))
    assert code == 2
    assert err == (f"imgflow: error: {run_dir / 'config.json'} is not a valid imgflow run config: {detail}; "
                   "restore it, or train the run again (imgflow train ... --overwrite)")


def test_evaluate_without_test_split_is_a_clear_error(tmp_path, capsys):
    from datagen import make_image_folder

    data = make_image_folder(tmp_path / "flat", per_class=10, size=(8, 8), flat=True, test=False)
    run_dir = tmp_path / "run"
    train_tiny(data, run_dir, epochs=1)
    code, err = _run_cli(capsys, "evaluate", str(run_dir))
    assert code == 2 and "no test split" in err


def test_evaluate_cli_prints_table_and_writes_metrics(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "metrics.json").unlink()
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "majority baseline" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in out


def test_evaluate_names_a_file_and_a_moved_data_folder(tiny_data, tmp_path, capsys):
    code, err = _run_cli(capsys, "evaluate", __file__)
    assert code == 2 and "is a file" in err
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train_tiny(data, tmp_path / "run", epochs=1)
    data.rename(tmp_path / "moved")
    code, err = _run_cli(capsys, "evaluate", str(tmp_path / "run"))
    assert code == 2 and "is gone" in err and str(data) in err and len(err.splitlines()) == 1


def test_resume_needs_only_the_run_directory(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "train", str(tiny_data), "--model", "seed-baseline", "--epochs", "2", "--lr", "0.01",
                 "--batch-size", "16", "--precision", "fp32", "--out", str(run)]) == 0
    (run / "model.safetensors").unlink()  # as if killed after the last checkpoint, before saving
    assert main(["-q", "train", "--resume", "--out", str(run)]) == 0  # no DATA, no options
    assert (run / "model.safetensors").is_file()
    assert len(read_history(run / "history.csv")) == 2  # the run's own 2 epochs, not the default 10
    code, err = _run_cli(capsys, "train", "--resume", "--out", str(run), "--lr", "0.5")
    assert code == 2 and "lr=0.01" in err  # a changed option is still refused
    code, err = _run_cli(capsys, "train", "--model", "seed-baseline", "--out", str(tmp_path / "new"))
    assert code == 2 and "no DATA given" in err
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"data": {}}')
    code, err = _run_cli(capsys, "train", "--resume", "--out", str(tmp_path / "damaged"))
    assert code == 2 and "is not a valid imgflow run config: 'train' is missing" in err
    assert len(err.splitlines()) == 1


def test_evaluate_does_not_repeat_the_data_warnings_of_training(tmp_path, capsys, caplog):
    data = make_image_folder(tmp_path / "d", per_class=20, size=(8, 8), test=False)
    (data / "train" / "a" / "broken.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["train", str(data), "--model", "seed-baseline", "--epochs", "1", "--out", str(run)]) == 0
        assert "skipped 1 file" in caplog.text  # training says it
        caplog.clear()
        code, err = _run_cli(capsys, "evaluate", str(run))  # no test split: one line, no warnings before it
    assert code == 2 and "no test split" in err and caplog.records == []


def test_a_shift_as_large_as_the_images_is_refused_before_training(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"--translate 16 must be smaller than the images' 16x16: give a shift "
                                        r"below 16 pixels"):
        train_tiny(tiny_data, tmp_path / "run", epochs=1, augment="flip+translate", translate=16)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    train_tiny(tiny_data, tmp_path / "ok", epochs=1, augment="flip+translate", translate=15)  # the largest allowed
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_large_images_at_their_own_size_get_one_warning_naming_image_size(tiny_data, tmp_path, caplog,
                                                                       monkeypatch):
    import logging

    import imgflow.training.batches as training_batches

    monkeypatch.setattr(training_batches, "LARGE_IMAGE_PIXELS", 15 * 15)  # tiny_data is 16x16
    monkeypatch.setattr(training_batches, "_warned_large_images", set())
    with caplog.at_level(logging.WARNING):
        train_tiny(tiny_data, tmp_path / "own-size", epochs=1)
    assert "training at the data's own 16x16" in caplog.text and "--image-size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a second run in the same process (a tuning trial)
        train_tiny(tiny_data, tmp_path / "own-size-again", epochs=1)
    assert "data's own" not in caplog.text
    with caplog.at_level(logging.WARNING):
        train_tiny(tiny_data, tmp_path / "resized", epochs=1, image_size=(12, 12))
    assert "data's own" not in caplog.text


def test_identical_runs_write_byte_identical_weight_files(tiny_data, tmp_path):
    """safetensors writes its header's maps in hash order, different in every process and map."""
    import hashlib
    import json
    import struct

    digests = []
    for name in ("a", "b"):
        train_tiny(tiny_data, tmp_path / name, epochs=1)
        data = (tmp_path / name / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
        digests.append(hashlib.sha256(data).hexdigest())
    assert digests[0] == digests[1]
