"""Decide numeric precision and threads once; the training and inference loops have no branches."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX): only then is it faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on CPUs with native bf16, else 'fp32'."""
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """A context for forward passes: bf16 autocast, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpuinfo_records() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU; empty where there is no /proc."""
    records: list[dict[str, str]] = [{}]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    records.append({})
                    continue
                key, _, value = line.partition(":")
                records[-1][key.strip()] = value.strip()
    except OSError:
        pass
    return [r for r in records if r]


def cpu_info() -> dict[str, str]:
    """The first logical CPU's /proc/cpuinfo fields (model name, cpu family, flags, ...)."""
    records = cpuinfo_records()
    return records[0] if records else {}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or cpuset limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """$OMP_NUM_THREADS when the user set it, else one thread per physical core (hyper-threads
    only add contention in conv kernels), never more than the CPUs available."""
    n = available_cpus()
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) >= 1:
        return min(int(requested), n)
    cores = {(r.get("physical id"), r["core id"]) for r in cpuinfo_records() if "core id" in r}
    if cores:
        n = min(n, len(cores))
    return max(1, n)


def set_threads(threads: int | None) -> int:
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
