"""The fast recipe's parts: augmentation, the lr schedule, test-time augmentation, the presets."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgflow.cli import build_parser, main
from imgflow.errors import UserError
from imgflow.inference import predict_logits, tta_views
from imgflow.preprocess import Preprocessing
from imgflow.augment import (alternating_flips, augment_batch, flip_mask, random_cutout, random_flip,
                                      random_translate, shift, step_generator)
from imgflow.cli.arguments import config_from_args
from imgflow.training.config import PRESET_INFO, PRESETS, describe_presets, resolve_config
from imgflow.training.schedule import lr_at

POLICIES = ("none", "flip", "flip+translate", "flip+translate+cutout")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _batch(B: int = 32, H: int = 12, W: int = 10, C: int = 3, seed: int = 0) -> torch.Tensor:
    # Values 1..255 (never 0) so a zeroed cutout pixel is unambiguous.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (B, H, W, C), dtype=torch.uint8, generator=gen)


def _reflect_shift_np(image: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    """Independent reference: reflect-pad by `pad`, crop the original size at offset (dy, dx)."""
    H, W, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[pad + dy:pad + dy + H, pad + dx:pad + dx + W]


# ---------------------------------------------------------------------------------------------
# augmentation


@pytest.mark.parametrize("policy", POLICIES)
def test_augment_keeps_shape_and_dtype_and_leaves_input_alone(policy):
    x = _batch()
    before = x.clone()
    y = augment_batch(x, policy, step_generator(0, 0, 0), translate=2, cutout=4)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(x, before), "augmentation must not modify the caller's batch"


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_augment_is_a_function_of_seed_epoch_and_step(policy):
    x = _batch()
    a = augment_batch(x, policy, step_generator(3, 1, 7))
    assert torch.equal(a, augment_batch(x, policy, step_generator(3, 1, 7)))
    for other in [(3, 1, 8), (3, 2, 7), (4, 1, 7)]:  # next step, next epoch, other seed
        assert not torch.equal(a, augment_batch(x, policy, step_generator(*other))), other


def test_augment_rejects_float_images():
    with pytest.raises(AssertionError, match="uint8"):
        augment_batch(_batch().float(), "flip", step_generator(0, 0, 0))


def test_flip_is_an_exact_mirror_of_about_half_the_images():
    x = _batch(B=64)
    y = random_flip(x, step_generator(0, 0, 0))
    mirrored = [torch.equal(y[i], x[i].flip(1)) for i in range(len(x))]  # (H, W, C): W is dim 1
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48  # p = 1/2 over 64 images


def test_alternating_flip_shows_every_image_both_ways_over_two_epochs():
    coins = alternating_flips(1000, seed=0)
    assert 400 < int(coins.sum()) < 600
    assert torch.equal(coins, alternating_flips(1000, seed=0))
    assert not torch.equal(coins, alternating_flips(1000, seed=1))
    idx = torch.randperm(1000)[:64]
    assert torch.equal(flip_mask(coins, idx, 0), ~flip_mask(coins, idx, 1))
    assert torch.equal(flip_mask(coins, idx, 1), flip_mask(coins, idx, 3))
    images = _batch(B=64)
    flipped = augment_batch(images, "flip", step_generator(0, 0, 0), flip=flip_mask(coins, idx, 0))
    mask = flip_mask(coins, idx, 0)
    assert torch.equal(flipped[mask], images[mask].flip(2))
    assert torch.equal(flipped[~mask], images[~mask])


def test_translate_by_zero_is_the_identity():
    x = _batch()
    assert torch.equal(random_translate(x, step_generator(0, 0, 0), 0), x)
    assert torch.equal(shift(x, 0, 0), x)


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -2), (2, 1), (-1, -1)])
def test_shift_is_a_reflect_padded_crop(dy, dx):
    x = _batch(B=4)
    expected = np.stack([_reflect_shift_np(img, dy, dx, pad=2) for img in x.numpy()])
    assert np.array_equal(shift(x, dy, dx).numpy(), expected)


def test_random_translate_moves_each_image_by_some_reflect_shift_within_range():
    s = 2
    x = _batch(B=24)
    y = random_translate(x, step_generator(0, 0, 0), s).numpy()
    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    seen = set()
    for img, out in zip(x.numpy(), y):
        matches = [o for o in offsets if np.array_equal(_reflect_shift_np(img, *o, pad=s), out)]
        assert matches, "output is not a reflect-shift of its own input within max_shift"
        seen.add(matches[0])
    assert len(seen) > 3  # the offsets really vary between images


def test_cutout_zeroes_one_square_of_the_given_size_across_all_channels():
    size = 4
    x = _batch(B=64, H=16, W=16)
    y = random_cutout(x, step_generator(0, 0, 0), size)
    inside_squares = 0
    for img, out in zip(x, y):
        zero = (out == 0)
        assert torch.equal(zero.all(-1), zero.any(-1)), "cutout must zero all channels of a pixel"
        mask = zero.all(-1)
        assert torch.equal(out[~mask], img[~mask]), "pixels outside the square are untouched"
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert len(rows) > 0, "every image gets a (possibly clipped) square"
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        height, width = int(bottom - top + 1), int(right - left + 1)
        assert int(mask.sum()) == height * width, "the zeroed region is one filled rectangle"
        assert height <= size and width <= size
        touches_edge = top == 0 or left == 0 or bottom == 15 or right == 15
        if not touches_edge:  # fully inside: exactly size x size
            assert (height, width) == (size, size)
            inside_squares += 1
    assert inside_squares > 10


def test_augmentation_keeps_each_image_in_its_slot_so_labels_stay_aligned():
    # Image i is filled with the value i + 1: after augmentation it may only hold i + 1 (or the
    # cutout's 0), so the engine's untouched label tensor still describes the same image.
    B = 40
    x = (torch.arange(B, dtype=torch.uint8) + 1).view(B, 1, 1, 1).expand(B, 8, 8, 3).contiguous()
    labels = torch.arange(B) % 3
    y = augment_batch(x, "flip+translate+cutout", step_generator(0, 0, 0), translate=2, cutout=4)
    for i in range(B):
        assert set(y[i].unique().tolist()) <= {0, i + 1}
    assert torch.equal(labels, torch.arange(B) % 3)


# ---------------------------------------------------------------------------------------------
# the learning-rate schedule


def test_warmup_ramps_linearly_to_the_peak():
    lrs = [lr_at(s, 100, 1.0, "onecycle", warmup_steps=10) for s in range(10)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(lrs), 0.1)


def test_lr_floor_lifts_the_whole_decay():
    total, warmup = 100, 20
    assert lr_at(total - 1, total, 2.0, "onecycle", warmup, final_fraction=0.07) == pytest.approx(
        0.14 + (2.0 - 0.14) / 80)
    assert lr_at(warmup, total, 2.0, "onecycle", warmup, final_fraction=0.07) == pytest.approx(2.0)


def test_onecycle_decays_linearly_to_about_zero():
    total, warm = 100, 10
    lrs = [lr_at(s, total, 2.0, "onecycle", warmup_steps=warm) for s in range(total)]
    assert lrs[warm] == pytest.approx(2.0)
    assert all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lrs[-1] == pytest.approx(2.0 / (total - warm)) and lrs[-1] < 0.025 * 2.0
    floored = lr_at(total - 1, total, 2.0, "onecycle", warmup_steps=warm, final_fraction=0.1)
    assert 0.2 < floored < 0.2 + 2.0 / (total - warm)


def test_cosine_is_halfway_at_the_midpoint_of_the_decay():
    total, warm, peak = 110, 10, 1.0
    assert lr_at(warm + 50, total, peak, "cosine", warmup_steps=warm) == pytest.approx(0.5)
    assert lr_at(warm + 50, total, peak, "cosine", warmup_steps=warm, final_fraction=0.2) == pytest.approx(0.6)
    assert lr_at(warm, total, peak, "cosine", warmup_steps=warm) == pytest.approx(1.0)


def test_constant_schedule_is_flat_after_warmup():
    assert {lr_at(s, 50, 0.3, "constant") for s in range(50)} == {0.3}
    assert lr_at(0, 50, 0.3, "constant", warmup_steps=3) == pytest.approx(0.1)


def test_schedule_rejects_steps_outside_the_run():
    with pytest.raises(AssertionError):
        lr_at(100, 100, 1.0, "onecycle")


# ---------------------------------------------------------------------------------------------
# test-time augmentation


class _FlipInvariant(torch.nn.Module):
    """f(x) + f(mirror x) for a random conv net: exactly invariant to left-right flips."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x) + self.net(x.flip(3))


def _prep(C=3, H=12, W=10):
    return Preprocessing((0.5,) * C, (0.25,) * C, (H, W), C)


def test_tta_views_are_airbench94s_six_the_image_its_mirror_and_both_one_pixel_shifts():
    x = _batch(B=5)
    views, weights = zip(*tta_views(x))
    assert len(views) == 6 and sum(weights) == pytest.approx(1.0)
    assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
    assert all(v.shape == x.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(2))
    assert torch.equal(views[2], shift(x, 1, 1)) and torch.equal(views[3], shift(x, 1, 1).flip(2))
    assert torch.equal(views[4], shift(x, -1, -1)) and torch.equal(views[5], shift(x, -1, -1).flip(2))


def test_tta_of_a_flip_invariant_model_equals_plain_prediction(monkeypatch):
    import imgflow.inference as inference

    monkeypatch.setattr(inference, "tta_views", lambda images, prep=None: [(images, 0.5), (images.flip(2), 0.5)])
    model = _FlipInvariant().eval()
    x = _batch(B=7)
    plain = predict_logits(model, x, _prep(), batch_size=3).softmax(1)
    tta = predict_logits(model, x, _prep(), batch_size=3, tta=True).softmax(1)
    assert torch.allclose(tta, plain, atol=1e-5)


def test_tta_averages_the_probabilities_of_all_views_with_their_weights():
    model = _FlipInvariant().eval()
    x = _batch(B=6)
    tta = predict_logits(model, x, _prep(), batch_size=4, tta=True).softmax(1)
    expected = sum(w * predict_logits(model, v, _prep()).softmax(1) for v, w in tta_views(x))
    assert torch.allclose(tta, expected, atol=1e-5)


def test_tta_can_average_the_logits_as_airbench_does():
    torch.manual_seed(0)  # a linear map of the pixels: views far apart, so the two averages differ
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 10, 4)).eval()
    x = _batch(B=6)
    with torch.no_grad():
        model[1].weight.mul_(50)
    tta = predict_logits(model, x, _prep(), batch_size=4, tta=True, tta_average="logits")
    expected = sum(w * predict_logits(model, v, _prep()) for v, w in tta_views(x))
    assert torch.allclose(tta, expected, atol=1e-5)
    probabilities = predict_logits(model, x, _prep(), batch_size=4, tta=True).softmax(1)
    assert not torch.allclose(tta.softmax(1), probabilities, atol=1e-4)  # another average


def test_evaluate_run_with_tta_on_the_tiny_run(tiny_run, tmp_path):
    from imgflow.evaluation import evaluate_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    plain = json.loads((tiny_run / "metrics.json").read_text())
    metrics = evaluate_run(run_dir, tta=True, progress=False)
    assert metrics["tta"] is True and metrics["num_images"] == plain["num_images"] == 39
    assert metrics["accuracy"] > 0.8
    assert metrics["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # other probabilities: the views were used
    assert json.loads((run_dir / "metrics.json").read_text())["tta"] is True


# ---------------------------------------------------------------------------------------------
# presets


def test_presets_fill_the_config_and_validate():
    for name, values in PRESETS.items():
        config = resolve_config("cifar10", {}, preset=name)
        assert config.preset == name
        for key, value in values.items():
            assert getattr(config, key) == value, (name, key)


def test_fast_and_best_follow_airbench94_muon_and_airbench94_follows_its_own_recipe():
    for name in ("fast", "best", "airbench94"):
        p = PRESETS[name]
        assert p["schedule"] == "onecycle" and p["weight_decay"] > 0 and p["label_smoothing"] == 0.2
        assert p["augment"] == "flip+translate" and p["flip"] == "alternate" and p["translate"] == 2
        assert p["whiten_bias_epochs"] == 3 and p["bn_lr_scale"] == 64 and p["normalize"] == "standardize"
        assert p["precision"] == "auto" and p["val_split"] == 0 and PRESET_INFO[name]["tta"] is True
    for name in ("fast", "best"):  # Muon for the filters, linear decay from the first step
        p = PRESETS[name]
        assert p["optimizer"] == "muon" and p["muon_lr"] == 0.24 and p["warmup_epochs"] == 0 and p["lr_floor"] == 0
    sgd = PRESETS["airbench94"]  # warm-up over 23% of 10 epochs, decay to 0.07, lookahead every 5 steps
    assert sgd["optimizer"] == "sgd" and sgd["warmup_epochs"] / sgd["epochs"] == pytest.approx(0.23)
    assert sgd["lr_floor"] == 0.07 and sgd["lookahead"] == 5 and sgd["batch_size"] == 1024
    rows = {r["name"]: r for r in describe_presets()}
    assert set(rows) == set(PRESETS) and rows["best"]["target"] == 0.905


def test_explicit_options_win_over_the_preset():
    config = resolve_config("cifar10", {"epochs": 1, "lr": 0.1, "model": "fast-medium", "seed": None},
                            preset="best")
    assert (config.epochs, config.lr, config.model) == (1, 0.1, "fast-medium")
    assert config.batch_size == PRESETS["best"]["batch_size"] and config.seed == 0


def test_cli_preset_without_model_resolves_and_cli_options_override():
    args = build_parser().parse_args(["train", "cifar10", "--preset", "fast", "--epochs", "2", "--seed", "3"])
    config = config_from_args(args)
    assert config.model == "fast-small" and config.epochs == 2 and config.seed == 3
    assert config.batch_size == PRESETS["fast"]["batch_size"]
    assert args.out == "runs/fast-small-seed3"


def test_unknown_preset_is_a_user_error(tiny_data, tmp_path, capsys):
    with pytest.raises(UserError, match="unknown preset 'fastest'.*fast"):
        resolve_config("cifar10", {}, preset="fastest")
    assert main(["train", str(tiny_data), "--preset", "fastest", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_train_with_the_fast_preset_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "fast"
    assert main(["-q", "train", str(tiny_data), "--preset", "fast", "--epochs", "1",
                 "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["preset"] == "fast" and config["train"]["model"] == "fast-small"
    assert config["train"]["epochs"] == 1 and config["train"]["optimizer"] == "muon"
    assert config["result"]["epochs_run"] == 1 and (run_dir / "model.safetensors").is_file()
    history = (run_dir / "history.csv").read_text().splitlines()
    train_loss, train_acc, val_loss, val_acc, lr = history[1].split(",")[1:6]
    assert len(history) == 2 and all(math.isfinite(float(v)) for v in (train_loss, train_acc, lr))
    assert val_loss == val_acc == ""  # the preset trains on all the training images: no validation
    assert main(["-q", "evaluate", str(run_dir), "--tta"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["tta"] is True


# ---------------------------------------------------------------------------------------------
# the benchmark scripts' bookkeeping (no timing here: speed is measured by the benchmarks)


@pytest.fixture
def benchmark_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import make_tables
    import time_to_accuracy

    return make_tables, time_to_accuracy


def _record(preset, seed, acc, seconds, extra=(), epoch_seconds=None):
    return {"preset": preset, "seed": seed, "extra": list(extra), "data": "cifar10", "model": "fast-small",
            "epochs": 5, "precision": "fp32", "tta": True, "test_accuracy": acc, "total_seconds": seconds,
            "median_epoch_seconds": epoch_seconds}


def test_time_to_accuracy_merges_per_preset_and_seed_and_summarises(benchmark_modules):
    _, tta = benchmark_modules
    runs = tta.merge([_record("fast", 0, 0.80, 100), _record("fast", 1, 0.84, 120, epoch_seconds=21.0)],
                     [_record("fast", 0, 0.82, 110, epoch_seconds=20.0),
                      _record("fast", 0, 0.5, 10, extra=["--epochs", "1"])])
    assert len(runs) == 3
    summary = {tuple(r["extra"]): r for r in tta.summarise(runs)}
    full = summary[()]
    assert full["n"] == 2 and full["test_accuracy_mean"] == pytest.approx(0.83)
    assert full["test_accuracy_std"] == pytest.approx(np.std([0.82, 0.84], ddof=1), abs=1e-4)
    assert full["median_epoch_seconds"] == pytest.approx(20.5)
    assert summary[("--epochs", "1")]["n"] == 1
    assert summary[("--epochs", "1")]["median_epoch_seconds"] is None  # a record from before the field


def test_time_to_accuracy_resumes_a_run_it_started_before(benchmark_modules, tmp_path):
    _, tta = benchmark_modules
    run = tmp_path / "best-seed0"
    assert tta._train_option(run, resume=True) == "--overwrite"  # nothing there yet
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {}}))
    # imgflow train --resume continues it, says it has finished, or refuses other options
    assert tta._train_option(run, resume=True) == "--resume"
    assert tta._train_option(run, resume=False) == "--overwrite"  # without --resume: start over


def test_make_tables_writes_markdown_from_result_files(benchmark_modules, tmp_path):
    make_tables, _ = benchmark_modules
    machine = {"cpu": "Test CPU", "logical_cpus": 2, "flags": {"avx2": True}, "native_bf16": False,
               "torch": "2.x", "threads": 2}
    (tmp_path / "throughput-test.json").write_text(json.dumps({
        "machine": machine, "date": "2025-01-01T00:00:00", "quick": True,
        "matmul_peaks": [{"threads": 2, "fp32": 50.0}], "tensorflow": None, "keras": None, "notes": [],
        "pytorch": [{"model": "fast-small", "precision": "fp32", "threads": 2, "mflop_per_image": 39.8,
                     "train_images_per_second": 250.0, "train_gflops": 29.9, "train_utilisation": 0.6,
                     "inference_images_per_second": 700.0, "inference_gflops": 27.9,
                     "inference_utilisation": 0.56}]}))
    (tmp_path / "time_to_accuracy-test.json").write_text(json.dumps({
        "machine": machine, "summary": [{"preset": "fast", "extra": [], "data": "cifar10", "model": "fast-small",
                                         "epochs": 5, "n": 3, "tta": True, "precision": "fp32",
                                         "test_accuracy_mean": 0.85, "test_accuracy_std": 0.004,
                                         "total_seconds_mean": 600, "total_seconds_std": 30, "target": 0.832,
                                         "median_epoch_seconds": 101.4}]}))
    assert make_tables.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "TABLES.md").read_text()
    assert "Test CPU" in text and "| fast-small | fp32 | 2 | 39.8 | 250 | 29.9 (60%) | 700 |" in text
    assert "| `fast` | fast-small | 5 | 10.0 ± 0.5 min | 0.8500 ± 0.0040 | 3 |" in text
    assert "median epoch 101 s" in text
    assert "0.8318" in text  # the notebook's number stands beside ours


def test_make_tables_shows_the_batchnorm_lag_results(benchmark_modules, tmp_path):
    make_tables, _ = benchmark_modules
    (tmp_path / "batchnorm-lag-test.json").write_text(json.dumps([{
        "run": "runs/x", "model": "seed-batchnorm", "weights": "model.safetensors", "seed": 0,
        "train_images": 5000, "val_images": 2000,
        "val_accuracy": {"running averages": 0.75, "re-estimated, dropout off": 0.83,
                         "re-estimated, dropout on": 0.829}}]))
    text = make_tables.build(tmp_path)
    assert "| runs/x | seed-batchnorm | model.safetensors | 0 | 0.7500 | 0.8300 | 0.8290 | 5,000 / 2,000 | - |" in text


def test_workflow_seeds_summarise_and_tabulate(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import make_tables
    import workflow_seeds

    def run(seed, acc, minutes):
        return {"data": "cifar10", "budget_minutes": 15.0, "seed": seed, "test_accuracy": acc,
                "elapsed_minutes": minutes, "model": "fast-large", "final_optimizer": "muon", "final_epochs": 11}

    runs = [run(0, 0.91, 15.1), run(1, 0.92, 15.3), {**run(0, 0.5, 1.0), "budget_minutes": 1.0}]
    summary = {row["budget_minutes"]: row for row in workflow_seeds.summarise(runs)}
    assert summary[15.0]["n"] == 2 and summary[15.0]["test_accuracy_mean"] == pytest.approx(0.915)
    assert summary[15.0]["test_accuracy_std"] == pytest.approx(np.std([0.91, 0.92], ddof=1), abs=1e-4)
    assert summary[1.0]["seeds"] == [0]
    machine = {"cpu": "Test CPU", "logical_cpus": 2, "flags": {}, "native_bf16": True, "torch": "2.x", "threads": 2}
    (tmp_path / "workflow-test.json").write_text(json.dumps({"machine": machine, "runs": runs,
                                                            "summary": workflow_seeds.summarise(runs)}))
    text = make_tables.build(tmp_path)
    assert "| cifar10 | 15 min | 0.9150 ± 0.0071 | 15.2 ± 0.1 min | 0, 1 |" in text
    assert "1: 0.9200, fast-large, muon, 11" in text


def test_workflow_seeds_stops_with_exit_2_when_the_workflow_fails_and_keeps_earlier_results(
        monkeypatch, tmp_path, capsys):
    import subprocess
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import workflow_seeds

    def fail(*args):
        raise subprocess.CalledProcessError(2, ["imgflow"])

    out = tmp_path / "workflow.json"
    out.write_text(json.dumps({"runs": [{"data": "cifar10", "budget_minutes": 15.0, "seed": 0, "test_accuracy": 0.9,
                                         "elapsed_minutes": 15.0}]}))
    before = out.read_text()
    monkeypatch.setattr(workflow_seeds, "run_one", fail)
    assert workflow_seeds.main(["--seeds", "1", "--out", str(out)]) == 2
    assert "failed for seed 1 (exit 2)" in capsys.readouterr().err and out.read_text() == before


def test_ablation_variants_parse_and_summarise_and_tabulate(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ablation
    import make_tables

    assert ablation.parse_variant("plain=--epochs 4") == ("plain", ["--epochs", "4"])
    assert ablation.parse_variant("as-is=") == ("as-is", [])
    for bad in ("no-equals", "=--epochs 4", "a/b=--epochs 1"):
        with pytest.raises(ValueError, match="NAME=OPTIONS"):
            ablation.parse_variant(bad)
    runs = [{"variant": v, "options": o, "seed": seed, "epochs": 4, "val_accuracy": acc}
            for v, o, seed, acc in [("plain", [], 0, 0.80), ("la", ["--lookahead", "5"], 0, 0.81),
                                    ("plain", [], 1, 0.82)]]
    summary = ablation.summarise(runs)
    assert [r["variant"] for r in summary] == ["plain", "la"]
    assert summary[0]["n"] == 2 and summary[0]["val_accuracy_mean"] == pytest.approx(0.81)
    assert summary[0]["seeds"] == [0, 1] and summary[1]["val_accuracy_std"] == 0.0
    machine = {"cpu": "Test CPU", "logical_cpus": 2, "flags": {}, "threads": 2}
    (tmp_path / "ablation-fast-test.json").write_text(json.dumps(
        {"preset": "fast", "machine": machine, "summary": summary}))
    assert make_tables.main(["--results", str(tmp_path), "--out", "-"]) == 0
    text = make_tables.build(tmp_path)
    assert "| plain | `-` | 4 | 0.8100 ± 0.0141 | 0, 1 |" in text
    assert "| la | `--lookahead 5` | 4 | 0.8100 | 0 |" in text
    # Scored with TTA too: both averages summarised and tabulated.
    for r, (probs, logits) in zip(runs, [(0.84, 0.85), (0.83, 0.83), (0.86, 0.85)]):
        r["val_accuracy_tta"] = {"probabilities": probs, "logits": logits}
    summary = ablation.summarise(runs)
    assert summary[0]["val_tta_probabilities_accuracy_mean"] == pytest.approx(0.85)
    assert summary[0]["val_tta_logits_accuracy_mean"] == pytest.approx(0.85)
    (tmp_path / "ablation-fast-test.json").write_text(json.dumps(
        {"preset": "fast", "machine": machine, "summary": summary}))
    text = make_tables.build(tmp_path)
    assert "| validation accuracy | TTA, probabilities | TTA, logits | seeds |" in text
    assert "| la | `--lookahead 5` | 4 | 0.8100 | 0.8300 | 0.8300 | 0 |" in text
    # A preset without validation cannot be scored: refused before anything trains.
    assert ablation.main(["--preset", "best", "--variant", "x=--epochs 1", "--runs-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    # A bad option fails in `imgflow train`: one line from each, exit 2, no result file.
    out = tmp_path / "ablation.json"
    assert ablation.main(["--data", str(tmp_path / "missing"), "--variant", "x=--epochs 1",
                          "--runs-dir", str(tmp_path / "r"), "--out", str(out)]) == 2
    assert not out.exists()


def test_ablation_scores_a_run_on_its_validation_split_with_both_tta_averages(monkeypatch, tiny_data, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ablation
    from imgflow.data import load_dataset
    from conftest import train_tiny
    from imgflow.data.splits import split_train_val

    train_tiny(tiny_data, tmp_path / "run", model="fast-small", epochs=2, lr=0.05)
    scores = ablation.tta_accuracies(tmp_path / "run")
    assert set(scores) == {"probabilities", "logits"}
    _, val = split_train_val(load_dataset(str(tiny_data), progress=False).train, 0.2, "last", 0)
    # Accuracies of the validation split's images, not of another split's.
    assert all(round(a * len(val.labels)) == pytest.approx(a * len(val.labels), abs=1e-2) for a in scores.values())


# ---------------------------------------------------------------------------------------------
# lookahead and per-group learning rates


def _bn_model() -> torch.nn.Module:
    """conv (5x5 input -> 3x3) -> BN -> flatten -> linear."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 3 * 3, 2))


def test_lookahead_decay_ramps_up_cubically_to_airbench_value():
    from imgflow.training.averaging import Lookahead

    la = Lookahead(_bn_model(), every=5)
    assert la.decay_at(0, 100) == 0.0
    assert la.decay_at(50, 100) == pytest.approx(0.95 ** 5 / 8)
    assert la.decay_at(100, 100) == pytest.approx(0.95 ** 5)


def test_lookahead_moves_slow_weights_toward_live_ones_and_jumps_the_live_ones_to_them():
    from imgflow.training.averaging import Lookahead

    model = _bn_model()
    la = Lookahead(model, every=5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    la.update(model, decay=0.0)  # no memory: the slow copy becomes the live weights
    assert torch.equal(model[0].weight, start["0.weight"] + 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(4.0)
        model[1].num_batches_tracked.add_(7)
    la.update(model, decay=0.75)  # slow = 0.75 slow + 0.25 live, and the live weights jump to it
    assert torch.allclose(model[0].weight, start["0.weight"] + 1.25)
    assert torch.allclose(la.state["0.weight"], model[0].weight)
    assert torch.allclose(model[1].running_mean, start["1.running_mean"] + 3.0)  # stats averaged too
    assert "1.num_batches_tracked" not in la.state and int(model[1].num_batches_tracked) == 7  # counters not


def test_lookahead_syncs_after_the_last_step_and_first_takes_the_live_weights():
    from imgflow.training.averaging import Lookahead

    def train(total_steps):
        """(initial weight, final weight, lookahead) after `total_steps` steps that each add 1."""
        model = _bn_model()
        start = model[0].weight.clone()
        la = Lookahead(model, every=5)
        for step in range(1, total_steps + 1):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            la.after_step(model, step, total_steps)
        return start, model[0].weight, la

    start, end, _ = train(3)  # one sync, after the last step: nothing dropped, nothing undone
    assert torch.allclose(end, start + 3.0)
    start, end, la = train(7)  # syncs after step 5 (takes the live weights) and step 7 (the last)
    decay = la.decay_at(7, 7)
    assert torch.allclose(end, start + decay * 5.0 + (1 - decay) * 7.0)
    assert torch.allclose(la.state["0.weight"], end)


def test_bn_lr_scale_gives_batchnorm_its_own_learning_rate():
    from imgflow.training.config import TrainConfig
    from imgflow.training.optim import build_optimizer

    model = _bn_model()
    plain = build_optimizer(model, TrainConfig("x", "fast-small"))
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]
    scaled = build_optimizer(model, TrainConfig("x", "fast-small", bn_lr_scale=64.0, weight_decay=0.1))
    decay, biases, norm = scaled.param_groups
    bn = model[1]
    assert [id(p) for p in norm["params"]] == [id(bn.weight), id(bn.bias)] and norm["lr_scale"] == 64.0
    assert norm["weight_decay"] == 0 and biases["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert {id(p) for p in biases["params"]} == {id(model[0].bias), id(model[3].bias)}


def test_set_lr_scales_each_group_and_treats_old_groups_as_unscaled():
    from imgflow.training.config import TrainConfig
    from imgflow.training.optim import build_optimizer, set_lr

    model = _bn_model()
    optimizer = build_optimizer(model, TrainConfig("x", "fast-small", optimizer="sgd", bn_lr_scale=64.0))
    del optimizer.param_groups[1]["lr_scale"]  # as loaded from a checkpoint written before lr_scale
    set_lr(optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.1, 6.4])


@pytest.mark.parametrize("options, message", [
    ({"flip": "alternate", "augment": "none"}, "--flip alternate needs flipping"),
    ({"lr_floor": 0.07, "schedule": "constant"}, "--lr-floor needs a decaying --schedule"),
    ({"lookahead": 5, "ema": 0.99}, "use one of them"),
    ({"lookahead": -1}, "--lookahead must be >= 0"),
    ({"bn_lr_scale": 0.0}, "--bn-lr-scale must be > 0"),
    ({"val_subset": 100, "val_split": 0.0}, "--val-subset needs a validation split"),
])
def test_airbench_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        resolve_config("cifar10", {"model": "fast-small", "augment": "flip", "schedule": "onecycle", **options})


def test_airbench_options_train_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "airbench"
    assert main(["-q", "train", str(tiny_data), "--preset", "fast", "--epochs", "2", "--val-split", "0.2",
                 "--optimizer", "sgd", "--bn-lr-scale", "64",
                 "--lookahead", "2", "--flip", "alternate", "--lr-floor", "0.07", "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())["train"]
    assert (config["bn_lr_scale"], config["lookahead"], config["flip"], config["lr_floor"]) == (64, 2, "alternate", 0.07)
    rows = (run_dir / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(math.isfinite(float(v)) for r in rows for v in r.split(",")[1:6])


def _default_sigint():
    # A shell's background job (`cmd &`) starts with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the benchmark the Ctrl-C handling it has in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_benchmark_ctrl_c_lets_the_training_child_save_its_checkpoint(tmp_path):
    # A stand-in for `imgflow train` that needs a second to save on Ctrl-C: the benchmark passes
    # the Ctrl-C on and waits, where subprocess.run would kill it after a quarter of a second.
    saved = tmp_path / "saved"
    child = ("import signal, sys, time, pathlib\n"
             "def stop(*_):\n"
             "    time.sleep(1.0)\n"
             f"    pathlib.Path({str(saved)!r}).write_text('checkpoint')\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    parent = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r})\n"
              "from run_command import run_to_end\n"
              f"run_to_end([sys.executable, '-c', {child!r}])\n")
    for target in ("group", "benchmark only"):  # Ctrl-C in a terminal, or `kill -INT PID`
        saved.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, preexec_fn=_default_sigint)
        try:
            assert proc.stdout.readline().strip() == "ready"
            if target == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err, target  # the benchmark stops...
        assert saved.read_text() == "checkpoint", target  # ...after its child has saved


def test_a_run_shorter_than_its_lookahead_period_keeps_what_it_trained(tiny_data, tmp_path):
    """One sync, after the last step, takes the live weights: the run ends as without lookahead
    (it used to end on the slow copy, i.e. the initial weights)."""
    from safetensors.torch import load_file

    from conftest import train_tiny

    train_tiny(tiny_data, tmp_path / "plain", epochs=1)
    train_tiny(tiny_data, tmp_path / "lookahead", epochs=1, lookahead=1000)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    averaged = load_file(tmp_path / "lookahead" / "model.safetensors")
    assert plain.keys() == averaged.keys()
    assert all(torch.equal(plain[k], averaged[k]) for k in plain)


def test_the_throughput_benchmark_measures_on_the_device_it_is_given(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput

    out = tmp_path / "throughput.json"
    assert throughput.main(["--quick", "--device", "cpu", "--models", "seed-baseline", "--precisions", "fp32,fp16",
                            "--steps", "2", "--warmup", "1", "--threads", "1", "--no-keras", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["device"]["type"] == "cpu"
    assert [(r["device"], r["precision"]) for r in result["pytorch"]] == [("cpu", "fp32")]
    assert any("fp16 skipped" in note for note in result["notes"])
    assert result["pytorch"][0]["train_images_per_second"] > 0
    assert result["pytorch"][0]["inference_batchnorm_folded"] is False  # seed-baseline cannot fold
    row = throughput.bench_torch("fast-small", "fp32", 8, 8, 1, 1, 1)
    assert row["inference_batchnorm_folded"] is True  # as a loaded run infers
    assert throughput.bench_torch("fast-small", "fp32", 8, 8, 1, 1, 1, fold=False)["inference_batchnorm_folded"] is False
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert throughput.main(["--device", "cuda", "--out", str(tmp_path / "no.json")]) == 2
        assert "--device cuda" in capsys.readouterr().err and not (tmp_path / "no.json").exists()
