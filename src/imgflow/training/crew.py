"""Commands that start several training runs (`workflow`, `tune`) under torchrun: rank 0 leads,
the other ranks follow, and every run is trained by all of them.

Rank 0 runs the command as one process would: it reads and writes OUT, asks Optuna, plans from
the budget and decides. Each other rank waits for rank 0's word and runs what it is handed
(`together`: a training run, a throughput probe) with rank 0, as `imgflow train` under torchrun
does: each rank its shard of every batch. Decisions cannot diverge, since only rank 0 makes
them; when rank 0 ends, the others return its result or raise its error.

A call the ranks run together ends with every rank saying how it went: a failure on all of them
(bad data, divergence, a pruned trial, Ctrl-C) is rank 0's to handle, and the others wait for
its next word; a failure on one rank alone is every rank's. A rank that does not come to that
exchange in time is stuck in a collective another rank left: the waiting rank raises, exits,
and torchrun stops the rest.
"""
from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from imgflow.errors import UserError
from imgflow.training.distributed import Ranks, join_torchrun

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a follower waits for rank 0's next word: between the runs, rank 0 alone loads and
# checks data, evaluates and writes reports, which may outlast gloo's 30-minute default.
FOLLOW_TIMEOUT = timedelta(hours=24)
# How long the ranks wait for each other once a call they run together has ended on one of them:
# longer than rank 0's own end of a run (writing its weights), far shorter than a stuck collective.
AGREE_TIMEOUT = timedelta(minutes=2)


class _Crew:
    """The two gloo groups of a crew: one for rank 0's word, one for the exchange after a call."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.word = dist.new_group(backend="gloo", timeout=FOLLOW_TIMEOUT)
        self.agree = dist.new_group(backend="gloo", timeout=AGREE_TIMEOUT)

    def say(self, kind: str, payload: Any) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.word)

    def hear(self) -> tuple[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.word)
        return box[0]

    def outcomes(self, failure: BaseException | None) -> list:
        """Every rank's failure as (kind, message), None where the call went well."""
        said = None if failure is None else _said(failure)
        heard: list[Any] = [None] * self.ranks.world
        dist.all_gather_object(heard, said, group=self.agree)
        return heard


_leading: list[_Crew] = []  # the crew this process leads, while rank 0 runs a command


def lead_or_follow(device_spec: str, lead: Callable[[], T]) -> T:
    """lead() on rank 0; under torchrun the other ranks meanwhile run what it hands them
    (`together`), then return what lead() returned or raise its error. One process: lead()."""
    ranks, _ = join_torchrun(device_spec)
    if not ranks.several:
        return lead()
    crew = _Crew(ranks)
    if not ranks.main:
        return _follow(crew)
    _leading.append(crew)
    try:
        result = lead()
    except BaseException as exc:
        with contextlib.suppress(Exception):  # a follower that is gone cannot hear it
            crew.say(*_said(exc))
        raise
    finally:
        _leading.remove(crew)
    crew.say("done", result)
    return result


def together(fn: Callable[..., T], *args: Any, local: dict | None = None, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on every rank of the crew this process leads (or here alone, without
    one); rank 0's own call also gets `local` (callbacks, progress bars: what the others lack).
    fn, args and kwargs are pickled to the other ranks: fn must be a module-level function.
    A failure on any rank is raised here (rank 0's own as it is)."""
    if not _leading:
        return fn(*args, **kwargs, **(local or {}))
    crew = _leading[-1]
    crew.say("call", (fn, args, kwargs))
    try:
        result, failure = fn(*args, **kwargs, **(local or {})), None
    except BaseException as exc:  # noqa: BLE001 - every rank hears of it first
        result, failure = None, exc
    heard = _exchange(crew, failure)
    if failure is not None:
        raise failure
    for rank, said in enumerate(heard):
        if said is not None:
            raise _as_error(*said, rank=rank)
    return result


def _follow(crew: _Crew) -> Any:
    """A follower's life: run each call rank 0 hands over, until rank 0 ends the command."""
    while True:
        kind, payload = crew.hear()
        if kind == "done":
            return payload
        if kind != "call":
            raise _as_error(kind, payload)
        fn, args, kwargs = payload
        try:
            fn(*args, **kwargs)
            failure = None
        except BaseException as exc:  # noqa: BLE001 - rank 0 decides what follows
            failure = exc
        _exchange(crew, failure)
        if failure is not None:
            log.debug("rank %d: a call failed (%s); rank 0 says what follows", crew.ranks.rank, failure)


def _exchange(crew: _Crew, failure: BaseException | None) -> list:
    """Every rank's outcome of a call. When the others do not come in time (stuck in a collective
    this rank has left), this rank's own failure is raised, or a RuntimeError that says so."""
    try:
        return crew.outcomes(failure)
    except Exception as exc:
        if failure is not None:
            raise failure from None
        raise RuntimeError(f"rank {crew.ranks.rank} waited {AGREE_TIMEOUT} for the other ranks to end a run "
                           f"with it: {exc}") from None


def _said(exc: BaseException) -> tuple[str, str]:
    """(kind, message) of a failure, as other ranks hear of it (`_as_error` raises it there)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", str(exc)
    if isinstance(exc, UserError):
        return "error", str(exc)
    return "failed", f"{type(exc).__name__}: {exc}"


def _as_error(kind: str, message: str, rank: int = 0) -> BaseException:
    """A failure of rank `rank` (rank 0: its end of the command) as this rank raises it."""
    if kind == "interrupted":
        return KeyboardInterrupt(message)
    if kind == "error":
        return UserError(message if rank == 0 else f"{message} (on rank {rank})")
    return RuntimeError(f"rank {rank} failed: {message}")
