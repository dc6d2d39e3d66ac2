"""imgflow tune: an Optuna study of training runs, scored on validation, continued after an interruption."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

import imgflow.training.loop as training_loop
from imgflow.cli import main
from imgflow.errors import UserError
from imgflow.training.config import resolve_config
from imgflow.tune import run_tune

BASE = dict(model="seed-baseline", epochs=3, batch_size=16, precision="fp32", lr=3e-3)


def _tune(data: Path, out: Path, trials: int = 5, **kwargs) -> dict:
    return run_tune(resolve_config(str(data), BASE), out, trials=trials, **kwargs)


def _outcome(record: dict) -> list[tuple]:
    return [(t["state"], t["params"], t["val_acc"], t["curve"]) for t in record["trials"]]


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tune") / "study"
    return out, _tune(tiny_data, out)


def test_a_study_records_every_trial_and_recommends_the_best(study):
    out, record = study
    assert json.loads((out / "tune.json").read_text()) == record
    assert len(record["trials"]) == 5 and record["trials_planned"] == 5
    assert set(record["search"]) == {"lr", "weight_decay", "label_smoothing", "augment"}
    for i, trial in enumerate(record["trials"]):
        assert trial["number"] == i and trial["run"] == f"trials/{i:03d}"
        assert 3e-4 <= trial["params"]["lr"] <= 3e-2 and 0 <= trial["params"]["label_smoothing"] <= 0.3
        run_config = json.loads((out / trial["run"] / "config.json").read_text())["train"]
        assert {k: run_config[k] for k in trial["params"]} == trial["params"]  # trained as recorded
        assert run_config["seed"] == 0 and run_config["epochs"] == 3  # only the searched values differ
    complete = [t for t in record["trials"] if t["state"] == "complete"]
    assert record["best"]["val_acc"] == max(t["val_acc"] for t in complete)
    assert (out / "report.html").is_file() and (out / "plots" / "tune_scores.png").is_file()


def test_the_first_trial_is_the_base_configuration_when_the_space_holds_it(study, tiny_data, tmp_path):
    assert not any(t["base"] for t in study[1]["trials"])  # weight decay 0 is off the log scale
    base = resolve_config(str(tiny_data), {**BASE, "weight_decay": 5e-4, "label_smoothing": 0.1,
                                           "augment": "flip"})
    record = run_tune(base, tmp_path / "study", trials=1, search="lr,weight-decay,label-smoothing,augment")
    first = record["trials"][0]
    assert first["base"] and first["params"] == {"lr": 3e-3, "weight_decay": 5e-4, "label_smoothing": 0.1,
                                                 "augment": "flip"}


def test_the_printed_command_trains_the_best_trial_again(study, tmp_path):
    out, record = study
    best = record["best"]
    argv = shlex.split(best["command"])[1:] + ["--out", str(tmp_path / "again")]
    assert argv[0] == "train" and main(["-q", *argv]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())["result"]["final_val_accuracy"]
    assert again == best["val_acc"]


def test_an_interrupted_study_continues_to_the_same_trials(study, tiny_data, tmp_path, monkeypatch):
    _, uninterrupted = study
    real_train = training_loop.train
    interrupted = []

    def train_cut_short(config, run_dir, *args, on_epoch=None, **kwargs):
        def stop_in_trial_3(row):
            on_epoch(row)
            if Path(run_dir).name == "002" and row["epoch"] == 2 and not interrupted:
                interrupted.append(row["epoch"])
                raise KeyboardInterrupt("Ctrl-C")
        return real_train(config, run_dir, *args, on_epoch=stop_in_trial_3, **kwargs)

    monkeypatch.setattr(training_loop, "train", train_cut_short)
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt, match="run the same 'imgflow tune' command"):
        _tune(tiny_data, out)
    assert interrupted and len(json.loads((out / "tune.json").read_text())["trials"]) == 2
    resumed = _tune(tiny_data, out)
    assert _outcome(resumed) == _outcome(uninterrupted)


def test_more_trials_extend_a_study(study, tiny_data, tmp_path):
    import shutil

    out = Path(shutil.copytree(study[0], tmp_path / "study"))
    extended = _tune(tiny_data, out, trials=6)
    assert _outcome(extended)[:5] == _outcome(study[1]) and len(extended["trials"]) == 6


@pytest.mark.parametrize("argv, message", [
    (["--val-split", "0"], "--val-split is 0"),
    (["--search", "lr,colour"], "cannot search colour"),
    (["--trials", "0"], "expected a positive integer"),
    (["--budget-minutes", "nan"], "--budget-minutes must be a number > 0"),
    (["--model", "nope"], "nope"),
])
def test_bad_options_are_one_line_and_exit_2(tiny_data, tmp_path, capsys, argv, message):
    out = tmp_path / "study"
    full = ["tune", str(tiny_data), "--model", "seed-baseline", "--epochs", "1", "--out", str(out), *argv]
    try:
        code = main(full)
    except SystemExit as exc:  # argparse's own checks exit from inside main
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_a_study_of_other_settings_or_a_training_run_is_not_continued(study, tiny_data, tiny_run, capsys):
    out, _ = study
    before = (out / "tune.json").read_text()
    with pytest.raises(UserError, match="holds a study of other settings"):
        run_tune(resolve_config(str(tiny_data), {**BASE, "lr": 1e-3}), out, trials=5)
    run_files = sorted(p.name for p in tiny_run.iterdir())
    with pytest.raises(UserError, match="holds something other than an imgflow study"):
        run_tune(resolve_config(str(tiny_data), BASE), tiny_run, trials=1)
    assert (out / "tune.json").read_text() == before
    assert sorted(p.name for p in tiny_run.iterdir()) == run_files  # no lock file left in the run


def test_a_damaged_tune_json_is_one_line(tiny_data, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "tune.json").write_text("[]")
    assert main(["tune", str(tiny_data), "--model", "seed-baseline", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"imgflow: error: {out / 'tune.json'} is not a valid imgflow tune record: the file is a list, "
                   "expected an object; restore it, or choose another --out")


def test_the_search_never_leaves_the_range_training_accepts():
    from imgflow.training.config import MAX_LR, MAX_WEIGHT_DECAY
    from imgflow.tune import search_space

    space = search_space(resolve_config("cifar10", {"model": "seed-baseline", "lr": 50.0, "weight_decay": 0.5}))
    assert space["lr"].high == MAX_LR and space["weight_decay"].high == MAX_WEIGHT_DECAY


def test_the_printed_train_command_parses_back_to_the_same_config(tiny_data):
    """Every flag it prints is one `imgflow train` knows, and every value reads back unchanged."""
    import shlex

    from imgflow.cli.arguments import config_from_args
    from imgflow.cli.parser import build_parser
    from imgflow.tune import train_command

    config = resolve_config(str(tiny_data), {"model": "fast-small", "lr": 0.123456789, "weight_decay": 1.33e-3,
                                             "bn_lr_scale": 64.0, "image_size": (24, 32), "augment": "flip",
                                             "epochs": 3, "label_smoothing": 0.2}, preset=None)
    words = shlex.split(train_command(config))
    assert words[:2] == ["imgflow", "train"] and "--bn-lr-scale" in words and "64" in words
    again = config_from_args(build_parser().parse_args(words[1:]))
    assert again == config


def test_two_workers_share_one_study_and_never_run_a_trial_twice(tiny_data, tmp_path):
    import os
    import subprocess
    import sys

    import optuna

    out, journal = tmp_path / "study", tmp_path / "studies" / "study.log"  # its folder made as it opens
    argv = [sys.executable, "-m", "imgflow", "-q", "tune", str(tiny_data), "--out", str(out), "--trials", "6",
            "--storage", f"journal:{journal}", "--model", "seed-baseline", "--epochs", "2", "--batch-size", "16",
            "--precision", "fp32", "--lr", "3e-3", "--threads", "1"]
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    ended = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in ended]

    record = json.loads((out / "tune.json").read_text())
    runs = [t["run"] for t in record["trials"]]
    assert len(runs) == 6 and len(set(runs)) == 6
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:03d}" for i in range(6)]
    # A trial run twice would show as two trials with the same values.
    assert len({json.dumps(t["params"], sort_keys=True) for t in record["trials"]}) == 6
    assert record["storage"] == f"journal:{journal}" and (out / "report.html").is_file()
    study = optuna.load_study(study_name="imgflow-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    done = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(done) == 6
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2, "both workers ran trials"


def test_a_storage_that_is_neither_a_journal_nor_a_database_is_one_line(tiny_data, tmp_path, capsys):
    code = main(["tune", str(tiny_data), "--out", str(tmp_path / "s"), "--trials", "2", "--storage", "study.txt",
                 "--model", "seed-baseline", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--storage study.txt: give a journal file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_database_url_holds_the_study_and_an_unreachable_one_is_one_line(tiny_data, tmp_path, capsys):
    from imgflow.tune import _without_password

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    record = _tune(tiny_data, tmp_path / "study", trials=2, storage=url)
    assert (tmp_path / "shared.db").is_file() and not (tmp_path / "study" / "study.db").exists()
    assert record["storage"] == url and len(record["trials"]) == 2
    # Another directory, the same database: the study continues there (one more trial, not two).
    assert len(_tune(tiny_data, tmp_path / "elsewhere", trials=3, storage=url)["trials"]) == 3

    assert _without_password("postgresql://ann:s3cret@db.lab/imgflow") == "postgresql://ann:***@db.lab/imgflow"
    code = main(["tune", str(tiny_data), "--out", str(tmp_path / "pg"), "--trials", "2", "--model", "seed-baseline",
                 "--storage", "postgresql://ann:s3cret@127.0.0.1:1/imgflow"])
    err = capsys.readouterr().err
    assert code == 2 and "postgresql://ann:***@127.0.0.1:1/imgflow" in err and "s3cret" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_running_trial_is_continued_only_when_its_worker_is_gone():
    import os
    import socket
    import subprocess
    import sys
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from imgflow.tune import _was_interrupted

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()

    def running(started=datetime.now(), **worker):
        return SimpleNamespace(user_attrs={"worker": worker} if worker else {}, datetime_start=started)

    assert _was_interrupted(running(host=here, pid=int(gone.stdout)))
    assert _was_interrupted(running(host=here, pid=os.getpid()))  # this process: its trial was cut short
    assert _was_interrupted(running(datetime.now() - timedelta(hours=1)))  # from before workers were recorded
    assert not _was_interrupted(running())  # just asked for on another machine, its worker not yet named
    assert not _was_interrupted(running(host=here, pid=os.getppid()))  # another worker, still training
    assert not _was_interrupted(running(host=here + "-elsewhere", pid=int(gone.stdout)))


def test_a_killed_workers_trial_is_continued_by_the_next_worker(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    out, journal = tmp_path / "study", tmp_path / "study.log"
    argv = [sys.executable, "-m", "imgflow", "-q", "tune", str(tiny_data), "--out", str(out), "--trials", "2",
            "--storage", str(journal), "--model", "seed-baseline", "--epochs", "6", "--batch-size", "16",
            "--precision", "fp32", "--lr", "3e-3", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMGFLOW_CHECKPOINT_SECONDS": "0"}
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    history = out / "trials" / "000" / "history.csv"
    deadline = time.monotonic() + 120
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2) and first.poll() is None:
        assert time.monotonic() < deadline, "the first worker trained no epoch"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # no Ctrl-C handler runs: the trial stays 'running' in the study
    first.wait()
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    record = json.loads((out / "tune.json").read_text())
    assert [t["run"] for t in record["trials"]] == ["trials/000", "trials/001"]
    assert record["trials"][0]["epochs_trained"] == 6
    assert [int(row.split(",")[0]) for row in history.read_text().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]
    trials = optuna.load_study(study_name="imgflow-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["continues"] == 0 and trials[1].user_attrs["run"] == "trials/000"
