"""model.safetensors: the weights a run ends with, the same bytes for the same weights."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from imgflow.fileio import atomic_write_bytes


def detached_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of `state`: what is saved loads on any device, and a GPU's memory is not spent
    on copies. safetensors wants contiguous tensors; channels_last conv weights are not."""
    return {k: v.detach().contiguous().to("cpu", copy=True) for k, v in state.items()}


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `state`, with its JSON header's keys in sorted order.

    The library writes the header's maps in hash order, which changes from process to process:
    two identical runs would give files with different hashes. Sorted keys, compact separators
    and the original length (padded with spaces, as the format allows) keep every offset valid.
    """
    from safetensors.torch import save

    data = save(detached_copy(state), metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > length:  # never with the library's compact JSON; refuse rather than corrupt
        raise ValueError(f"re-serialised safetensors header is longer ({len(header)} > {length} bytes)")
    return data[:8] + header.ljust(length, b" ") + data[8 + length:]


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, safetensors_bytes(state, metadata))
