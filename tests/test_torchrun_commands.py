"""`imgflow tune` and `imgflow workflow` under torchrun (gloo on the CPU): rank 0 decides and
writes, every rank trains each run, and bad input ends every rank with one message, exit 2.

The ranks are started by hand with torchrun's environment (test_distributed.by_hand) where a
test needs each rank's own exit status, output or working directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen import make_image_folder
from imgflow.training.crew import lead_or_follow, together
from test_distributed import TIMEOUT, _imgflow_errors, by_hand, torchrun

TUNE = ("--model", "seed-baseline", "--epochs", "2", "--batch-size", "16", "--precision", "fp32")


@pytest.fixture(scope="module")
def workflow_data(tmp_path_factory) -> Path:
    """80 8x8 images per class, no test split (the workflow holds one out)."""
    return make_image_folder(tmp_path_factory.mktemp("wf") / "data", per_class=80, size=(8, 8), test=False)


def _rank_dirs(tmp_path: Path) -> list[Path]:
    """An empty working directory per rank: what rank 1 wrote with a relative --out would be in its own."""
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    return dirs


def _world_size(run_dir: Path) -> int:
    return json.loads((run_dir / "config.json").read_text())["world_size"]


def test_one_process_leads_alone():
    assert lead_or_follow("cpu", lambda: 5) == 5
    assert together(lambda a, b=0, c=0: a + b + c, 1, b=2, local={"c": 3}) == 6


# ---------------------------------------------------------------------------------------------
# both ranks train every run


@pytest.mark.slow
def test_tune_under_torchrun_trains_each_trial_with_both_ranks(tiny_data, tmp_path):
    """The same trials as one process: the first trials are the sampler's random ones, drawn from
    seeds alone, and each trains what one process trains (test_distributed: weights within 1e-5)."""
    from imgflow.training.config import resolve_config
    from imgflow.tune import run_tune

    rank0, rank1 = _rank_dirs(tmp_path)
    done = by_hand(["tune", str(tiny_data), "--out", "study", "--trials", "2", *TUNE], [rank0, rank1])
    assert [d.returncode for d in done] == [0, 0], done[0].stderr + done[1].stderr
    assert list(rank1.iterdir()) == [] and done[1].stdout == "" and done[1].stderr == ""  # rank 0 alone
    assert done[0].stdout.count("best: trial") == 1
    record = json.loads((rank0 / "study" / "tune.json").read_text())
    assert record["trials_planned"] == 2 and [t["state"] for t in record["trials"]] == ["complete"] * 2
    assert [_world_size(rank0 / "study" / t["run"]) for t in record["trials"]] == [2, 2]

    base = resolve_config(str(tiny_data), dict(model="seed-baseline", epochs=2, batch_size=16, precision="fp32"))
    alone = run_tune(base, tmp_path / "one-process", trials=2)
    for two, one in zip(record["trials"], alone["trials"], strict=True):
        assert two["params"] == one["params"]
        assert two["val_acc"] == pytest.approx(one["val_acc"], abs=1e-6)


@pytest.mark.slow
def test_workflow_under_torchrun_trains_each_run_with_both_ranks(workflow_data, tmp_path):
    rank0, rank1 = _rank_dirs(tmp_path)
    done = by_hand(["workflow", str(workflow_data), "--out", "wf", "--budget-minutes", "0.3", "--threads", "1"],
                   [rank0, rank1])
    assert [d.returncode for d in done] == [0, 0], done[0].stderr + done[1].stderr
    assert list(rank1.iterdir()) == [] and done[1].stdout == "" and done[1].stderr == ""
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("workflow.json")] == [Path("rank0/wf/workflow.json")]
    record = json.loads((rank0 / "wf" / "workflow.json").read_text())
    assert len(record["steps"]) == 8 and record["test_accuracy"] is not None
    runs = sorted(p.name for p in (rank0 / "wf" / "runs").iterdir())
    assert {"5-baseline", "6-overfit", "8-final"} <= set(runs)
    assert all(_world_size(rank0 / "wf" / "runs" / run) == 2 for run in runs)
    assert "2 processes on cpu" in done[0].stderr and done[0].stdout.count("\nreport: ") == 1


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_the_study_and_the_same_command_continues_it(tiny_data, tmp_path):
    out = tmp_path / "study"
    args = ["tune", str(tiny_data), "--out", str(out), "--trials", "2", *TUNE[:2], "--epochs", "40", *TUNE[4:]]
    proc = subprocess.Popen(torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint, deadline = out / "trials" / "000" / "checkpoint" / "state.pt", time.monotonic() + TIMEOUT
    while not checkpoint.is_file() and time.monotonic() < deadline:  # the first trial's first epoch
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C: torchrun passes it on to every rank
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert stderr.count("trial 1 saved a checkpoint; run the same 'imgflow tune' command") == 1, stderr
    assert not (out / "trials" / "000" / "model.safetensors").exists()

    done = subprocess.run(torchrun("-q", *args), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "tune.json").read_text())
    assert [(t["run"], t["state"], t["epochs_trained"]) for t in record["trials"]] == \
        [("trials/000", "complete", 40), ("trials/001", "complete", 40)]


# The crew on its own: rank 0's on_epoch stops every rank at that epoch; a call that failed on
# every rank is rank 0's to handle, and the next call trains with all of them again; a call that
# failed on rank 1 alone fails on rank 0 too, naming the rank.
CREW = """
import os, sys
from pathlib import Path
from imgflow.errors import UserError
from imgflow.training.config import resolve_config
from imgflow.training.crew import lead_or_follow, together
from imgflow.training.loop import train

class Stop(Exception):
    pass

def stop(row):
    raise Stop(f"stopped after epoch {row['epoch']}")

def only_on_rank_0():
    if os.environ["RANK"] != "0":
        raise UserError("cannot read the data here")

def lead():
    config = resolve_config(sys.argv[1], dict(model="seed-baseline", epochs=3, batch_size=16, precision="fp32"))
    try:
        together(train, config, Path(sys.argv[2]) / "a", local={"on_epoch": stop})
    except Stop as exc:
        said = str(exc)
    together(train, config, Path(sys.argv[2]) / "b")
    try:
        together(only_on_rank_0)
    except UserError as exc:
        said += f"; {exc}"
    return said

said = lead_or_follow("cpu", lead)
Path(sys.argv[3], "rank-" + os.environ["RANK"]).write_text(said)  # what each rank returned
"""


def test_rank_0s_stop_stops_every_rank_and_the_next_run_trains_with_all(tiny_data, tmp_path):
    script = tmp_path / "crew.py"
    script.write_text(CREW)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tiny_data), str(tmp_path / "runs"), str(tmp_path / "said")]
    (tmp_path / "said").mkdir()
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    said = {p.name: p.read_text() for p in (tmp_path / "said").iterdir()}
    assert said == {f"rank-{r}": "stopped after epoch 1; cannot read the data here (on rank 1)" for r in (0, 1)}
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert (a / "checkpoint").is_dir() and not (a / "model.safetensors").exists()  # stopped, resumable
    assert len((a / "history.csv").read_text().splitlines()) == 2  # a header and epoch 1
    assert (b / "model.safetensors").is_file() and _world_size(b) == 2


# ---------------------------------------------------------------------------------------------
# bad input: one message, exit 2 on every rank, within seconds


BAD_INPUT = [
    # refused by rank 0 before the study exists; the other rank hears of it
    (["tune", "DATA", "--out", "OUT", "--trials", "2", *TUNE, "--val-split", "0"], "--val-split is 0"),
    # found by every rank while setting up the first trial
    (["tune", "DATA", "--out", "OUT", "--trials", "2", *TUNE[:4], "--batch-size", "3"], "too small for 2 processes"),
    # refused by every rank before they meet
    (["tune", "DATA", "--out", "OUT", "--trials", "2", *TUNE, "--device", "cuda:1"], "GPU of its LOCAL_RANK"),
    (["workflow", "no-such-data", "--out", "OUT", "--budget-minutes", "0.3"], "no-such-data"),
    (["workflow", "DATA", "--out", "OUT", "--budget-minutes", "0"], "--budget-minutes"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_one_message_and_exit_2_on_every_rank(tiny_data, tmp_path, args, message):
    rank0, rank1 = _rank_dirs(tmp_path)
    args = [str(tiny_data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    started = time.monotonic()
    done = by_hand(args, [rank0, rank1])
    assert [d.returncode for d in done] == [2, 2], done[0].stderr + done[1].stderr
    errors = _imgflow_errors(done[0].stderr)
    assert len(errors) == 1 and message in errors[0], done[0].stderr
    assert done[1].stderr == "" and done[1].stdout == ""
    assert time.monotonic() - started < 60
