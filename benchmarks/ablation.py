"""Ablation of a preset: the same preset and seed with several option sets, scored on validation.

    python benchmarks/ablation.py --preset fast --seeds 0 \
        --variant "plain=--epochs 4" \
        --variant "airbench=--epochs 4 --bn-lr-scale 64 --lookahead 5 --flip alternate --lr-floor 0.07"

Each (variant, seed) is one `imgflow train DATA --preset P --seed S [OPTIONS]` run in a fresh
process, under RUNS/<variant>-seed<S>. A directory that already holds a finished run is reused
through `--resume`, which refuses if its options differ, so a series can be extended with new
variants or seeds, or re-tabulated, without training again. The score is the last epoch's
validation accuracy: choosing a recipe must not look at the test split. Training seconds are
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


def summarise(runs: list[dict]) -> list[dict]:
    """Mean +- std of the validation accuracy per variant, in the order the variants first appear."""
    rows = []
    for variant, rs in grouped(runs, lambda r: r["variant"]).items():
        acc, acc_sd = mean_std([r["val_accuracy"] for r in rs])
        rows.append({"variant": variant, "options": rs[0]["options"], "n": len(rs), "epochs": rs[0]["epochs"],
                     "seeds": sorted(r["seed"] for r in rs),
                     "val_accuracy_mean": round(acc, 4), "val_accuracy_std": round(acc_sd, 4)})
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
            log.info("%s seed %d: validation accuracy %.4f", name, seed, runs[-1]["val_accuracy"])
            write_json(out, {"benchmark": "ablation", "preset": args.preset, "preset_settings": PRESETS[args.preset],
                             "machine": machine, "runs": runs, "summary": summarise(runs)})
    for row in summarise(runs):
        print(f"{row['variant']:<16} n={row['n']} epochs={row['epochs']} val accuracy "
              f"{row['val_accuracy_mean']:.4f} ± {row['val_accuracy_std']:.4f}  {' '.join(row['options'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
