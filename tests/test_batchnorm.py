"""Precise BatchNorm: statistics re-estimated from the final weights, in the engine and in reproduce-seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import train_tiny
from imgflow.cli import main
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.training.batchnorm import batchnorm_sample, has_batchnorm, reestimate_batchnorm
from imgflow.history import read_history


def _tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.01),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_reestimated_statistics_are_the_exact_averages_over_the_images_with_dropout_off():
    net = _tiny_bn_net()
    bn = net[3]
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    prep = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (8, 8), 3)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    net.train()

    reestimate_batchnorm(net, images, prep, batch_size=16)  # 4 equal batches

    with torch.no_grad():
        inputs = net[:2](to_model_input(torch.from_numpy(images), prep))  # dropout off: conv, relu only
    batches = inputs.split(16)
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.01 and net.training and bn.training  # as it was
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())  # weights untouched


def test_batchnorm_sample_is_seeded_shuffled_and_never_larger_than_the_data():
    assert np.array_equal(batchnorm_sample(100, 10, seed=3), batchnorm_sample(100, 10, seed=3))
    assert not np.array_equal(batchnorm_sample(100, 10, seed=3), batchnorm_sample(100, 10, seed=4))
    everything = batchnorm_sample(100, 500, seed=0)
    # All images, in random order: a class-ordered training part must not give one-class batches.
    assert sorted(everything) == list(range(100)) and list(everything) != list(range(100))
    assert has_batchnorm(_tiny_bn_net()) and not has_batchnorm(nn.Linear(2, 2))


def test_a_remainder_of_one_image_does_not_break_batchnorm1d():
    net = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4), nn.BatchNorm1d(4))
    images = np.random.default_rng(0).integers(0, 256, (33, 8, 8, 3), dtype=np.uint8)
    prep = Preprocessing((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (8, 8), 3)
    net.eval()
    reestimate_batchnorm(net, images, prep, batch_size=16)  # 11 + 11 + 11, not 16 + 16 + 1
    with torch.no_grad():
        features = net[:2](to_model_input(torch.from_numpy(images), prep))
    torch.testing.assert_close(net[2].running_mean, features.mean(0))
    assert not net.training  # back in eval mode, as it came


def test_train_with_precise_bn_saves_the_reestimated_statistics(tiny_data, tmp_path):
    from imgflow.inference import loss_and_accuracy, predict_logits
    from imgflow.runs import load_run_data, load_trained_model
    from imgflow.training.config import TrainConfig
    from imgflow.training.batches import split_for_training

    train_tiny(tiny_data, tmp_path / "run", model="seed-batchnorm", epochs=2, precise_bn=50)
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    done = run["result"]["precise_bn"]
    assert done["images"] == 50 and run["train"]["precise_bn"] == 50
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    last = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)["model"]
    running = [k for k in saved if k.endswith("running_mean")]
    assert running and all(not torch.equal(saved[k], last[k]) for k in running)
    assert all(torch.equal(saved[k], last[k]) for k in saved if k.endswith(".weight"))  # only statistics changed
    # final_val_accuracy is that of the weights saved.
    model, config = load_trained_model(tmp_path / "run")
    _, val_part = split_for_training(load_run_data(config["train"]).train, TrainConfig.from_dict(config["train"]))
    logits = predict_logits(model, val_part.images, Preprocessing.from_dict(config["preprocessing"]))
    assert run["result"]["final_val_accuracy"] == pytest.approx(loss_and_accuracy(logits, val_part.labels)["accuracy"])
    assert done["val_accuracy"] == run["result"]["final_val_accuracy"]


def test_precise_bn_starts_from_the_kept_weights_and_is_redone_identically_on_resume(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / "run", model="seed-batchnorm", epochs=3, lr=3e-2, early_stopping=1,
               precise_bn=50)
    run_dir = tmp_path / "run"
    result = json.loads((run_dir / "config.json").read_text())["result"]
    history = read_history(run_dir / "history.csv")
    # With early stopping on, the kept weights are the best epoch's: re-estimation starts from them.
    assert result["precise_bn"]["val_accuracy_before"] == history[result["best_epoch"] - 1]["val_acc"]
    saved = load_file(str(run_dir / "model.safetensors"))

    # Killed after the last checkpoint, before the weights were saved: --resume redoes the end.
    (run_dir / "model.safetensors").unlink()
    config = json.loads((run_dir / "config.json").read_text())
    del config["result"]
    (run_dir / "config.json").write_text(json.dumps(config))
    train_tiny(tiny_data, run_dir, resume=True, model="seed-batchnorm", epochs=3, lr=3e-2, early_stopping=1,
               precise_bn=50)
    again = load_file(str(run_dir / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    resumed = json.loads((run_dir / "config.json").read_text())["result"]
    assert resumed["stopped_early"] == result["stopped_early"]
    assert resumed["final_val_accuracy"] == result["final_val_accuracy"]


def test_precise_bn_leaves_a_model_without_batchnorm_alone(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / "run", model="seed-baseline", epochs=1, precise_bn=50)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["result"]["precise_bn"] is None


def test_negative_precise_bn_is_refused(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own exit, or main's return value
        raise SystemExit(main(["train", str(tiny_data), "--model", "seed-batchnorm", "--precise-bn", "-1",
                               "--out", str(tmp_path / "run")]))
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_run_report_says_what_happened_to_the_batchnorm_statistics():
    from imgflow.reports.run_report import _precise_bn_text

    with_bn, without_bn = {"non_trainable_params": 1792}, {"non_trainable_params": 0}
    assert _precise_bn_text(None, without_bn) == "— (no BatchNorm)"
    assert _precise_bn_text(None, with_bn) == "running averages from training"
    text = _precise_bn_text({"images": 10000, "seconds": 60.0, "val_accuracy_before": 0.75,
                             "val_accuracy": 0.8275}, with_bn)
    assert "10,000 training images" in text and "75.00% → 82.75%" in text
