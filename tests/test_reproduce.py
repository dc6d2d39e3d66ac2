"""`imgflow reproduce-seed`: both notebook models, the table, the side-by-side report, reuse of finished runs."""
from __future__ import annotations

import json

import pytest

from datagen import make_image_folder
from imgflow.cli import main


def test_reproduce_seed_trains_both_models_and_writes_the_table(tiny_data, tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["-q", "reproduce-seed", str(tiny_data), "--out", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "reproduce.json").read_text())
    assert [r["model"] for r in rows] == ["seed-baseline", "seed-batchnorm"]
    assert [r["params"] for r in rows] == [
        json.loads((out / m / "config.json").read_text())["model"]["params"] for m in ("seed-baseline", "seed-batchnorm")]
    for r in rows:
        metrics = json.loads((out / r["model"] / "metrics.json").read_text())
        assert r["test_accuracy"] == metrics["accuracy"] and r["epochs"] == 1
        assert f"{r['test_accuracy']:.4f}" in printed
    # BatchNorm statistics re-estimated: an extra column for seed-batchnorm only, and its run stays
    # as Keras trains it (the column is computed on a copy of the weights in memory).
    assert rows[0]["test_accuracy_precise_bn"] is None and 0 <= rows[1]["test_accuracy_precise_bn"] <= 1
    assert f"{rows[1]['test_accuracy_precise_bn']:.4f} |" in printed
    assert json.loads((out / "seed-batchnorm" / "config.json").read_text())["result"]["precise_bn"] is None
    # The notebook's CIFAR-10 numbers stand beside ours only on CIFAR-10.
    assert "| 0.6800 |" not in printed and all(r["notebook_test_accuracy"] is None for r in rows)
    assert (out / "reproduce.md").read_text().strip() in printed
    assert (out / "compare" / "comparison.html").is_file()

    # A second call reuses the finished runs: weights and metrics are untouched.
    files = [out / m / f for m in ("seed-baseline", "seed-batchnorm") for f in ("model.safetensors", "metrics.json")]
    before = [f.read_bytes() for f in files]
    assert main(["-q", "reproduce-seed", str(tiny_data), "--out", str(out), "--epochs", "1",
                 "--precise-bn", "0"]) == 0
    assert [f.read_bytes() for f in files] == before
    assert json.loads((out / "reproduce.json").read_text())[1]["test_accuracy_precise_bn"] is None
    capsys.readouterr()

    # Other settings are not reported under finished runs of the first ones.
    table = (out / "reproduce.md").read_text()
    for other in (["--epochs", "2"], ["--epochs", "1", "--seed", "5"]):
        assert main(["-q", "reproduce-seed", str(tiny_data), "--out", str(out), *other]) == 2
        err = capsys.readouterr().err.strip()
        assert "use another --out" in err and len(err.splitlines()) == 1
    assert (out / "reproduce.md").read_text() == table


def test_seconds_per_epoch_is_the_median_so_a_paused_epoch_does_not_count(tiny_data, tmp_path):
    from imgflow.reproduce import reproduce_seed
    from imgflow.history import read_history, write_history

    out = tmp_path / "repro"
    reproduce_seed(str(tiny_data), out, epochs=3, models=("seed-baseline",), progress=False)
    history_path = out / "seed-baseline" / "history.csv"
    history = read_history(history_path)
    for row, seconds in zip(history, [1.0, 500.0, 2.0]):  # epoch 2 waited out a pause
        row["seconds"] = seconds
    write_history(history_path, history)
    table = reproduce_seed(str(tiny_data), out, epochs=3, models=("seed-baseline",), progress=False)
    assert json.loads((out / "reproduce.json").read_text())[0]["seconds_per_epoch"] == 2.0
    assert "| 2.0 |" in table


@pytest.mark.parametrize("models, message", [(["seed-baseline", "seed-baseline"], "more than once"),
                                             (["seed-baseline", "nope"], "unknown model 'nope'")])
def test_a_bad_model_list_is_refused_before_anything_trains_or_is_written(tiny_data, tmp_path, capsys,
                                                                          models, message):
    out = tmp_path / "repro"
    assert main(["-q", "reproduce-seed", str(tiny_data), "--out", str(out), "--epochs", "1",
                 "--models", *models]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_data_without_a_test_split_is_refused_before_training_or_held_out(tmp_path, capsys):
    data = make_image_folder(tmp_path / "flat", per_class=20, size=(8, 8), flat=True, test=False)
    out = tmp_path / "repro"
    argv = ["-q", "reproduce-seed", str(data), "--out", str(out), "--epochs", "1", "--models", "seed-baseline"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no test split" in err and "--test-split 0.2" in err and len(err.splitlines()) == 1
    assert not out.exists()
    # The advice works: reproduce-seed takes --test-split.
    assert main([*argv, "--test-split", "0.2", "--precise-bn", "0"]) == 0
    assert json.loads((out / "seed-baseline" / "metrics.json").read_text())["num_images"] == 12


@pytest.mark.parametrize("content, detail", [("[]", "the file is a list, expected an object"),
                                             ('{"train": 3}', "'train' is a number (3), expected an object")])
def test_a_damaged_run_config_in_out_is_one_line(tiny_data, tmp_path, capsys, content, detail):
    run_dir = tmp_path / "repro" / "seed-baseline"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(content)
    assert main(["-q", "reproduce-seed", str(tiny_data), "--out", str(tmp_path / "repro"), "--epochs", "1",
                 "--models", "seed-baseline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"imgflow: error: {run_dir / 'config.json'} is not a valid imgflow run config: {detail};")
    assert (run_dir / "config.json").read_text() == content
