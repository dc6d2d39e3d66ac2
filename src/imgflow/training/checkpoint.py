"""The checkpoint: everything a run needs to continue bit for bit (DEVELOPERS.md, exact resume).

Its tensors are saved on the CPU and loaded there, so a run started on a GPU resumes on a CPU and
back; the learner moves them to its device.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgflow.errors import UserError
from imgflow.fileio import atomic_write
from imgflow.training.step import Learner


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = on_cpu(payload)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def on_cpu(value):
    """`value` with every tensor in it (in dicts, lists, tuples) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


_CHECKPOINT_KEYS = ("model", "optimizer", "rng", "history", "epoch", "step", "global_step", "sums",
                    "best", "elapsed")


def unreadable_checkpoint(path: Path, detail: str) -> UserError:
    return UserError(f"checkpoint {path} is unreadable ({detail}): delete {Path(path).parent} to start "
                     "the run over, or train again with --overwrite")


def load_checkpoint(path: Path) -> dict:
    # weights_only: the restricted unpickler, tensors and plain containers only. PyTorch's own
    # message on failure spans lines and suggests weights_only=False, which would run any code
    # the file holds: never pass it on.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol ..." on foreign pickles
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt or foreign file
        raise unreadable_checkpoint(path, f"truncated, corrupt or not an imgflow checkpoint: "
                                          f"{type(exc).__name__}") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else ["all"]
    if missing or not isinstance(checkpoint["epoch"], int):
        raise unreadable_checkpoint(path, f"not an imgflow checkpoint: missing {', '.join(missing) or 'epoch'}")
    return checkpoint


def new_sums() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def no_best() -> dict:
    return {"val_loss": math.inf, "epoch": None, "state": None, "bad_epochs": 0}


@dataclass
class LoopState:
    """Where the loop is and what it has measured: the checkpoint carries all of it."""

    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    global_step: int = 0  # steps finished in the run: what the lr schedule reads
    sums: dict = field(default_factory=new_sums)  # running loss, accuracy and seconds of this epoch
    best: dict = field(default_factory=no_best)  # early stopping: best val_loss, its epoch and weights
    elapsed: float = 0.0  # seconds trained by the processes before this one


def rng_state(device: torch.device) -> dict:
    """The random number generators that dropout draws from: the CPU's, and the GPU's on CUDA."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Put back what `rng_state` saved. A GPU's generator is restored on a GPU only: resumed
    elsewhere, dropout draws from that device's own generator (not bit for bit, as warned)."""
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save_training_state(path: Path, learner: Learner, loop: LoopState, seconds_here: float,
                        rng_ranks: list[dict] | None = None) -> None:
    """Checkpoint the learner and the loop (seconds_here: trained by this process so far).

    rng_ranks: with several ranks, each rank's `rng_state` in rank order (dropout draws differ
    per rank). The rest is the same on every rank (weights and optimiser: kept equal by
    DistributedDataParallel; loop sums: pooled each step) or only rank 0's matters (BatchNorm
    statistics: rank 0's go to every rank before each forward), so rank 0 saves it alone.
    """
    save_checkpoint(path, {**learner.state_dict(), **rng_state(learner.device),
                           "rng_ranks": rng_ranks, "world_size": learner.ranks.world,
                           "history": loop.history, "epoch": loop.epoch, "step": loop.step,
                           "global_step": loop.global_step, "sums": loop.sums, "best": loop.best,
                           "elapsed": loop.elapsed + seconds_here})


def restore_checkpoint(checkpoint: dict, learner: Learner) -> LoopState:
    """Load a checkpoint into the learner and this rank's RNG; return the loop state it holds.

    A rank the checkpoint has no RNG state for (a run resumed with more processes) starts a
    generator of its own from the seed and the step."""
    learner.load_state_dict(checkpoint)
    ranks, saved = learner.ranks, checkpoint.get("rng_ranks") or [checkpoint]
    if ranks.rank < len(saved):
        restore_rng_state(saved[ranks.rank], learner.device)
    else:
        torch.manual_seed(ranks.seed(learner.config.seed) ^ checkpoint["global_step"])
    return LoopState(history=checkpoint["history"], epoch=checkpoint["epoch"], step=checkpoint["step"],
                     global_step=checkpoint["global_step"], sums=checkpoint["sums"], best=checkpoint["best"],
                     elapsed=checkpoint["elapsed"])
