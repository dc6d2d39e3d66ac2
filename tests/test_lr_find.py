"""`imgflow lr-find` and `train --lr find`: the range test, its valley rule, its files and runs."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest

from imgflow.cli import main
from imgflow.errors import UserError
from imgflow.training.config import resolve_config
from imgflow.training.lr_find import (BETA, RangeTest, lr_find, smooth, suggest_lr, train_at_found_lr,
                                      valley)
from imgflow.training.loop import train

# The known problem: tiny_data's three colour classes, seed-baseline, Nesterov SGD, batch 16.
# Measured by training 3 epochs at each rate (seeds 0-2): lr 1e-2..1e-1 reach val loss <= 0.17,
# 1e-4..1e-3 are still near chance (~1.0), 0.3 and above diverge. The right decade: [1e-2, 1e-1).
KNOWN = dict(model="seed-baseline", optimizer="sgd", batch_size=16, precision="fp32")
KNOWN_ARGS = ["--model", "seed-baseline", "--optimizer", "sgd", "--batch-size", "16", "--precision", "fp32"]


def _config(data, **overrides):
    return resolve_config(str(data), {**KNOWN, **overrides})


def _logistic_fall(lrs, centre: float, high: float = 2.0, low: float = 0.2, width: float = 0.4):
    """A loss that falls from `high` to `low` around lr `centre` (width in decades)."""
    x = (np.log10(lrs) - math.log10(centre)) / width
    return low + (high - low) / (1 + np.exp(x))


LRS = [RangeTest().lr_at(i) for i in range(100)]  # 1e-7 .. 10


# ----------------------------------------------------------------------------------------------
# the rule, on curves made here


def test_smoothing_is_a_debiased_average():
    """Debiased: it starts at the first loss (a plain EMA would start near 0)."""
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0])[1] == pytest.approx((BETA * 1 + 3) / (BETA + 1))  # weights 0.98 : 1


def test_range_test_rates_grow_geometrically_from_start_to_end():
    test = RangeTest(steps=9, start_lr=1e-4, end_lr=1.0)
    lrs = [test.lr_at(i) for i in range(9)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.5)


def test_valley_of_a_clean_fall_is_centred_on_it():
    """On a curve that falls symmetrically around 1e-2 the middle of the valley is 1e-2 itself."""
    curve = list(_logistic_fall(LRS, centre=1e-2))
    suggestion, found = suggest_lr(LRS, curve)
    assert LRS[found.top] < 1e-2 < LRS[found.bottom]
    assert suggestion == pytest.approx(1e-2, rel=0.15)
    assert found.fell == pytest.approx(0.9, abs=0.01)


def test_valley_stops_short_of_the_blow_up():
    """A loss that bottoms out and then diverges: the valley is the fall, not the climb after it."""
    loss = _logistic_fall(LRS, centre=1e-3) + np.where(np.array(LRS) > 1e-1, (np.array(LRS) / 1e-1) ** 2 - 1, 0)
    suggestion, found = suggest_lr(LRS, list(loss))
    assert LRS[found.bottom] < 1e-1
    assert 3e-4 < suggestion < 3e-3


def test_valley_on_noisy_losses_stays_put_where_the_steepest_point_jumps():
    """Lightning#21141: the steepest point of a noisy loss curve lands anywhere. Smoothed and read
    by levels, the suggestion stays in the clean curve's decade over ten noise draws."""
    clean = _logistic_fall(LRS, centre=1e-2) + np.where(np.array(LRS) > 1, 50.0, 0)  # then it explodes
    clean_suggestion, _ = suggest_lr(LRS, smooth(clean))
    assert 1e-2 <= clean_suggestion < 1e-1  # the average's lag puts it a little after the fall's centre
    ours, steepest = [], []
    for seed in range(10):
        noisy = clean + np.random.default_rng(seed).normal(0, 0.3, len(clean))  # sd: 1/6 of the fall
        ours.append(suggest_lr(LRS, smooth(noisy))[0])
        steepest.append(LRS[int(np.argmin(np.gradient(noisy[:90])))])
    assert all(1e-2 <= s < 1e-1 for s in ours) and max(ours) / min(ours) < 2.5, ours
    assert max(steepest) / min(steepest) > 1e3, steepest


def test_a_curve_that_never_falls_has_no_valley():
    rising = list(np.linspace(1.0, 3.0, 50))
    assert valley(rising).fell == 0


# ----------------------------------------------------------------------------------------------
# the range test on the engine


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suggestion_lands_in_the_known_decade(tiny_data, seed):
    found = lr_find(_config(tiny_data, seed=seed), progress=False)
    assert 1e-2 <= found.suggestion < 1e-1, found.rule
    assert found.valley[0] < found.suggestion < found.valley[1]


def test_the_suggestion_trains_where_a_tiny_rate_does_not(tiny_data, tmp_path):
    """The known decade, checked: 3 epochs at the suggestion fit the data, at 1e-4 nothing moves."""
    found = lr_find(_config(tiny_data), progress=False)
    good = train(_config(tiny_data, lr=found.suggestion, epochs=3), tmp_path / "good", progress=False)
    slow = train(_config(tiny_data, lr=1e-4, epochs=3), tmp_path / "slow", progress=False)
    assert good.history[-1]["val_loss"] < 0.2 and good.history[-1]["val_acc"] == 1.0
    assert slow.history[-1]["val_loss"] > 0.9


def test_same_config_same_curve_and_suggestion(tiny_data):
    """fastai#3295: suggestions that change from run to run. Here the batches come from the seeded
    EpochBatches and the model from the seed: the same config gives the same numbers."""
    first = lr_find(_config(tiny_data, seed=3), progress=False)
    second = lr_find(_config(tiny_data, seed=3), progress=False)
    assert first.losses == second.losses and first.suggestion == second.suggestion
    assert lr_find(_config(tiny_data, seed=4), progress=False).losses != first.losses


def test_stops_early_when_the_loss_explodes(tiny_data):
    """Label smoothing keeps the loss off 0 (no 'learnt by heart' stop), so the rates climb until
    SGD blows up (it diverges from lr ~0.3 on this problem)."""
    test = RangeTest(steps=60, start_lr=1e-2, end_lr=100.0)
    found = lr_find(_config(tiny_data, label_smoothing=0.1), test, progress=False)
    assert len(found.lrs) < test.steps and found.lrs[-1] < 1
    assert "4x its lowest" in found.stopped or "not finite" in found.stopped
    if "4x" in found.stopped:
        assert found.smoothed[-1] > 4 * min(found.smoothed[:-1])


def test_stops_once_the_batches_are_learnt_by_heart(tiny_data):
    """At a loss of ~0 there is no gradient left: higher rates would only show the average's lag."""
    found = lr_find(_config(tiny_data), progress=False)
    assert "learnt by heart" in found.stopped and len(found.lrs) < 100
    assert max(found.losses[-5:]) < 0.01 * found.losses[0]


def test_the_config_lr_plays_no_part(tiny_data):
    """The test sets every step's lr itself: the config's lr (and schedule) change nothing."""
    a = lr_find(_config(tiny_data, lr=1e-3), RangeTest(steps=20), progress=False)
    b = lr_find(_config(tiny_data, lr=0.5, schedule="onecycle", warmup_epochs=1.0), RangeTest(steps=20),
                progress=False)
    assert a.losses == b.losses


# ----------------------------------------------------------------------------------------------
# imgflow lr-find


def test_lr_find_prints_the_suggestion_and_writes_plot_and_curve(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", str(tiny_data), *KNOWN_ARGS]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("suggested lr ") and "(valley: lr " in out[0]
    suggestion = float(out[0].split()[2])
    folder = tmp_path / "runs" / "lr-find" / "seed-baseline"  # the default --out
    assert sorted(p.name for p in folder.iterdir()) == ["lr_find.csv", "lr_find.png"]
    assert (folder / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(folder / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["lr", "loss", "smoothed_loss"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-7) and lrs == sorted(lrs) and 10 <= len(rows) <= 100
    assert float(rows[0]["smoothed_loss"]) == pytest.approx(float(rows[0]["loss"]))
    assert suggestion == lr_find(_config(tiny_data), progress=False).suggestion  # command = library


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--steps", "3"], "--steps must be >= 10"),
    (["--steps", "0"], "expected a positive integer"),
    (["--start-lr", "1", "--end-lr", "0.1"], "0 < start < end <= 100"),
    (["--end-lr", "1000"], "0 < start < end <= 100"),
    (["--lr", "0.1"], "unrecognized arguments: --lr"),
    (["--out", "a-file"], "is a file, not a directory"),
])
def test_lr_find_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tiny_data, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    if "--model" not in argv:
        argv = [*argv, "--model", "seed-baseline"]
    try:
        code = main(["lr-find", str(tiny_data), *argv])
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_lr_find_of_missing_data_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", str(tmp_path / "nowhere"), "--model", "seed-baseline", "--out", "out"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# imgflow train --lr find


def test_train_lr_find_records_the_test_and_trains_at_its_suggestion(tiny_data, tmp_path, capsys):
    found_run, plain_run = tmp_path / "found", tmp_path / "plain"
    assert main(["train", str(tiny_data), *KNOWN_ARGS, "--epochs", "2", "--lr", "find",
                 "--out", str(found_run)]) == 0
    assert "trained at the suggested lr" in capsys.readouterr().out
    config = json.loads((found_run / "config.json").read_text())
    record = config["lr_find"]
    assert config["train"]["lr"] == record["suggestion"] and 1e-2 <= record["suggestion"] < 1e-1
    assert record["rule"] == "valley" and record["steps"] == 100 and 10 <= record["steps_taken"] <= 100
    assert record["valley"][0] < record["suggestion"] < record["valley"][1]
    # Trained at exactly that lr, and the search left no trace in the run (RNG, weights):
    # the same weights, byte for byte, as a run given that lr outright.
    assert main(["train", str(tiny_data), *KNOWN_ARGS, "--epochs", "2", "--lr", repr(record["suggestion"]),
                 "--out", str(plain_run)]) == 0
    assert (found_run / "model.safetensors").read_bytes() == (plain_run / "model.safetensors").read_bytes()
    assert "lr_find" not in json.loads((plain_run / "config.json").read_text())


class _StopAfterFirstEpoch(Exception):
    pass


def _stop(row):
    raise _StopAfterFirstEpoch


def test_a_resumed_lr_find_run_does_not_search_again(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with pytest.raises(_StopAfterFirstEpoch):
        train_at_found_lr(_config(tiny_data, epochs=2), run_dir, progress=False, on_epoch=_stop)
    started = json.loads((run_dir / "config.json").read_text())

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr("imgflow.training.lr_find.lr_find", no_search)
    assert main(["train", "--resume", "--out", str(run_dir), "--lr", "find"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr_find"] == started["lr_find"] and config["train"]["lr"] == started["train"]["lr"]
    history = list(csv.DictReader(open(run_dir / "history.csv")))
    assert len(history) == 2 and {float(row["lr"]) for row in history} == {started["lr_find"]["suggestion"]}


def test_train_lr_find_refuses_a_taken_run_dir_before_searching(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    monkeypatch.setattr("imgflow.training.lr_find.lr_find", lambda *a, **k: pytest.fail("searched"))
    data = json.loads((run_dir / "config.json").read_text())["train"]["data"]
    assert main(["train", data, "--model", "seed-baseline", "--lr", "find", "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert main(["train", data, "--model", "seed-baseline", "--lr", "find", "--resume",
                 "--out", str(tmp_path / "missing")]) == 2
    assert "cannot resume" in capsys.readouterr().err and not (tmp_path / "missing").exists()


def test_train_lr_find_overwrite_records_the_test_in_the_new_run(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    data = json.loads((run_dir / "config.json").read_text())["train"]["data"]
    assert main(["train", data, *KNOWN_ARGS, "--epochs", "1", "--lr", "find", "--overwrite",
                 "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["lr"] == config["lr_find"]["suggestion"] and config["train"]["epochs"] == 1
    assert not (run_dir / "metrics.json").exists()  # the old model's artifacts went with it


def test_lr_find_is_a_train_option_only(tiny_data, tmp_path, monkeypatch, capsys):
    """`--lr find` means something to train alone: elsewhere a config's lr stays a number."""
    with pytest.raises(UserError, match="only 'imgflow train' runs lr-find first"):
        resolve_config(str(tiny_data), {"model": "seed-baseline", "lr": "find"})
    monkeypatch.chdir(tmp_path)
    assert main(["tune", str(tiny_data), "--out", "study", "--model", "seed-baseline", "--lr", "find"]) == 2
    assert "only 'imgflow train' runs lr-find first" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tiny_data), "--model", "seed-baseline", "--lr", "fast"])
    assert exit_.value.code == 2 and "expected a number or 'find'" in capsys.readouterr().err
