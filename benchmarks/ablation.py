"""Ablation of a preset: the same preset and seed with several option sets, scored on validation.

    python benchmarks/ablation.py --preset fast --seeds 0 \
        --variant "plain=--epochs 4" \
        --variant "airbench=--epochs 4 --bn-lr-scale 64 --lookahead 5 --flip alternate --lr-floor 0.07"

Each (variant, seed) is one `imgflow train DATA --preset P --seed S [OPTIONS]` run in a fresh
process, under RUNS/<variant>-seed<S>. A directory that already holds a finished run is reused
through `--resume`, which refuses if its options differ, so a series can be extended with new
variants or seeds, or re-tabulated, without training again. The score is the last epoch's
validation accuracy: choosing a recipe must not look at the test split. With --tta, each run is
also scored on validation with airbench94's six test-time views, averaged two ways: their
probabilities (imgflow's `evaluate --tta`) and their logits (airbench's). Training seconds are
recorded, but runs that shared the cores with other work are slower: compare speed with
benchmarks/throughput.py, not here. Results: benchmarks/results/ablation-<preset>-<cpu>.json.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from run_command import run_to_end
from summary import grouped, mean_std
from throughput import RESULTS, machine_info, machine_slug

from imgflow.fileio import read_json, write_json
from imgflow.precision import default_threads
from imgflow.training.config import PRESETS
from imgflow.history import read_history

log = logging.getLogger("benchmarks.ablation")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name=--opt value ...' -> (name, [options])."""
    name, sep, options = text.partition("=")
    if not sep or not name.strip() or "/" in name:
        raise ValueError(f"--variant {text!r}: expected NAME=OPTIONS, e.g. \"plain=--epochs 4\"")
    return name.strip(), shlex.split(options)


def run_one(data: str, preset: str, variant: str, options: list[str], seed: int, runs_dir: Path) -> dict:
    """Train (or reuse) one run; return its record."""
    run_dir = runs_dir / f"{variant}-seed{seed}"
    command = [sys.executable, "-m", "imgflow", "train", data, "--preset", preset, "--seed", str(seed),
               "--out", str(run_dir), *options]
    if run_dir.is_dir():
        command.append("--resume")  # finished: nothing to do; interrupted: continue; other options: refused
    run_to_end(command)
    history = read_history(run_dir / "history.csv")
    config = read_json(run_dir / "config.json", "run config")
    last = history[-1]
    return {"variant": variant, "options": options, "seed": seed, "preset": preset, "data": data,
            "model": config["train"]["model"], "epochs": len(history),
            "val_accuracy": last["val_acc"], "val_loss": last["val_loss"],
            "train_seconds": config["result"]["train_seconds"], "run_dir": str(run_dir),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def tta_accuracies(run_dir: Path) -> dict[str, float]:
    """Validation accuracy of a finished run with the six-view TTA, per way of averaging the views."""
    from imgflow.inference import TTA_AVERAGES, loss_and_accuracy, model_device, predict_logits
    from imgflow.precision import resolve_precision, set_threads
    from imgflow.preprocess import Preprocessing
    from imgflow.runs import load_run_data, load_trained_model
    from imgflow.training.batches import split_for_training
    from imgflow.training.config import TrainConfig

    model, config = load_trained_model(run_dir)
    train = config["train"]
    _, val = split_for_training(load_run_data(train).train, TrainConfig.from_dict(train))
    prep = Preprocessing.from_dict(config["preprocessing"])
    precision = resolve_precision(train.get("precision", "fp32"), model_device(model))
    set_threads(train.get("threads"))
    return {average: round(loss_and_accuracy(predict_logits(model, val.images, prep, precision, tta=True,
                                                            tta_average=average), val.labels)["accuracy"], 4)
            for average in TTA_AVERAGES}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean +- std of the validation accuracy per variant, in the order the variants first appear
    (and with TTA, per way of averaging, where every run of the variant was so scored)."""
    rows = []
    for variant, rs in grouped(runs, lambda r: r["variant"]).items():
        acc, acc_sd = mean_std([r["val_accuracy"] for r in rs])
        row = {"variant": variant, "options": rs[0]["options"], "n": len(rs), "epochs": rs[0]["epochs"],
               "seeds": sorted(r["seed"] for r in rs),
               "val_accuracy_mean": round(acc, 4), "val_accuracy_std": round(acc_sd, 4)}
        if all("val_accuracy_tta" in r for r in rs):
            for average in rs[0]["val_accuracy_tta"]:
                m, sd = mean_std([r["val_accuracy_tta"][average] for r in rs])
                row[f"val_tta_{average}_accuracy_mean"], row[f"val_tta_{average}_accuracy_std"] = round(m, 4), round(sd, 4)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10")
    p.add_argument("--preset", default="fast", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=OPTIONS",
                   help='a named set of train options, e.g. "plain=--epochs 4"; repeat for each variant')
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/ablation-<preset>-<cpu>.json)")
    p.add_argument("--tta", action="store_true",
                   help="also score each run on validation with six-view TTA, averaging probabilities and logits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.preset not in PRESETS:
        print(f"ablation: unknown preset {args.preset!r}: use one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 2
    if PRESETS[args.preset].get("val_split", 0.2) == 0 and not all("--val-split" in o for _, o in variants):
        print(f"ablation: preset {args.preset!r} trains without a validation split; give every variant "
              "a --val-split (e.g. \"name=--val-split 0.2 ...\")", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    machine = machine_info(default_threads())
    out = args.out or RESULTS / f"ablation-{args.preset}-{machine_slug(machine)}.json"
    runs = []
    for seed in seeds:
        for name, options in variants:
            log.info("%s seed %d: %s", name, seed, " ".join(options) or "(preset as is)")
            try:
                runs.append(run_one(args.data, args.preset, name, options, seed, args.runs_dir))
            except subprocess.CalledProcessError as exc:  # imgflow printed why, in one line, above
                print(f"ablation: imgflow train failed for variant {name!r} seed {seed} (exit {exc.returncode}); "
                      f"results so far are in {out if runs else 'no file'}", file=sys.stderr)
                return 2
            if args.tta:
                runs[-1]["val_accuracy_tta"] = tta_accuracies(Path(runs[-1]["run_dir"]))
            log.info("%s seed %d: validation accuracy %.4f%s", name, seed, runs[-1]["val_accuracy"],
                     f", with TTA {runs[-1]['val_accuracy_tta']}" if args.tta else "")
            write_json(out, {"benchmark": "ablation", "preset": args.preset, "preset_settings": PRESETS[args.preset],
                             "machine": machine, "runs": runs, "summary": summarise(runs)})
    for row in summarise(runs):
        print(f"{row['variant']:<16} n={row['n']} epochs={row['epochs']} val accuracy "
              f"{row['val_accuracy_mean']:.4f} ± {row['val_accuracy_std']:.4f}  {' '.join(row['options'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
