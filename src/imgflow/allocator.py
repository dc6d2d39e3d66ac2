"""The process's memory allocator: keep freed memory for the next tensor instead of returning it.

PyTorch on a CPU allocates every activation and gradient with malloc. glibc serves blocks above
32 MB (a batch of 1,000 32x32 activations is 60-250 MB) with a fresh mmap and unmaps them on
free, so each large tensor is page-faulted and zero-filled by the kernel again, step after step:
on the Xeon (2 vCPUs) a ReLU over 61 M bf16 values took 55 ms that way and 15 ms with the memory
kept, and training sped up by 13-15% (benchmarks/throughput.py) and `--preset fast` trained in
62 s instead of 80 (docs/RESULTS.md). Allocators such as jemalloc or tcmalloc (PyTorch's CPU launcher preloads them)
keep freed memory too; this does it with glibc's own switches, so nothing needs installing.

The price: the process keeps its peak memory until it exits, which suits a training or
evaluation command. A library user's process is left alone: only the command line calls this.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2 ** 31 - 1  # an int: the largest top-of-heap glibc may keep instead of trimming

# The user's own allocator settings win: glibc's variables (read at start-up), or another allocator.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")
OPT_OUT = "IMGFLOW_KEEP_FREED_MEMORY"  # "0": leave the allocator as it is


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (no mmap per large block, no trimming).

    Returns whether it changed anything: not on other C libraries or systems, nor when the user
    set glibc's malloc variables, preloaded another allocator or set IMGFLOW_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or any(os.environ.get(name) for name in _USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only: musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    changed = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    log.debug("malloc keeps freed memory: %s", changed)
    return changed
