"""Training one run: typed config and presets, the loop with exact resume, its run directory.

The names below load on first use, so that building the command line does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "TrainConfig": "imgflow.training.config",
    "resolve_config": "imgflow.training.config",
    "train": "imgflow.training.loop",
    "TrainResult": "imgflow.training.loop",
    "TrainingDiverged": "imgflow.training.step",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imgflow.training' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
