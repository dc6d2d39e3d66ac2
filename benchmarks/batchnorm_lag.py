"""How far a run's BatchNorm running averages are from statistics re-estimated from its weights.

    python benchmarks/batchnorm_lag.py RUN_DIR [--checkpoint] [--images 5000] [--val-images 2000] [--test]

Scores the run's validation part (never test) with the weights of model.safetensors, or of
checkpoint/state.pt with --checkpoint (a run still training), three ways: with the running
averages the weights came with; with BatchNorm statistics re-estimated on --images training images
with dropout off (imgflow.training.batchnorm, what `train --precise-bn` does); and the same with
dropout on. A large gap between the first and the others says the running averages lag the
weights; a gap between the last two would say dropout shifts the variances BatchNorm sees.
With --test it also reports what re-estimation (dropout off) does to the test accuracy, with
test-time augmentation when the run trained on flips: for reporting a decision made on
validation, never for making it. Prints a table and appends it to
benchmarks/results/batchnorm-lag-<cpu>.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from throughput import RESULTS, machine_info, machine_slug

from imgflow.errors import UserError
from imgflow.fileio import read_json, write_json
from imgflow.inference import loss_and_accuracy, predict_logits
from imgflow.precision import set_threads
from imgflow.preprocess import Preprocessing
from imgflow.runs import create_run_model, load_run_data, load_trained_model, read_run_config
from imgflow.training.batchnorm import batchnorm_sample, reestimate_batchnorm
from imgflow.training.config import TrainConfig
from imgflow.training.batches import split_for_training
from imgflow.training.checkpoint import load_checkpoint

log = logging.getLogger("benchmarks.batchnorm_lag")


def _weights(run_dir: Path, from_checkpoint: bool):
    """(model, run config, where the weights came from)."""
    if not from_checkpoint:
        model, run = load_trained_model(run_dir)
        return model, run, "model.safetensors"
    run = read_run_config(run_dir)
    model = create_run_model(run)
    state = load_checkpoint(run_dir / "checkpoint" / "state.pt")
    model.load_state_dict(state["model"])
    return model, run, f"checkpoint after {state['epoch']} epochs and {state['step']} steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", action="store_true", help="use checkpoint/state.pt (a run in progress)")
    parser.add_argument("--images", type=int, default=5000, help="training images to re-estimate on")
    parser.add_argument("--val-images", type=int, default=2000, help="validation images to score (0 = all)")
    parser.add_argument("--test", action="store_true", help="also report test accuracy before and after")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)

    model, run, source = _weights(args.run_dir, args.checkpoint)
    config = TrainConfig.from_dict(run["train"])
    dataset = load_run_data(run["train"])
    train_part, val_part = split_for_training(dataset.train, config)
    if val_part is None:
        raise SystemExit(f"{args.run_dir} trained without a validation part: nothing to score on")
    val_images = val_part.images[:args.val_images or None]
    val_labels = val_part.labels[:args.val_images or None]
    prep = Preprocessing.from_dict(run["preprocessing"])
    sample = train_part.images[batchnorm_sample(len(train_part), args.images, config.seed)]
    original = {k: v.clone() for k, v in model.state_dict().items()}

    tta = "flip" in config.augment
    scores, test = {}, {}

    def score(name: str, on_test: bool) -> None:
        """Validation accuracy of the model as it is now, and test accuracy if asked."""
        model.eval()
        scores[name] = loss_and_accuracy(predict_logits(model, val_images, prep), val_labels)["accuracy"]
        if on_test:
            test[name] = loss_and_accuracy(predict_logits(model, dataset.test.images, prep, tta=tta),
                                           dataset.test.labels)["accuracy"]

    score("running averages", args.test)
    reestimate_batchnorm(model, sample, prep)
    score("re-estimated, dropout off", args.test)
    model.load_state_dict(original)
    with torch.random.fork_rng():  # dropout's draws, seeded, without touching the caller's RNG
        torch.manual_seed(0)
        reestimate_batchnorm(model, sample, prep, dropout=True)
    score("re-estimated, dropout on", on_test=False)

    print(f"{args.run_dir} ({run['model']['name']}, {source}); validation accuracy on {len(val_labels):,} images:")
    for name, accuracy in scores.items():
        print(f"  {name:<28} {accuracy:.4f}")
    if test:
        print(f"test accuracy on {len(dataset.test):,} images{' with TTA' if tta else ''}:")
        for name, accuracy in test.items():
            print(f"  {name:<28} {accuracy:.4f}")
    machine = machine_info(threads)
    path = RESULTS / f"batchnorm-lag-{machine_slug(machine)}.json"
    results = read_json(path, "results") if path.is_file() else []
    results.append({"run": str(args.run_dir), "model": run["model"]["name"], "weights": source,
                    "seed": config.seed, "train_images": len(sample), "val_images": len(val_labels),
                    "val_accuracy": scores, "test_accuracy": test or None, "tta": tta if test else None,
                    "machine": machine,
                    "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    write_json(path, results)


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a wrong run directory, a damaged file: one line, exit 2
        print(f"batchnorm_lag: error: {exc}", file=sys.stderr)
        sys.exit(2)
