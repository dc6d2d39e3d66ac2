"""Training with several processes (torchrun, gloo on the CPU): the same run as one process, rank 0
alone writes, exact resume, and failures that end every rank with one message instead of a hang.

The processes are real: `python -m torch.distributed.run` (torchrun), or two `python -m imgflow`
started by hand with torchrun's environment where a test needs each rank's own exit status,
output or working directory. Each run is a few seconds of tiny data.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny
from imgflow.cli import main
from imgflow.training.batches import steps_per_epoch
from imgflow.training.distributed import SINGLE, Ranks

TIMEOUT = 120  # seconds: a hang fails the test instead of the suite
RUN = ("--model", "seed-baseline", "--epochs", "2", "--batch-size", "16", "--precision", "fp32")
# BatchNorm (per rank), dropout (per-rank RNG) and augmentation: what exact resume must carry.
RESUMED = ("--model", "seed-batchnorm", "--epochs", "3", "--batch-size", "8", "--precision", "fp32",
           "--augment", "flip+translate")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "imgflow", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand(args: list[str], cwds: list[Path], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """`python -m imgflow ARGS` as ranks 0..N-1 of one run, each in its own working directory,
    with the environment torchrun would give them; their exit statuses and output."""
    port, world = _free_port(), len(cwds)
    procs = []
    for rank, cwd in enumerate(cwds):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "imgflow", *args], cwd=cwd, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds" and v != ""} for row in csv.DictReader(f)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _imgflow_errors(stderr: str) -> list[str]:
    """imgflow's error lines (torchrun's own report of the failed ranks follows them)."""
    return [line for line in stderr.splitlines() if line.startswith("imgflow") and " error: " in line]


# ---------------------------------------------------------------------------------------------
# the pieces


def test_shards_are_disjoint_cover_the_batch_and_differ_by_one_at_most():
    batch = torch.arange(11)
    shards = [Ranks(r, 3).shard(batch) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))
    assert {len(s) for s in shards} == {3, 4}
    assert SINGLE.shard(batch) is batch


def test_an_epoch_drops_a_last_batch_too_small_to_share():
    assert steps_per_epoch(100, 16) == 7 and steps_per_epoch(97, 16) == 6  # one process: a batch of 1 goes
    assert steps_per_epoch(100, 16, world=2) == 7  # last batch 4: 2 images each
    assert steps_per_epoch(99, 16, world=2) == 6  # last batch 3: a rank would get 1
    assert steps_per_epoch(96, 16, world=4) == 6


def test_each_rank_draws_its_own_dropout_and_rank_0_the_runs():
    seeds = [Ranks(r, 4).seed(7) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_one_process_agrees_with_itself_without_a_process_group():
    assert SINGLE.any(True, False) == (True, False)
    assert SINGLE.sum([1.5, 2.0]) == [1.5, 2.0]
    assert SINGLE.gather("x") == ["x"]
    assert SINGLE.on_main(lambda: 3) == 3 and SINGLE.everywhere(lambda: 4) == 4


# ---------------------------------------------------------------------------------------------
# two processes train the run one process trains


@pytest.mark.slow
def test_two_processes_train_what_one_does_with_the_same_global_batch(tiny_data, tmp_path):
    """A model without BatchNorm, global batch 16 = 2 x 8: the weights agree to float rounding.

    Not bit for bit: gloo sums the two ranks' gradients, one process sums over the batch in
    another order; 12 Adam steps of seed-baseline end within 1e-6 here, asserted at 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_tiny(tiny_data, one, epochs=2, threads=1)
    done = subprocess.run(torchrun("-q", "train", str(tiny_data), *RUN, "--out", str(two)),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run directory:") == 1  # rank 0 alone prints
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    for row_one, row_two in zip(_history(one), _history(two), strict=True):
        assert row_two == pytest.approx(row_one, rel=1e-5, abs=1e-6)  # validation: the same numbers
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2 and config["device"]["device"] == "cpu"
    assert config["steps_per_epoch"] == json.loads((one / "config.json").read_text())["steps_per_epoch"]


# Runs `imgflow ARGS` as a rank would, then writes a digest of the weights this rank's model ends
# with: rank 1 writes no file of the run, so its weights are seen only this way.
RANK_DIGEST = """
import hashlib, os, sys
import imgflow.training.loop as loop
from imgflow.cli import main

runs = []
set_up = loop.set_up
loop.set_up = lambda *args, **kwargs: runs.append(set_up(*args, **kwargs)) or runs[-1]
code = main(sys.argv[1:])
state = runs[-1].learner.model.state_dict()
digest = hashlib.sha256()
for name in sorted(state):
    digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
with open(os.path.join(os.environ["DIGESTS"], "rank-" + os.environ["RANK"]), "w") as f:
    f.write(digest.hexdigest())
sys.exit(code)
"""


def _digest(weights: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_both_ranks_end_with_the_weights_rank_0_saved(tiny_data, tmp_path):
    script, digests = tmp_path / "rank_digest.py", tmp_path / "digests"
    script.write_text(RANK_DIGEST)
    digests.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "-q", "train", str(tiny_data), *RUN, "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "DIGESTS": str(digests), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    ranks = {p.name: p.read_text() for p in digests.iterdir()}
    assert sorted(ranks) == ["rank-0", "rank-1"]
    # Bit for bit: every step applies the same all-reduced gradients to the same weights.
    assert ranks["rank-0"] == ranks["rank-1"] == _digest(_weights(tmp_path / "run"))


@pytest.mark.slow
def test_only_rank_0_writes(tiny_data, tmp_path):
    """Rank 1 runs in an empty directory with a relative --out: anything it wrote would be there."""
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    rank0.mkdir(), rank1.mkdir()
    done = by_hand(["train", str(tiny_data), *RUN, "--out", "run"], [rank0, rank1])
    assert [d.returncode for d in done] == [0, 0], done[0].stderr + done[1].stderr
    assert list(rank1.iterdir()) == []
    assert done[1].stdout == "" and done[1].stderr == ""  # rank 1 says nothing
    assert {p.name for p in (rank0 / "run").iterdir()} == {"config.json", "history.csv", "model.safetensors",
                                                           "checkpoint"}
    assert "epoch 2/2" in done[0].stderr


# ---------------------------------------------------------------------------------------------
# failures: one message, exit 2 on every rank, never a hang


BAD_INPUT = [
    (["--epochs", "0"], "argument --epochs: expected a positive integer"),  # argparse, before any rank meets
    (["--lr", "1e9"], "--lr must be > 0"),  # the config's checks, before the process group opens
    (["--sync-bn"], "--sync-bn needs CUDA"),  # found while setting up, with the process group open
    (["--batch-size", "3"], "too small for 2 processes"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_one_message_and_exit_2_on_every_rank(tiny_data, tmp_path, args, message):
    """Started by hand as torchrun would, each rank's own exit status is seen (torchrun itself
    stops the other ranks as soon as one has failed, so its report may show them killed)."""
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    rank0.mkdir(), rank1.mkdir()
    started = time.monotonic()
    done = by_hand(["train", str(tiny_data), *RUN, "--out", str(tmp_path / "run"), *args], [rank0, rank1])
    assert [d.returncode for d in done] == [2, 2]
    errors = _imgflow_errors(done[0].stderr)
    assert len(errors) == 1 and message in errors[0], done[0].stderr
    assert done[1].stderr == "" and done[1].stdout == ""
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("args, message", [BAD_INPUT[0], BAD_INPUT[2]])
def test_bad_input_under_torchrun_ends_at_once_with_one_message(tiny_data, tmp_path, args, message):
    started = time.monotonic()
    done = subprocess.run(torchrun("train", str(tiny_data), *RUN, "--out", str(tmp_path / "run"), *args),
                          capture_output=True, text=True, timeout=TIMEOUT)
    errors = _imgflow_errors(done.stderr)
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert done.returncode == 1 and "exitcode  : 2" in done.stderr  # torchrun's report of the ranks
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60


def test_missing_data_under_torchrun_is_one_message(tmp_path):
    done = subprocess.run(torchrun("train", str(tmp_path / "no-such-data"), *RUN, "--out", str(tmp_path / "run")),
                          capture_output=True, text=True, timeout=TIMEOUT)
    errors = _imgflow_errors(done.stderr)
    assert len(errors) == 1 and "no-such-data" in errors[0], done.stderr
    assert "exitcode  : 2" in done.stderr


def test_data_that_only_rank_1_cannot_read_stops_both_naming_the_rank(tiny_data, tmp_path):
    """A relative DATA path that exists for rank 0 only: rank 1 fails while loading, rank 0 would
    have gone on to train alone and waited forever for it."""
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    rank0.mkdir(), rank1.mkdir()
    shutil.copytree(tiny_data, rank0 / "data")
    done = by_hand(["train", "data", *RUN, "--out", str(tmp_path / "run")], [rank0, rank1])
    assert [d.returncode for d in done] == [2, 2]
    errors = _imgflow_errors(done[0].stderr)
    assert len(errors) == 1 and "(on rank 1)" in errors[0] and "data" in errors[0], done[0].stderr
    assert done[1].stderr == ""
    assert not (tmp_path / "run").exists()


def test_commands_that_run_in_one_process_refuse_torchrun(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for command in (["evaluate", str(tiny_run)], ["predict", str(tiny_run), "x.png"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "start it without torchrun" in err, err
    monkeypatch.setenv("RANK", "1")  # the other ranks exit alike, silently
    assert main(["evaluate", str(tiny_run)]) == 2
    assert capsys.readouterr().err == ""


def test_sync_bn_needs_cuda_in_one_process_too(tiny_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", str(tiny_data), *RUN, "--sync-bn", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sync-bn needs CUDA" in err
    from imgflow.training.config import TrainConfig, command_line_options

    assert command_line_options({"sync_bn": True, "epochs": 3}) == ["--sync-bn", "--epochs", "3"]
    assert TrainConfig.from_dict({"data": "d", "model": "m", "sync_bn": True}).sync_bn is True


# ---------------------------------------------------------------------------------------------
# exact resume with two processes


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "reference"
    done = subprocess.run(torchrun("-q", "train", str(tiny_data), *RESUMED, "--out", str(run_dir)),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return run_dir


def _interrupted_mid_epoch(tiny_data, run_dir: Path, stop) -> subprocess.Popen:
    """Start the 2-process run, wait for a mid-epoch checkpoint after the first epoch, stop(launcher)."""
    env = {**os.environ, "IMGFLOW_CHECKPOINT_SECONDS": "0"}  # a checkpoint after every step
    proc = subprocess.Popen(torchrun("train", str(tiny_data), *RESUMED, "--out", str(run_dir)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint, deadline = run_dir / "checkpoint" / "state.pt", time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training finished before it could be interrupted"
        try:
            state = torch.load(checkpoint, weights_only=True)
        except Exception:  # noqa: BLE001 - not there yet
            state = None
        if state and state["epoch"] >= 1 and 0 < state["step"]:
            stop(proc)
            return proc
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


def _workers_of(run_dir: Path) -> list[int]:
    """Processes still training into run_dir (torchrun's workers outlive a killed launcher
    unless they stop by themselves)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir) in (proc / "cmdline").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _history(run_dir) == _history(reference)
    a, b = _weights(run_dir), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_and_the_resume_is_exact(tiny_data, tmp_path, uninterrupted, caplog):
    run_dir = tmp_path / "run"
    proc = _interrupted_mid_epoch(tiny_data, run_dir, lambda p: p.send_signal(signal.SIGINT))  # a terminal's Ctrl-C
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert stderr.count("checkpoint saved; continue with --resume") == 1, stderr
    assert not (run_dir / "model.safetensors").exists()
    one_process = tmp_path / "one-process"
    shutil.copytree(run_dir, one_process)

    done = subprocess.run(torchrun("-q", "train", "--resume", "--out", str(run_dir)), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    _assert_same_run(run_dir, uninterrupted)

    # Resumed by one process instead: allowed, with a warning saying what is not the same.
    with caplog.at_level("WARNING"):
        train_tiny(tiny_data, one_process, resume=True, model="seed-batchnorm", epochs=3, batch_size=8,
                   augment="flip+translate")
    assert "was trained by 2 processes: continuing with 1" in caplog.text
    assert (one_process / "model.safetensors").is_file()


@pytest.mark.slow
def test_kill_9_of_torchrun_stops_its_workers_and_the_resume_is_exact(tiny_data, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _interrupted_mid_epoch(tiny_data, run_dir, lambda p: p.kill())
    proc.communicate(timeout=TIMEOUT)
    deadline = time.monotonic() + 60
    while _workers_of(run_dir) and time.monotonic() < deadline:  # they checkpoint and stop on their own
        time.sleep(0.2)
    assert not _workers_of(run_dir), "the workers trained on without their launcher"
    assert not (run_dir / "model.safetensors").exists()
    done = subprocess.run(torchrun("-q", "train", "--resume", "--out", str(run_dir)), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    _assert_same_run(run_dir, uninterrupted)
