"""Command-line arguments every command shares: paths."""
from __future__ import annotations

import pytest

from imgflow.cli import main
from imgflow.data import load_dataset
from imgflow.errors import UserError


@pytest.mark.parametrize("argv", [
    ["inspect", ""],
    ["inspect", "DATA", "--out", ""],
    ["train", "", "--model", "seed-baseline"],
    ["train", "DATA", "--model", "seed-baseline", "--out", ""],
    ["train", "--resume", "--out", ""],
    ["evaluate", ""],
    ["report", ""],
    ["report", "RUN", "RUN", "--out", ""],
    ["predict", "", "x.png"],
    ["predict", "RUN", ""],
    ["predict", "--onnx", "", "x.png"],
    ["export", ""],
    ["export", "RUN", "--out", ""],
    ["reproduce-seed", ""],
    ["reproduce-seed", "DATA", "--out", ""],
    ["workflow", ""],
    ["workflow", "DATA", "--out", ""],
    ["tune", "", "--out", "OUT", "--model", "seed-baseline"],
    ["tune", "DATA", "--out", "", "--model", "seed-baseline"],
])
def test_an_empty_path_is_refused_not_taken_as_the_current_directory(argv, tmp_path, monkeypatch, capsys):
    """'' would mean '.': a run written into the working directory, or it read as a data set."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "empty path: give a path (use . for the current directory)" in err
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_refuses_an_empty_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="empty DATA"):
        load_dataset("", progress=False)
