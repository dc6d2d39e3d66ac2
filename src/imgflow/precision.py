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


def choose_precision(requested: str, device_type: str, native_bf16: bool) -> str:
    """The precision `requested` means on a device of `device_type` ('cpu', 'cuda', 'mps').

    auto: bf16 where the hardware has native bf16 (AVX-512 BF16/AMX CPUs, CUDA GPUs from Ampere
    on); on older CUDA GPUs fp16, whose narrow exponent needs a gradient scaler (`grad_scaler`);
    fp32 on other CPUs, where emulated bf16 is slower than fp32, and on MPS (its autocast is
    untested here). An explicit choice is kept as it is.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if native_bf16 else "fp16"
    if device_type == "cpu":
        return "bf16" if native_bf16 else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """'auto' -> the precision for `device` (default the CPU), see `choose_precision`."""
    device = torch.device("cpu") if device is None else device
    if precision != "auto":
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = device.type == "cpu" and cpu_supports_bf16()
    return choose_precision(precision, device.type, native)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """A context for forward passes: bf16/fp16 autocast on `device_type`, or a no-op for fp32."""
    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def grad_scaler(precision: str, device_type: str = "cpu") -> "torch.amp.GradScaler | None":
    """A loss scaler for fp16 (gradients below its ~6e-8 floor would vanish), None otherwise:
    bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device_type) if precision == "fp16" else None


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
