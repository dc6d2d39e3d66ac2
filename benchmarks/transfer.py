"""Transfer: a backbone trained on CIFAR-10 with imgflow, fine-tuned on a small labelled folder of
another task, against the same model trained from scratch with the same epochs and recipe.

    imgflow train cifar10 --preset fast --out runs/cifar10-fast          # the backbone (once)
    python benchmarks/transfer.py --backbone-run runs/cifar10-fast --seeds 0,1,2

The other task is Fashion-MNIST (Xiao et al., 2017; `apt-get install -y dataset-fashion-mnist`, or
IMGFLOW_FASHION_MNIST): PER_CLASS images per class of its training set and TEST_IMAGES of its test
set (both stratified, drawn with a fixed seed, the same for every run), written as 32x32 RGB PNGs
(28x28 gray, resized bilinearly, the gray copied to 3 channels) so the CIFAR-10 backbone's
3-channel stem applies. For each seed, each arm is one `imgflow train FOLDER --model M --seed S
TRAIN_OPTIONS [ARM OPTIONS]` run, then `imgflow evaluate` on the held-out test images:
- scratch: nothing more (the model's own initialisation);
- finetune: `--weights BACKBONE_RUN --finetune` (head alone for --freeze-epochs, then graded lrs);
- frozen (not run unless --arms asks): `--weights BACKBONE_RUN --freeze-backbone --augment none`.
Finished runs are reused (`--resume`), so a series can be extended. Results:
benchmarks/results/transfer-<machine>.json, with mean ± std of the test accuracy per arm.
"""
from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from run_command import run_to_end
from summary import grouped, mean_std
from throughput import RESULTS, machine_info, machine_slug

from imgflow.fileio import read_json, write_json
from imgflow.precision import default_threads

log = logging.getLogger("benchmarks.transfer")

# The same recipe for every arm: airbench's SGD recipe (Nesterov 0.85, one-cycle, label smoothing,
# flip + translate; Muon is for training from scratch, not fine-tuning) at a batch of 50 for 500
# images, its lr scaled as airbench94's (1.5 per 1024 images), on every training image (the test
# images are the measurement).
TRAIN_OPTIONS = ("--optimizer sgd --momentum 0.85 --lr 0.075 --weight-decay 1.33e-3 "
                 "--schedule onecycle --warmup-epochs 1 --label-smoothing 0.2 --augment flip+translate "
                 "--normalize standardize --epochs 20 --batch-size 50 --val-split 0")
ARMS = {
    "scratch": lambda backbone: [],
    "finetune": lambda backbone: ["--weights", backbone, "--finetune"],
    "frozen": lambda backbone: ["--weights", backbone, "--freeze-backbone", "--augment", "none"],
}
SAMPLE_SEED = 20260  # which Fashion-MNIST images make the task: fixed, whatever the training seed
SIDE = 32  # CIFAR-10's


def class_folder(name: str) -> str:
    """A class name as a folder name ('T-shirt/top' -> 'T-shirt-top')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` images of each class (all of a class that has fewer)."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def write_split(images: np.ndarray, labels: np.ndarray, classes: list[str], where: Path) -> None:
    """uint8 (N, H, W[, 1]) gray images as SIDE x SIDE RGB PNGs under where/<class>/NNNNN.png."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = where / class_folder(classes[int(label)])
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(np.asarray(image).reshape(image.shape[0], image.shape[1]))
        gray.resize((SIDE, SIDE), Image.BILINEAR).convert("RGB").save(folder / f"{i:05d}.png")


def build_task_folder(dataset, out: Path, per_class: int, test_images: int) -> dict:
    """The small labelled folder (out/train, out/test) of `dataset` (train and test uint8 gray
    splits); returns what it holds, also written to out/task.json. An existing folder made with
    the same numbers is reused."""
    task = {"data": dataset.name, "per_class": per_class, "test_images": test_images, "sample_seed": SAMPLE_SEED,
            "size": [SIDE, SIDE, 3]}
    manifest = out / "task.json"
    if manifest.is_file():
        made = read_json(manifest, "transfer task")
        if {k: made.get(k) for k in task} == task:
            return made
        raise SystemExit(f"transfer: {out} holds another task ({manifest}): give another --work-dir")
    rng = np.random.default_rng(SAMPLE_SEED)
    train = stratified(dataset.train.labels, per_class, rng)
    test_per_class = -(-test_images // len(dataset.classes))
    test = stratified(dataset.test.labels, test_per_class, rng)[:test_images] if test_images else np.array([], int)
    write_split(dataset.train.images[train], dataset.train.labels[train], dataset.classes, out / "train")
    write_split(dataset.test.images[test], dataset.test.labels[test], dataset.classes, out / "test")
    task.update(num_train=int(len(train)), num_test=int(len(test)), classes=list(dataset.classes),
                train_indices=train.tolist(), test_indices=test.tolist())
    write_json(manifest, task)
    return task


def run_one(folder: Path, model: str, arm: str, backbone: str, options: list[str], seed: int,
            runs_dir: Path) -> dict:
    """Train (or reuse) and evaluate one (arm, seed); return its record."""
    run_dir = runs_dir / f"{arm}-seed{seed}"
    command = [sys.executable, "-m", "imgflow", "train", str(folder), *options, "--model", model,
               "--seed", str(seed), "--out", str(run_dir), *ARMS[arm](backbone)]
    if run_dir.is_dir():
        command.append("--resume")  # finished: nothing to do; interrupted: continue
    run_to_end(command)
    if not (run_dir / "metrics.json").is_file():
        run_to_end([sys.executable, "-m", "imgflow", "-q", "evaluate", str(run_dir)])
    return record(arm, seed, run_dir)


def record(arm: str, seed: int, run_dir: Path) -> dict:
    config = read_json(run_dir / "config.json", "run config")
    metrics = read_json(run_dir / "metrics.json", "metrics")
    return {"arm": arm, "seed": seed, "model": config["train"]["model"], "epochs": config["result"]["epochs_run"],
            "test_accuracy": metrics["accuracy"], "test_images": metrics.get("num_images"),
            "train_seconds": config["result"]["train_seconds"], "run_dir": str(run_dir),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std (sample) of the test accuracy per arm, in the order the arms first appear."""
    rows = []
    for arm, rs in grouped(runs, lambda r: r["arm"]).items():
        acc, acc_sd = mean_std([r["test_accuracy"] for r in rs])
        rows.append({"arm": arm, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                     "test_accuracy_mean": round(acc, 4), "test_accuracy_std": round(acc_sd, 4),
                     "train_seconds_mean": round(mean_std([r["train_seconds"] for r in rs])[0], 1)})
    return rows


def write_results(out: Path, backbone: dict, task: dict, options: list[str], machine: dict, runs: list[dict]) -> dict:
    result = {"benchmark": "transfer", "backbone": backbone,
              "task": {k: v for k, v in task.items() if not k.endswith("_indices")},
              "train_options": options, "arms": {arm: ARMS[arm]("BACKBONE_RUN") for arm in
                                                  dict.fromkeys(r["arm"] for r in runs)},
              "machine": machine, "runs": runs, "summary": summarise(runs)}
    write_json(out, result)
    return result


def describe_backbone(run: Path) -> dict:
    """The backbone run: its model, data, test accuracy if evaluated, and model.safetensors' sha256."""
    from imgflow.models.hf import sha256_of

    config = read_json(run / "config.json", "run config")
    metrics = read_json(run / "metrics.json", "metrics") if (run / "metrics.json").is_file() else {}
    return {"run": str(run.resolve()), "model": config["train"]["model"], "data": config["data"]["name"],
            "preset": config["train"].get("preset"), "epochs": config["result"]["epochs_run"],
            "test_accuracy": metrics.get("accuracy"), "sha256": sha256_of(run / "model.safetensors")}


def load_fashion_mnist():
    from imgflow.data import load_dataset

    return load_dataset("fashion-mnist", progress=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone-run", type=Path, required=True, help="a finished imgflow run on CIFAR-10")
    p.add_argument("--per-class", type=int, default=50, help="training images per class of the other task")
    p.add_argument("--test-images", type=int, default=2000, help="its test images (stratified)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--arms", default="scratch,finetune", help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--train-options", default=TRAIN_OPTIONS, help=f"the same for every arm (default: {TRAIN_OPTIONS})")
    p.add_argument("--work-dir", type=Path, default=Path("runs/transfer"), help="the task's folder and the runs")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/transfer-<machine>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms):
        print(f"transfer: --arms {args.arms!r}: use some of {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if not (args.backbone_run / "model.safetensors").is_file():
        print(f"transfer: {args.backbone_run} is not a finished imgflow run (no model.safetensors)", file=sys.stderr)
        return 2
    backbone = describe_backbone(args.backbone_run)
    task = build_task_folder(load_fashion_mnist(), args.work_dir / "task", args.per_class, args.test_images)
    options = args.train_options.split()
    machine = machine_info(default_threads())
    out = args.out or RESULTS / f"transfer-{machine_slug(machine)}.json"
    runs = []
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        for arm in arms:
            try:
                runs.append(run_one(args.work_dir / "task", backbone["model"], arm, backbone["run"], options, seed,
                                    args.work_dir / "runs"))
            except subprocess.CalledProcessError as exc:  # imgflow printed why, in one line, above
                print(f"transfer: {arm} seed {seed} failed (exit {exc.returncode})", file=sys.stderr)
                return 2
            log.info("%s seed %d: test accuracy %.4f", arm, seed, runs[-1]["test_accuracy"])
            write_results(out, backbone, task, options, machine, runs)
    for row in summarise(runs):
        print(f"{row['arm']:<9} n={row['n']} test accuracy {row['test_accuracy_mean']:.4f} ± "
              f"{row['test_accuracy_std']:.4f}  ({row['train_seconds_mean']:.0f} s per run)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
