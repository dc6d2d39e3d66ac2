"""A DATA path that does not exist: `train` and `tune` name it and say what to give, and leave
nothing behind; a run whose recorded data has moved since says that instead (issue 23)."""
from __future__ import annotations

import json
import shutil

import pytest

from imgflow.cli import main
from imgflow.errors import UserError
from imgflow.runs import load_run_data

TRAIN = ["--model", "seed-baseline", "--epochs", "1", "--batch-size", "16", "--precision", "fp32"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_missing_absolute_data_path_is_named_and_leaves_nothing(tmp_path, capsys, command):
    missing, out = tmp_path / "no-such-data", tmp_path / "out"
    code, err = _cli(capsys, command, str(missing), *TRAIN, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"no data set '{missing}'" in err and "cifar10" in err  # the path, and what DATA may be
    assert "is gone" not in err and "config.json" not in err  # no run recorded it: it was never there
    assert not out.exists()


def test_the_corrected_tune_command_runs_where_the_mistyped_one_failed(tiny_data, tmp_path, capsys):
    out = tmp_path / "study"
    typo = tiny_data.parent / "dta"
    code, err = _cli(capsys, "tune", str(typo), *TRAIN, "--trials", "1", "--out", str(out))
    assert code == 2 and str(typo) in err
    assert not out.exists()  # no study of the mistyped DATA to refuse the corrected command
    assert main(["-q", "tune", str(tiny_data), *TRAIN, "--trials", "1", "--out", str(out)]) == 0
    record = json.loads((out / "tune.json").read_text())
    assert record["base"]["data"] == str(tiny_data) and record["trials"][0]["state"] == "complete"


def test_only_a_runs_recorded_data_is_gone(tmp_path):
    moved = str(tmp_path / "moved-away")
    with pytest.raises(UserError) as new_run:
        load_run_data({"data": moved})
    assert moved in str(new_run.value) and "is gone" not in str(new_run.value)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as recorded:
        load_run_data({"data": moved}, run_dir=run_dir)
    message = str(recorded.value)
    assert "is gone" in message and moved in message and str(run_dir / "config.json") in message


def test_evaluating_a_run_whose_data_moved_says_it_is_gone(tiny_run, tiny_data, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    data.rename(tmp_path / "elsewhere")
    code, err = _cli(capsys, "evaluate", str(run))
    assert code == 2 and "is gone" in err and str(data) in err and err.count("\n") == 1
    assert str(run / "config.json") in err  # which run recorded it


def test_resuming_a_run_whose_data_moved_says_it_is_gone(tiny_data, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    code, _ = _cli(capsys, "train", str(data), "--model", "seed-baseline", "--epochs", "1", "--out", str(run))
    assert code == 0
    data.rename(tmp_path / "elsewhere")
    code, err = _cli(capsys, "train", "--resume", "--out", str(run))
    assert code == 2 and "is gone" in err and str(data) in err and str(run / "config.json") in err
