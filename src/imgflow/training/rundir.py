"""A training run's directory: refusing to clobber, --overwrite's staging swap, config.json."""
from __future__ import annotations

import logging
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from imgflow.data import Dataset, Split
from imgflow.errors import UserError
from imgflow.fileio import read_json, write_json
from imgflow.models import count_params
from imgflow.preprocess import Preprocessing
from imgflow.runs import RunPaths, holds_run, read_run_config
from imgflow.training.batches import steps_per_epoch
from imgflow.training.config import TrainConfig
from imgflow.training.step import TrainingDiverged
from imgflow.weights import save_weights

log = logging.getLogger(__name__)


# Fields that may differ between the run that started and the one that resumes it. Another
# thread count or device can change the order of floating-point sums (and a device its kernels
# and its precision under "auto"), so such a resume is warned about: it continues the run, but
# not necessarily bit for bit. The device is compared as resolved (`warn_if_device_changed`):
# "auto" on a GPU machine and then on a laptop is a change, "auto" and "cpu" on one CPU is none.
_RESUMABLE_DIFFERENCES = {"threads", "device"}


def versions() -> dict[str, str]:
    import PIL
    import safetensors
    import sklearn

    from imgflow.version import __version__

    return {"imgflow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__,
            "safetensors": getattr(safetensors, "__version__", "?")}


def machine_info() -> dict[str, str | int | bool]:
    """CPU model, family and the vector features that decide speed here (results depend on them)."""
    from imgflow.precision import cpu_info, cpu_supports_bf16

    fields = cpu_info()
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_family": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "cpu_count": os.cpu_count() or 1, "avx512": "avx512f" in flags,
            "native_bf16": cpu_supports_bf16(), "platform": platform.platform(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def default_run_dir(config: TrainConfig) -> Path:
    """Where a run goes without --out: runs/<model>-seed<N> (an hf: model's name made one folder)."""
    from imgflow.models.hf import run_name

    return Path("runs") / f"{run_name(config.model)}-seed{config.seed}"


def started_config(run_dir: Path) -> TrainConfig | None:
    """The config the run in run_dir was started with, or None when there is none to continue."""
    if not RunPaths(run_dir).config.is_file():
        return None
    return TrainConfig.from_dict(read_run_config(run_dir)["train"])  # checked as it is read


def config_differences(run_dir: Path, config: TrainConfig) -> list[str]:
    """'option=value as started' for each setting of the run in run_dir that `config` changes."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        return []
    saved = read_run_config(run_dir)["train"]
    mine = config.to_dict()
    # An option added after the run started is missing from its config: the run used
    # what is now that option's default.
    defaults = TrainConfig("", "").to_dict()
    if saved.get("threads", defaults["threads"]) != mine["threads"]:
        log.warning("%s was started with --threads %s: continuing with %s may not end on "
                    "bit-identical weights", run_dir, saved.get("threads"), mine["threads"])
    return [f"{k}={saved.get(k, defaults[k])!r}" for k in sorted(mine)
            if k not in _RESUMABLE_DIFFERENCES and saved.get(k, defaults[k]) != mine[k]]


def warn_if_device_changed(run_dir: Path, device: dict) -> None:
    """Warn when the run in run_dir was started on another device than `device` (describe_device)."""
    started = read_run_config(run_dir).get("device")
    if not isinstance(started, dict) or not isinstance(started.get("device"), str):
        started = {"device": "cpu"}  # runs from before devices were recorded all trained on a CPU
    name = started.get("name")
    if started["device"] != device["device"] or name not in (None, device["name"]):
        log.warning("%s was started on %s%s: continuing on %s (%s) may not end on bit-identical weights",
                    run_dir, started["device"], f" ({name})" if name else "", device["device"], device["name"])


def check_run_dir(run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run; make sure --resume continues the same configuration."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a directory: choose another path")
    if (run_dir / "workflow.json").is_file():  # its report.html and plots/ have a run's names
        raise UserError(f"{run_dir} holds a workflow, not a training run: choose another --out "
                        "(the workflow's own runs are in its runs/ folder)")
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"cannot resume: {run_dir} does not exist (start it without --resume)")
        diff = config_differences(run_dir, config)
        if diff:
            raise UserError(f"{run_dir} was started with {', '.join(diff)}; resume with the same options "
                            "or use --overwrite to start again")
        return
    if holds_run(run_dir) and not overwrite:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")


# --overwrite trains the new run here, inside the run directory (so on its file system: the swap
# is a handful of renames), and moves the old run's files here just before deleting them.
OVERWRITE_STAGING = ".overwrite-new"


OVERWRITE_TRASH = ".overwrite-old"


def swap_in(staging: Path, run_dir: Path) -> None:
    """Replace the run in run_dir by the finished one in staging.

    Every artifact of the old run goes, the ones made from its model too (export/, metrics,
    report, plots): they would describe a model that no longer exists. Files the user put in
    the directory stay. The old files are renamed aside before the new ones are renamed in, so
    only a crash within these few renames could leave the directory without a run.
    """
    trash = run_dir / OVERWRITE_TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for path in RunPaths(run_dir).artifacts():
        if path.exists() or path.is_symlink():
            os.replace(path, trash / path.name)
    for path in staging.iterdir():
        os.replace(path, run_dir / path.name)
    staging.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def recording_divergence(paths: RunPaths):
    """A run stopped by the NaN/inf guard says so in its config.json: `report`, `evaluate` and
    the others then advise retraining with a lower --lr, not a --resume that would diverge again."""
    try:
        yield
    except TrainingDiverged as exc:
        saved = read_json(paths.config, "run config")
        saved["diverged"] = str(exc)
        write_json(paths.config, saved)
        raise


def run_config(config: TrainConfig, dataset: Dataset, train_part: Split, val_part: Split | None,
                prep: Preprocessing, model: torch.nn.Module, precision: str, threads: int,
                device: dict | None = None, world_size: int = 1) -> dict:
    """The config.json of a run: resolved settings, data, preprocessing, model, device, machine.

    device: `describe_device` of the device it trains on (default: the CPU; rank 0's device
    when several processes train it). world_size: how many processes train it (torchrun)."""
    if device is None:
        from imgflow.device import describe_device

        device = describe_device(torch.device("cpu"))
    H, W, C = dataset.image_shape
    return {
        "train": config.to_dict(),
        "data": {"name": dataset.name, "source": dataset.source, "sha256": dataset.sha256,
                 "classes": dataset.classes, "image_shape": [H, W, C],
                 "num_train": len(train_part), "num_val": len(val_part) if val_part else 0,
                 "num_test": len(dataset.test) if dataset.test is not None else 0,
                 "skipped": len(dataset.skipped)},
        "preprocessing": prep.to_dict(),
        "model": {"name": config.model, "num_classes": dataset.num_classes, "in_channels": C,
                  "image_size": list(prep.image_size), **count_params(model), **_hf_record(config, model)},
        "precision": precision, "threads": threads, "device": device, "world_size": world_size,
        "steps_per_epoch": steps_per_epoch(len(train_part), config.batch_size, world_size),
        "versions": versions(), "machine": machine_info(),
    }


def _hf_record(config: TrainConfig, model: torch.nn.Module) -> dict:
    """Where the starting weights came from (path + sha256, or hub id + revision); hf: models:
    also the architecture, so predict and export rebuild it without the hf: directory or the hub."""
    from imgflow.models.hf import architecture, hf_source, is_hf, weights_source

    if not is_hf(config.model):  # another imgflow run's weights (--weights RUN_DIR), if any
        return {"weights_source": weights_source("", config.weights, False)} if config.weights else {}
    return {"weights_source": weights_source(hf_source(config.model), config.weights, config.pretrained),
            "architecture": architecture(model)}


def save_final(paths: RunPaths, config: TrainConfig, state: dict, result: dict) -> None:
    """Save the weights the run ends with and add its result to config.json."""
    save_weights(paths.weights, state, {"model": config.model, "format": "imgflow"})
    saved = read_json(paths.config, "run config")
    saved["result"] = result
    saved.pop("diverged", None)  # an earlier attempt's, which this one got past
    write_json(paths.config, saved)
    log.info("saved %s (training took %.1f s)", paths.weights, result["train_seconds"])
