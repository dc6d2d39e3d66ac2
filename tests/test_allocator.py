"""imgflow.allocator: large tensors reuse freed memory instead of being page-faulted again."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imgflow.allocator import OPT_OUT

# Trains a two-conv net on 34 MB activations (above glibc's 32 MB mmap limit) and prints the
# page faults of steps 3-5: with the system allocator every such tensor is mapped afresh
# (~8,000 faults each), with freed memory kept next to none.
_PROBE = """
import resource, torch
from imgflow.allocator import keep_freed_memory
kept = keep_freed_memory()
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
x = torch.randn(128, 16, 64, 64)
for step in range(5):
    if step == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_freed_large_tensors_are_reused_without_new_page_faults():
    kept, faults = _probe()
    not_kept, system_faults = _probe(**{OPT_OUT: "0"})
    assert kept and not not_kept
    assert system_faults > 3 * 8_000  # at least one fresh 34 MB block per step
    assert faults < system_faults / 10


@pytest.mark.parametrize("env", [{OPT_OUT: "0"}, {"MALLOC_MMAP_MAX_": "65536"}, {"LD_PRELOAD": "libjemalloc.so.2"}])
def test_the_users_own_allocator_settings_win(env, monkeypatch):
    from imgflow.allocator import keep_freed_memory
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False
