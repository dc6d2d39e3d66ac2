"""Training pace on this machine, which every budget plan rests on: probed on one batch, or
observed in a run that finished."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imgflow.errors import UserError
from imgflow.fileio import read_json
from imgflow.history import run_history
from imgflow.runs import RunPaths
from imgflow.workflow.budget import images_per_second_of_run
from imgflow.workflow.context import Context, train_part

PROBE_STEPS = 4  # the first warms up (allocations, oneDNN's kernel choice) and is not counted


def probe_throughput(model: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     threads: int | None, device: str = "auto") -> float:
    """Training images per second of `model` on `device`, on one batch of uint8 NHWC `images`
    (3 timed steps).

    It times the engine's own step (`Learner.train_step`: preprocessing, forward, backward,
    optimiser) with a default configuration, on the device and in the precision training will
    use, so the probe costs what training will. The batch starts on the device, as training's
    data does when it fits there; the step's finite-loss check waits for the device, so each
    step's time is the device's and not only the time to queue its work.

    Under torchrun (`training.crew`) every rank probes at once, each on its shard of the batch as
    in training: the figure is what all of them train together.
    """
    from imgflow.training.crew import together

    return together(_probe, model, images, labels, num_classes, threads, device)


def _probe(model: str, images: np.ndarray, labels: np.ndarray, num_classes: int, threads: int | None,
           device: str) -> float:
    """probe_throughput on this rank: its shard of the batch, the whole batch's images per second."""
    import torch

    from imgflow.device import resolve_device
    from imgflow.models import create_model
    from imgflow.precision import resolve_precision, set_threads
    from imgflow.preprocess import Preprocessing
    from imgflow.training.config import TrainConfig
    from imgflow.training.distributed import join_torchrun
    from imgflow.training.step import Learner

    B, H, W, C = images.shape
    set_threads(threads)
    ranks, spec = join_torchrun(device)  # under torchrun, this rank's GPU
    on = resolve_device(spec)
    precision = resolve_precision("auto", on)
    config = TrainConfig(data="", model=model, device=device)
    torch.manual_seed(0)
    net = create_model(model, num_classes=num_classes, in_channels=C,
                       image_size=(H, W)).to(device=on, memory_format=torch.channels_last)
    learner = Learner(net, config, Preprocessing((0.0,) * C, (1.0,) * C, (H, W), C), precision,
                      total_steps=PROBE_STEPS, ranks=ranks)
    learner.distribute()
    x = ranks.shard(torch.from_numpy(np.ascontiguousarray(images))).to(on)
    y = ranks.shard(torch.from_numpy(np.asarray(labels, dtype=np.int64))).to(on)
    times = []
    for step in range(1, PROBE_STEPS + 1):
        t = time.perf_counter()
        learner.train_step(x, y, config.lr, step)
        times.append(time.perf_counter() - t)
    return B / float(np.median(times[1:]))


def measure_throughput(ctx: Context, model: str, batch_size: int) -> float:
    """Training images per second of `model` on this machine: a few timed steps on real images."""
    train = train_part(ctx)
    return probe_throughput(model, train.images[:batch_size], train.labels[:batch_size],
                            int(train.labels.max()) + 1, ctx.threads, ctx.device)


def observed_throughput(out: Path, run: str) -> float | None:
    """Training images per second that run `run` (relative to `out`) sustained, by the plans'
    cost model (budget.plan_epochs); None for no such run, or one without timings.

    A finished run's median epoch time counts everything a probe leaves out (batch assembly,
    augmentation, the optimiser on every step, validation), and a median is not thrown by a
    moment's load on a shared machine the way a probe of a few steps is: on CIFAR-10 at the
    15-minute budget, probes of fast-small read 429-505 images/s, its runs 437-470.
    """
    run_dir = Path(out) / run
    try:
        data = read_json(RunPaths(run_dir).config, "run config")["data"]
        seconds = float(np.median([r["seconds"] for r in run_history(run_dir)]))
        return images_per_second_of_run(data["num_train"], data["num_val"], seconds)
    except (UserError, KeyError, TypeError, ValueError):
        return None
