"""Time to accuracy of the training presets: train + evaluate, wall clock, over several seeds.

Each (preset, seed) runs the real commands a user would type, in a fresh process:

    imgflow train DATA --preset P --seed S --out RUNS/P-seedS --overwrite [EXTRA...]
    imgflow evaluate RUNS/P-seedS [--tta] --json

and records the wall time of both (data cache warm: run `imgflow inspect DATA` once first),
the test accuracy, the epochs run and the machine. Results are merged into
benchmarks/results/time_to_accuracy-<cpu>.json, one entry per (preset, seed, extra options),
so seeds can be added run by run; the summary gives mean +- std per preset.

    python benchmarks/time_to_accuracy.py --presets fast --seeds 0,1,2
    python benchmarks/time_to_accuracy.py --presets best --seeds 0 --extra="--epochs 10"
A full-data `best` run takes ~30 min on a 2-core Zen 4 with bf16 and several hours without it.
With --resume an interrupted run continues (`imgflow train --resume`) instead of starting over,
and a (preset, seed) already in the results file is kept. A continued run's time is the training
loop's own count, which adds up the sessions' epochs (config.json's train_seconds) and leaves out
the interrupted sessions' start-up (seconds, against hours). Ctrl-C lets the training save a
checkpoint first.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run_command import run_to_end
from summary import grouped, mean_std
from throughput import RESULTS, machine_info, machine_slug

from imgflow.fileio import read_json, write_json
from imgflow.precision import default_threads
from imgflow.training.config import PRESET_INFO, PRESETS
from imgflow.history import read_history

log = logging.getLogger("benchmarks.time_to_accuracy")


def _imgflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgflow", *args]


def _train_option(run_dir: Path, resume: bool) -> str:
    """--resume to continue a run started earlier (imgflow refuses one with other options), else --overwrite."""
    return "--resume" if resume and (run_dir / "config.json").is_file() else "--overwrite"


def run_one(data: str, preset: str, seed: int, runs_dir: Path, tta: bool, extra: list[str],
            resume: bool = False) -> dict:
    """Train and evaluate one (preset, seed) in subprocesses; return the timed record."""
    run_dir = runs_dir / f"{preset}-seed{seed}"
    option = _train_option(run_dir, resume)
    t0 = time.perf_counter()
    run_to_end(_imgflow("train", data, "--preset", preset, "--seed", str(seed), "--out", str(run_dir),
                        option, *extra))
    t1 = time.perf_counter()
    out = subprocess.run(_imgflow("-q", "evaluate", str(run_dir), *(["--tta"] if tta else []), "--json"),
                         check=True, capture_output=True, text=True).stdout
    t2 = time.perf_counter()
    metrics = json.loads(out)
    config = read_json(run_dir / "config.json", "run config")
    engine_seconds = config["result"]["train_seconds"]
    # A run finished in this process is timed by the clock; one continued across processes by the
    # loop's own count of all its sessions (this process alone would miss the earlier ones).
    continued = option == "--resume"
    # Robust to an epoch slowed by another job, unlike the total (which a resumed run sums).
    epoch_seconds = [row["seconds"] for row in read_history(run_dir / "history.csv")]
    train_seconds = engine_seconds if continued else round(t1 - t0, 2)
    return {
        "preset": preset, "seed": seed, "extra": extra, "data": data,
        "model": config["train"]["model"], "epochs": config["result"]["epochs_run"],
        "batch_size": config["train"]["batch_size"], "precision": config["precision"],
        "threads": config["threads"], "num_train": config["data"]["num_train"],
        "tta": tta, "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
        "train_seconds": train_seconds,  # not resumed: whole process (start-up, data, training, saving)
        "engine_train_seconds": engine_seconds,  # the loop alone, summed over sessions
        "resumed": continued,
        "median_epoch_seconds": round(statistics.median(epoch_seconds), 1) if epoch_seconds else None,
        "evaluate_seconds": round(t2 - t1, 2),
        "total_seconds": round(train_seconds + t2 - t1, 2),
        "run_dir": str(run_dir),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _key(record: dict) -> tuple:
    return record["preset"], record["seed"], tuple(record.get("extra") or ()), record.get("data")


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Replace entries with the same (preset, seed, extra, data); keep the rest; stable order."""
    by_key = {_key(r): r for r in existing}
    for r in new:
        by_key[_key(r)] = r
    return sorted(by_key.values(), key=lambda r: (r["preset"], " ".join(r.get("extra") or ()), r["seed"]))


def _median_of(values: list[float | None]) -> float | None:
    """Median of the runs that recorded one (records from before the field have None)."""
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def summarise(runs: list[dict]) -> list[dict]:
    """Mean +- std of accuracy and wall time per (preset, extra options, data)."""
    rows = []
    for (preset, extra, data), rs in grouped(runs, lambda r: (r["preset"], tuple(r.get("extra") or ()),
                                                             r.get("data"))).items():
        acc, acc_sd = mean_std([r["test_accuracy"] for r in rs])
        sec, sec_sd = mean_std([r["total_seconds"] for r in rs])
        rows.append({"preset": preset, "extra": list(extra), "data": data, "model": rs[0]["model"],
                     "epochs": rs[0]["epochs"], "n": len(rs), "tta": rs[0]["tta"],
                     "precision": rs[0]["precision"],
                     "resumed": sum(bool(r.get("resumed")) for r in rs),
                     "median_epoch_seconds": _median_of([r.get("median_epoch_seconds") for r in rs]),
                     "test_accuracy_mean": round(acc, 4), "test_accuracy_std": round(acc_sd, 4),
                     "total_seconds_mean": round(sec, 1), "total_seconds_std": round(sec_sd, 1),
                     "target": PRESET_INFO.get(preset, {}).get("target")})
    return rows


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'preset':<9} {'extra':<22} {'n':>2} {'epochs':>6} {'minutes':>14} {'test accuracy':>16}  target"]
    for r in rows:
        lines.append(f"{r['preset']:<9} {' '.join(r['extra']) or '-':<22} {r['n']:>2} {r['epochs']:>6} "
                     f"{r['total_seconds_mean'] / 60:>7.2f} ± {r['total_seconds_std'] / 60:<4.2f} "
                     f"{r['test_accuracy_mean']:>8.4f} ± {r['test_accuracy_std']:.4f}  {r['target'] or '-'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10", help="data set (default cifar10)")
    p.add_argument("--presets", default="fast", help=f"comma-separated, of: {', '.join(PRESETS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/time-to-accuracy"),
                   help="where the run directories go")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="evaluate with test-time augmentation (default: as the preset says)")
    tta.add_argument("--no-tta", dest="tta", action="store_false")
    p.add_argument("--extra", default="", help='more train options, e.g. --extra="--epochs 3"')
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same preset and seed instead of starting over")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/time_to_accuracy-<cpu>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        print(f"time_to_accuracy: unknown preset {unknown[0]!r}: use one of {', '.join(PRESETS)}",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra = shlex.split(args.extra)
    machine = machine_info(default_threads())
    out = args.out or RESULTS / f"time_to_accuracy-{machine_slug(machine)}.json"
    previous = read_json(out, "results") if out.is_file() else {}

    new = []
    for preset in presets:
        tta = PRESET_INFO.get(preset, {}).get("tta", False) if args.tta is None else args.tta
        for seed in seeds:
            key = _key({"preset": preset, "seed": seed, "extra": extra, "data": args.data})
            if args.resume and any(_key(r) == key for r in previous.get("runs", [])):
                log.info("%s seed %d: already measured in %s; kept", preset, seed, out)
                continue
            log.info("%s seed %d: training and evaluating%s ...", preset, seed, " (TTA)" if tta else "")
            record = run_one(args.data, preset, seed, args.runs_dir, tta, extra, args.resume)
            log.info("%s seed %d: test accuracy %.4f in %.1f s (train %.1f s, evaluate %.1f s)",
                     preset, seed, record["test_accuracy"], record["total_seconds"],
                     record["train_seconds"], record["evaluate_seconds"])
            new.append(record)
            # Write after every run: a long series interrupted keeps what it measured.
            runs = merge(previous.get("runs", []), new)
            write_json(out, {"benchmark": "time_to_accuracy", "machine": machine,
                             "presets": {p: PRESETS.get(p) for p in sorted({r["preset"] for r in runs})},
                             "runs": runs, "summary": summarise(runs)})
    summary = summarise(merge(previous.get("runs", []), new))
    print(format_summary(summary))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
