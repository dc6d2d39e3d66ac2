"""Training and inference throughput of the registered models on this CPU or a GPU, in one run.

For each model and precision: training img/s (the median of steady-state steps after warm-up:
forward, backward and a Nesterov-SGD step on uint8 batches made model input exactly as the
engine does, channels_last), inference img/s (eval mode, no_grad), forward FLOPs per image,
achieved GFLOP/s and utilisation against a matmul peak measured in the same run. Training FLOPs
are taken as 3x the forward (the backward pass computes gradients for inputs and weights).

bf16 is skipped with a note when the CPU has no native bf16 kernels (oneDNN then emulates them
and runs 5-15x slower than fp32); --force-bf16 measures it anyway. When TensorFlow is importable,
the notebook's two CNNs are also timed in Keras for a side-by-side ratio.

    python benchmarks/throughput.py --quick            # ~1-2 minutes on 2 cores
    python benchmarks/throughput.py --models fast-small,fast-large --precisions fp32
    python benchmarks/throughput.py --profile fast-small   # torch.profiler table of 5 steps
    python benchmarks/throughput.py --device cuda --precisions bf16,fp32   # on a GPU
--device (auto, cpu, cuda, cuda:N, mps; default auto) is resolved as `imgflow train --device`
resolves it; the model and the batches live there (as a training run holds its data on the GPU),
and each timed step ends with a synchronize, so GPU times are of finished work. On a GPU, bf16
and fp16 are autocast; the bf16-on-CPU note below does not apply.
Timings on a shared or virtualised machine vary by up to 2x between runs: compare rows of the
same run, and read the load average recorded in the JSON.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from imgflow.allocator import keep_freed_memory
from imgflow.device import describe_device, resolve_device
from imgflow.errors import UserError
from imgflow.fileio import write_json
from imgflow.models import count_flops, count_params, create_model
from imgflow.precision import autocast, cpu_info, default_threads, set_threads
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.training.config import TrainConfig
from imgflow.training.rundir import machine_info as run_machine_info
from imgflow.training.step import Learner

log = logging.getLogger("benchmarks.throughput")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ("seed-baseline", "seed-batchnorm", "fast-small", "fast-large", "resnet9")
IMAGE = (32, 32, 3)  # CIFAR-10
CLASSES = 10
# A training step does the forward pass, then gradients for activations and for weights, each
# about as costly as the forward: the usual 3x convention (cf. the airbench paper's PFLOP counts).
TRAIN_FLOP_FACTOR = 3


# ---------------------------------------------------------------------------------------------
# the machine


def machine_info(threads: int) -> dict:
    """What a run's config.json records about the machine (imgflow.training.rundir), plus what
    a benchmark needs on top: SIMD flags, torch build, threads, load, OpenMP environment."""
    cpu = cpu_info()
    flags = set(cpu.get("flags", "").split())
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        **run_machine_info(),
        "host": socket.gethostname(),
        "cpu_family": cpu.get("cpu family"), "cpu_model": cpu.get("model"),
        "cpu_mhz": cpu.get("cpu MHz"),
        "logical_cpus": os.cpu_count(),
        "hypervisor": "hypervisor" in flags,
        "flags": {name: name in flags for name in
                  ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")},
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "threads": threads,
        # OpenMP's wait policy decides what idle threads do between parallel regions; on a
        # machine with more runnable processes than cores it changes speed several-fold.
        "env": {k: os.environ.get(k) for k in
                ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")},
        "python": platform.python_version(),
        "load_average_1_5_15": load,
    }


def machine_slug(machine: dict) -> str:
    """A file-name-safe name for this CPU, e.g. 'amd-epyc-f23m1' (KVM hides the exact model),
    or for the GPU measured, e.g. 'nvidia-h200'."""
    gpu = (machine.get("device") or {}).get("gpu")
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:40] or "gpu"
    name = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")
    name = re.sub(r"-(processor|\d+-core|cpu)\b", "", name)[:40].strip("-") or "cpu"
    if machine.get("cpu_family"):
        name += f"-f{machine['cpu_family']}m{machine['cpu_model']}"
    return name


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: GPU calls return before their kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Best GFLOP/s of an n x n matmul over `repeats` timed calls (after one warm-up)."""
    a = torch.randn(n, n).to(device, dtype)
    b = torch.randn(n, n).to(device, dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peaks(precisions: list[str], n: int, repeats: int,
                  device: torch.device = torch.device("cpu")) -> dict[str, float]:
    return {p: round(matmul_peak(DTYPES[p], n, repeats, device), 1) for p in precisions}


# ---------------------------------------------------------------------------------------------
# PyTorch models


def _learner(model: torch.nn.Module, name: str, precision: str, prep: Preprocessing, total_steps: int) -> Learner:
    """imgflow's Learner with the fast presets' optimiser (Nesterov SGD, label smoothing 0.2)."""
    config = TrainConfig(data="", model=name, optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4,
                         label_smoothing=0.2, precision=precision)
    return Learner(model, config, prep, precision, total_steps)


def _timed_steps(step, warmup: int, steps: int, device: torch.device = torch.device("cpu")) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_torch(name: str, precision: str, batch: int, eval_batch: int, warmup: int, steps: int,
                eval_steps: int, device: torch.device = torch.device("cpu"), compile: bool = False,
                fold: bool = True) -> dict:
    """Training and inference img/s of one registered model at one precision on `device`; with
    `compile`, through torch.compile (its compile time: the first warm-up step's, in the row).
    Inference folds BatchNorm into the convolutions where the model can, as a loaded run does
    (runs.load_trained_model), unless `fold` is False."""
    H, W, C = IMAGE
    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES, in_channels=C, image_size=(H, W))
    flops = count_flops(model, C, (H, W))
    params = count_params(model)["params"]
    model = model.to(device=device, memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: the Learner's step calls the compiled forward
    # Standardised input as the fast presets use; plain /255 costs the same.
    prep = Preprocessing((0.49, 0.48, 0.45), (0.25, 0.24, 0.26), (H, W), C)
    gen = torch.Generator().manual_seed(0)
    # Drawn on the CPU (the same numbers on every device), then held on the device as a run holds its data.
    x_train = torch.randint(0, 256, (batch, H, W, C), dtype=torch.uint8, generator=gen).to(device)
    y_train = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    x_eval = torch.randint(0, 256, (eval_batch, H, W, C), dtype=torch.uint8, generator=gen).to(device)
    learner = _learner(model, name, precision, prep, warmup + steps)
    done = iter(range(1, warmup + steps + 2))

    def train_step() -> None:  # the engine's own step
        learner.train_step(x_train, y_train, lr=1e-3, step=next(done))

    @torch.no_grad()
    def eval_step() -> None:
        with autocast(precision, device.type):
            model(to_model_input(x_eval, prep, channels_last=True)).float()

    model.train()
    first = time.perf_counter()
    train_step()  # the first step: compiles, when compiling
    synchronize(device)
    first = time.perf_counter() - first
    train_times = _timed_steps(train_step, max(warmup - 1, 0), steps, device)
    model.eval()
    folded = fold and hasattr(model, "fold_batchnorm")
    if folded:
        model.fold_batchnorm()
    eval_times = _timed_steps(eval_step, 2 if compile else 1, eval_steps, device)
    train_ips = batch / statistics.median(train_times)
    eval_ips = eval_batch / statistics.median(eval_times)
    return {
        "framework": "pytorch", "device": str(device), "model": name, "precision": precision, "params": params,
        "compiled": compile, "first_step_seconds": round(first, 2),
        "mflop_per_image": round(flops / 1e6, 2),
        "batch_size": batch, "eval_batch_size": eval_batch, "steps": steps, "warmup_steps": warmup,
        "train_images_per_second": round(train_ips, 1),
        "train_step_seconds": [round(t, 4) for t in train_times],
        "train_gflops": round(TRAIN_FLOP_FACTOR * flops * train_ips / 1e9, 2),
        "inference_images_per_second": round(eval_ips, 1), "inference_batchnorm_folded": folded,
        "inference_gflops": round(flops * eval_ips / 1e9, 2),
    }


# ---------------------------------------------------------------------------------------------
# Keras (only when TensorFlow happens to be installed; it is never a dependency)


def _keras_seed_model(name: str):
    """The notebook's two CNNs in Keras, layer for layer as in imgflow/models/seed.py."""
    from tensorflow import keras
    from tensorflow.keras import layers

    H, W, C = IMAGE
    if name == "seed-baseline":
        body = [layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(CLASSES)]
    else:
        body = []
        for width, drop in ((64, 0.2), (128, 0.25), (128, 0.35)):
            for _ in range(2):
                body += [layers.Conv2D(width, 4, padding="same", activation="relu"),
                         layers.BatchNormalization()]
            body += [layers.MaxPooling2D(2), layers.Dropout(drop)]
        body += [layers.Flatten(), layers.Dense(256, activation="relu"), layers.BatchNormalization(),
                 layers.Dropout(0.5), layers.Dense(CLASSES)]
    model = keras.Sequential([keras.Input((H, W, C)), layers.Rescaling(1 / 255), *body])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def bench_keras(name: str, batch: int, eval_batch: int, warmup: int, steps: int, eval_steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    H, W, C = IMAGE
    model = _keras_seed_model(name)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, H, W, C)).astype("float32")
    y = rng.integers(0, CLASSES, (batch,))
    xe = rng.integers(0, 256, (eval_batch, H, W, C)).astype("float32")
    train_times = _timed_steps(lambda: model.train_on_batch(x, y), warmup, steps)
    eval_times = _timed_steps(lambda: model.predict_on_batch(xe), 1, eval_steps)
    return {"framework": "keras", "model": name, "precision": "fp32", "tensorflow": tf.__version__,
            "batch_size": batch, "eval_batch_size": eval_batch,
            "train_images_per_second": round(batch / statistics.median(train_times), 1),
            "inference_images_per_second": round(eval_batch / statistics.median(eval_times), 1)}


def tensorflow_version() -> str | None:
    try:
        import tensorflow as tf
    except Exception:  # not installed, or a broken install: either way, no Keras column
        return None
    return tf.__version__


# ---------------------------------------------------------------------------------------------
# where the time goes


def profile_training(name: str, precision: str, batch: int, steps: int, row_limit: int = 30,
                     device: torch.device = torch.device("cpu")) -> str:
    """torch.profiler table of `steps` training steps (after 2 untimed ones), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    H, W, C = IMAGE
    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES, in_channels=C, image_size=(H, W))
    model = model.to(device=device, memory_format=torch.channels_last).train()
    prep = Preprocessing((0.49, 0.48, 0.45), (0.25, 0.24, 0.26), (H, W), C)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, H, W, C), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    learner = _learner(model, name, precision, prep, steps + 2)
    done = iter(range(1, steps + 3))

    def step() -> None:  # Learner.train_step's two halves, timed apart
        with record_function("## input, forward and loss"):
            _, loss = learner.logits_and_loss(x, y)
        with record_function("## backward and optimizer"):
            learner.update(loss, next(done))

    for _ in range(2):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    seconds = time.perf_counter() - t
    flops = count_flops(model, C, (H, W))
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith("## ")), key=lambda e: -e.cpu_time_total)
    total = sum(e.cpu_time_total for e in phases) or 1
    header = [f"torch.profiler: {steps} training steps of {name} on {device}, batch {batch}, {precision}, channels_last, "
              f"random uint8 data, {torch.get_num_threads()} threads, torch {torch.__version__}",
              f"wall {seconds:.2f} s with profiling = {steps * batch / seconds:.0f} img/s; "
              f"{flops / 1e6:.1f} MFLOP/img forward, ~{TRAIN_FLOP_FACTOR * flops * steps * batch / seconds / 1e9:.1f} "
              "GFLOP/s for the training step", "",
              "phases (wall time inside each record_function block):"]
    for e in phases:
        header.append(f"  {e.key[3:]:<36} {e.cpu_time_total / 1e3:9.1f} ms  {100 * e.cpu_time_total / total:5.1f}%")
    table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return "\n".join(header) + "\n\nops by self CPU time:\n" + table


# ---------------------------------------------------------------------------------------------
# the run


def format_table(result: dict) -> str:
    lines = [f"{'model':<15} {'prec':<5} {'thr':>3} {'MFLOP':>7} {'train img/s':>11} {'GFLOP/s':>8} {'util':>5}"
             f"  {'infer img/s':>11} {'GFLOP/s':>8} {'util':>5}"]

    def util(u: float | None) -> str:
        return f"{100 * u:4.0f}%" if u is not None else "    -"

    for r in result["pytorch"]:
        lines.append(f"{r['model']:<15} {r['precision']:<5} {r['threads']:>3} {r['mflop_per_image']:>7.1f} "
                     f"{r['train_images_per_second']:>11.1f} {r['train_gflops']:>8.1f} {util(r['train_utilisation'])}"
                     f"  {r['inference_images_per_second']:>11.1f} {r['inference_gflops']:>8.1f} "
                     f"{util(r['inference_utilisation'])}")
    device = result["machine"].get("device")
    if device and device["type"] != "cpu":
        lines.append(f"device: {device['device']} ({device['name']}), torch {device['torch']} ({device['build']} build)")
    for peak in result["matmul_peaks"]:
        text = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items() if k != "threads")
        lines.append(f"matmul peak, {peak['threads']} thread(s): {text}")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    if result["tensorflow"]:
        for r in result["keras"]:
            lines.append(f"keras {r['model']:<15} train {r['train_images_per_second']:.1f} img/s, "
                         f"inference {r['inference_images_per_second']:.1f} img/s "
                         f"(pytorch/keras: train x{r.get('pytorch_ratio_train')}, "
                         f"inference x{r.get('pytorch_ratio_inference')})")
    else:
        lines.append("tensorflow: not installed, no Keras comparison")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few steps and small batches (about 1-2 minutes on 2 cores)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (fp16: GPUs)")
    p.add_argument("--force-bf16", action="store_true",
                   help="measure bf16 even where the CPU has no native bf16 (it will be slow)")
    p.add_argument("--batch-size", type=int, help="training batch (default 256; --quick 64)")
    p.add_argument("--eval-batch-size", type=int, help="inference batch (default 500; --quick 250)")
    p.add_argument("--steps", type=int, help="timed training steps (default 20; --quick 5)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default 3; --quick 2)")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts to measure, e.g. 1,2 "
                        "(default: one per physical core)")
    p.add_argument("--no-keras", action="store_true", help="skip Keras even if TensorFlow is installed")
    p.add_argument("--compile", action="store_true",
                   help="train and infer through torch.compile (first_step_seconds: its compile time)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/throughput-<cpu>.json)")
    p.add_argument("--profile", metavar="MODEL",
                   help="instead: profile training steps of MODEL into results/profile-MODEL.txt "
                        "(precision: the first of --precisions; batch: --batch-size or 256)")
    p.add_argument("--profile-steps", type=int, default=5, help="steps to profile (default 5)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as it is (imgflow's commands keep freed memory: imgflow.allocator)")
    p.add_argument("--no-fold", action="store_true",
                   help="infer with BatchNorm as trained (a loaded run folds it into the convolutions)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # As imgflow's commands do (unless --system-malloc): the speed users get.
    kept_freed_memory = False if args.system_malloc else keep_freed_memory()
    batch = args.batch_size or (64 if args.quick else 256)
    eval_batch = args.eval_batch_size or (250 if args.quick else 500)
    steps = args.steps or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    eval_steps = 3 if args.quick else 10
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [default_threads()]
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.profile:
        set_threads(thread_counts[0])
        first = args.precisions.split(",")[0].strip()
        precision = first if first in DTYPES else "fp32"
        text = profile_training(args.profile, precision, args.batch_size or 256, args.profile_steps, device=device)
        out = args.out or RESULTS / f"profile-{args.profile}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out)
        print(text)
        print(f"wrote {out}")
        return 0
    machine = machine_info(thread_counts[0])
    machine["threads_measured"] = thread_counts
    machine["malloc_keeps_freed_memory"] = kept_freed_memory
    machine["device"] = describe_device(device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in DTYPES]
    if unknown:
        print(f"error: unknown precision {', '.join(unknown)}: use fp32, bf16 or fp16", file=sys.stderr)
        return 2
    notes: list[str] = []
    if device.type == "cuda" and "bf16" in precisions and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
        notes.append(f"bf16 skipped: {machine['device']['gpu']} has no bf16 (use fp16)")
    if device.type == "cpu" and "fp16" in precisions:
        precisions.remove("fp16")
        notes.append("fp16 skipped: it is a GPU precision (the CPU's half precision is bf16)")
    if device.type == "cpu" and "bf16" in precisions and not machine["native_bf16"] and not args.force_bf16:
        precisions.remove("bf16")
        notes.append("bf16 skipped: no native bf16 on this CPU (oneDNN would emulate it, 5-15x "
                     "slower than fp32); --force-bf16 measures it anyway")

    t0 = time.perf_counter()
    n = 1024 if args.quick else 2048
    repeats = 8 if args.quick else 10
    peaks = []
    rows = []
    for threads in thread_counts:
        set_threads(threads)
        peak = measure_peaks(precisions, n, repeats, device)
        thread_rows = []
        for name in models:
            for precision in precisions:
                # seed-batchnorm costs 10x fast-small per image: smaller batches in a quick run.
                heavy = args.quick and name == "seed-batchnorm"
                row = bench_torch(name, precision, max(8, batch // 2) if heavy else batch,
                                  max(50, eval_batch // 2) if heavy else eval_batch,
                                  warmup, steps, eval_steps, device, compile=args.compile,
                                  fold=not args.no_fold)
                row["threads"] = threads
                thread_rows.append(row)
                log.info("%-15s %-5s %d thr  train %8.1f img/s  inference %8.1f img/s", name, precision,
                         threads, row["train_images_per_second"], row["inference_images_per_second"])
        # The peak again after the models, and the better of the two: on a shared machine one
        # short measurement can land in a busy moment and make every utilisation look too high.
        after = measure_peaks(precisions, n, repeats, device)
        peak = {k: max(peak[k], after[k]) for k in peak}
        peaks.append({"threads": threads, **peak})
        log.info("matmul peak, %d thread(s): %s GFLOP/s", threads, peak)
        for row in thread_rows:
            p = peak[row["precision"]]
            row["matmul_peak_gflops"] = p
            row["train_utilisation"] = round(row["train_gflops"] / p, 3)
            row["inference_utilisation"] = round(row["inference_gflops"] / p, 3)
        rows += thread_rows

    # Keras runs on the CPU here: beside GPU rows its ratio would compare devices, not frameworks.
    tf_version = None if args.no_keras or device.type != "cpu" else tensorflow_version()
    keras_rows = []
    if tf_version:
        set_threads(thread_counts[0])
        for name in ("seed-baseline", "seed-batchnorm"):
            k = bench_keras(name, batch, eval_batch, warmup, steps, eval_steps)
            mine = next((r for r in rows if r["model"] == name and r["precision"] == "fp32"
                         and r["threads"] == thread_counts[0]), None)
            if mine:
                k["pytorch_ratio_train"] = round(mine["train_images_per_second"] / k["train_images_per_second"], 2)
                k["pytorch_ratio_inference"] = round(
                    mine["inference_images_per_second"] / k["inference_images_per_second"], 2)
            keras_rows.append(k)

    result = {
        "benchmark": "throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine,
        "matmul_peak_gflops": {k: v for k, v in peaks[0].items() if k != "threads"},
        "matmul_peaks": peaks,
        "matmul_size": n,
        "train_flop_factor": TRAIN_FLOP_FACTOR,
        "pytorch": rows,
        "tensorflow": tf_version,
        "keras": keras_rows or None,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = args.out or RESULTS / f"throughput-{machine_slug(machine)}.json"
    write_json(out, result)
    print(format_table(result))
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
