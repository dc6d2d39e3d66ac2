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


def test_train_help_shows_the_defaults_a_run_gets_without_a_preset(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_.value.code == 0
    for shown in ("full passes over the training part (default: 20)", "(default: 0.001)",
                  "(default: adam)", "validation fraction in [0, 1) (default: 0.2)", "(default: 128)"):
        assert shown in out, shown
    assert "default: None" not in out


def test_every_train_option_is_a_config_field_and_parses_back():
    """The option table drives the parser and `tune`'s printed commands: both must agree."""
    from imgflow.cli.arguments import overrides_from_args
    from imgflow.cli.parser import build_parser
    from imgflow.training.config import command_line_options

    values = {"epochs": 3, "lr": 0.05, "augment": "flip+translate", "image_size": (24, 32), "ema": 0.0,
              "threads": None, "folds": 3, "fold": 1}
    words = command_line_options(values)
    assert "--ema" not in words and "--threads" not in words  # the defaults are left out
    args = build_parser().parse_args(["train", "DATA", *words])
    given = {k: v for k, v in overrides_from_args(args).items() if v is not None}
    assert given == {"epochs": 3, "lr": 0.05, "augment": "flip+translate", "image_size": (24, 32),
                     "folds": 3, "fold": 1}
    with pytest.raises(ValueError, match="eval_batch_size"):
        command_line_options({"eval_batch_size": 100})


def test_inspect_without_out_writes_its_grid_into_a_named_folder_and_says_where(tiny_data, tmp_path,
                                                                              monkeypatch, capsys, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        assert main(["inspect", str(tiny_data)]) == 0
    grids = list(tmp_path.rglob("examples.png"))
    assert len(grids) == 1 and grids[0].parent.parent == tmp_path / "runs" / "inspect"
    assert str(grids[0].parent) in caplog.text or "examples.png" in capsys.readouterr().out
