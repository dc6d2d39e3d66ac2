"""One run trained by several processes, launched by torchrun: ranks, the process group, agreement.

`torchrun --nproc_per_node N -m imgflow train ...` starts N copies of the same command and tells
each its RANK, WORLD_SIZE and LOCAL_RANK. Every rank runs the same code on the same seeded global
batches and takes its own shard of each; DistributedDataParallel averages the gradients. What
the ranks must decide together (an error in one of them, Ctrl-C, when to checkpoint) goes
through the helpers here, so that no rank waits forever in a collective the others skipped.
Only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from imgflow.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) that torchrun gave this process; (0, 1, 0) without it."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() else default

    return number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0)


def under_torchrun() -> bool:
    """True in a process that torchrun started as one of several."""
    return launched_world()[1] > 1


def refuse_under_torchrun(command: str, why: str) -> None:
    """A command that cannot share its work among torchrun's processes says so in one line."""
    if under_torchrun():
        raise UserError(f"'imgflow {command}' runs in one process ({why}): start it without torchrun; "
                        "'imgflow train', 'workflow' and 'tune' are the commands that train with several")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True for the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def shard(self, items):
        """This rank's share of a global batch: every world-th item from its rank on. The shares
        are disjoint, cover the batch, and differ in size by one at most."""
        return items[self.rank::self.world] if self.several else items

    def seed(self, seed: int) -> int:
        """A seed for this rank's own random draws (dropout): the run's seed on rank 0."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank, 0xD1]).generate_state(1, dtype=np.uint64)[0] >> 1)

    # -- agreement ------------------------------------------------------------------------------

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone (it reads or writes files); every rank gets its result, or
        raises its error (a UserError as it is; anything else as 'rank 0 failed')."""
        if not self.several:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, then it is raised
                box[0] = ("error", exc if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        raise value if isinstance(value, UserError) else RuntimeError(f"rank 0 failed: {value}")

    def everywhere(self, fn: Callable[[], T]) -> T:
        """fn() run by every rank; if it fails on any, it fails on all, with the first failing
        rank's message (rank 0 prints it), so that none goes on into a collective alone."""
        try:
            result, failure = fn(), None
        except Exception as exc:  # noqa: BLE001 - shared below, then raised
            result, failure = None, exc
        if not self.several:
            if failure is not None:
                raise failure
            return result
        said = None if failure is None else (isinstance(failure, UserError), str(failure))
        heard = [None] * self.world
        dist.all_gather_object(heard, said)
        first = next(((r, s) for r, s in enumerate(heard) if s is not None), None)
        if first is None:
            return result
        if failure is not None:
            raise failure
        rank, (user_error, message) = first
        if user_error:
            raise UserError(message if rank == 0 else f"{message} (on rank {rank})")
        raise RuntimeError(f"rank {rank} failed: {message}")

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true if it is true on any rank (Ctrl-C seen, a checkpoint due)."""
        if not self.several:
            return flags
        votes = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in votes.tolist())

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.several:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order (picklable objects; CPU tensors are fine)."""
        if not self.several:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's BatchNorm statistics (every buffer) on every rank, as DistributedDataParallel
        does before each training forward: the ranks then evaluate the same model."""
        if self.several:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


SINGLE = Ranks()


def _collective_device() -> torch.device:
    """Where small tensors for a collective live: NCCL takes GPU tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join_torchrun(device_spec: str) -> tuple[Ranks, str]:
    """Join the processes torchrun started (once per process); return this process's Ranks and
    the device spec it trains on (each process on a CUDA machine takes the GPU of its LOCAL_RANK).

    Without torchrun: (SINGLE, device_spec) and nothing else happens.
    """
    rank, world, local_rank = launched_world()
    if world <= 1:
        return SINGLE, device_spec
    ranks = Ranks(rank, world, local_rank)
    if device_spec.startswith("cuda:"):
        raise UserError(f"--device {device_spec}: under torchrun each process takes the GPU of its LOCAL_RANK "
                        "(set CUDA_VISIBLE_DEVICES to choose GPUs): pass --device cuda or auto")
    if device_spec == "mps":
        raise UserError("--device mps: several processes on one Apple GPU are not supported; train in one "
                        "process (without torchrun)")
    cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if device_spec == "cuda" and not cuda:
        from imgflow.device import no_cuda_message

        raise UserError(no_cuda_message(device_spec))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {local_rank + 1} or more processes on a machine with "
                            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node {torch.cuda.device_count()}")
        device_spec = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, **({"device_id": torch.device(device_spec)} if cuda else {}))
        atexit.register(_leave)
        _stop_with_the_launcher()
        log.debug("rank %d of %d joined (%s)", rank, world, backend)
    elif dist.get_world_size() != world:
        raise RuntimeError(f"a process group of {dist.get_world_size()} is open, torchrun says {world}")
    return ranks, device_spec


# How long a leaving rank waits for the others at the door (a dead rank never comes).
LEAVE_TIMEOUT = timedelta(seconds=10)


def _leave() -> None:
    """Leave the process group together: a gloo rank whose peer has already closed its sockets
    can abort (SIGABRT) instead of exiting with its own status, as seen once a rank that failed
    to load its data left first. A barrier first; a rank that never comes is not waited for long."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer is gone: leave anyway
        log.debug("leaving without the other ranks", exc_info=True)
    dist.destroy_process_group()


def _stop_with_the_launcher() -> None:
    """Ask Linux to send this process SIGTERM when torchrun dies (a kill -9 of the launcher): the
    run then checkpoints and stops as on Ctrl-C (the training loop takes SIGTERM as a stop
    request under torchrun), instead of training on without it. torchrun starts each worker in
    a session of its own, so a terminal's Ctrl-C reaches the launcher only, which passes it on
    (SIGINT) to every worker."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
