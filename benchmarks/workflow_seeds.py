"""The whole workflow over several seeds: test accuracy and wall time of `imgflow workflow`.

Each seed runs the command a user would type, in a fresh process (data cache warm: run
`imgflow inspect DATA` once first):

    imgflow workflow DATA --budget-minutes M --seed S --out RUNS/DATA-Mmin-seedS

and records its test accuracy, wall time, the model and candidate it chose and the final run's
epochs and optimiser, from its workflow.json. Results are merged into
benchmarks/results/workflow-<cpu>.json, one entry per (data, budget, seed), so seeds can be added
one by one; the summary gives mean +- std per (data, budget).

    python benchmarks/workflow_seeds.py --data cifar10 --budget-minutes 15 --seeds 0,1,2

A seed whose run directory already holds a finished workflow is re-read, not re-run (the
workflow itself redoes nothing that finished). Never run two at once: the workflow plans its
epochs from the speed it measures.
"""
from __future__ import annotations

import argparse
import logging
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

log = logging.getLogger("benchmarks.workflow_seeds")


def run_one(data: str, minutes: float, seed: int, runs_dir: Path) -> dict:
    """Run (or re-read) one workflow; return its record."""
    out = runs_dir / f"{Path(data).name}-{minutes:g}min-seed{seed}"
    t0 = time.perf_counter()
    run_to_end([sys.executable, "-m", "imgflow", "workflow", data, "--budget-minutes", f"{minutes:g}",
                "--seed", str(seed), "--out", str(out)])
    wall = time.perf_counter() - t0
    record = read_json(out / "workflow.json", "workflow record")
    final = record["steps"][-1]["metrics"]
    scaled = record["state"]["scaled"] or {}
    chosen = record["state"]["chosen"] or {}
    return {"data": data, "budget_minutes": minutes, "seed": seed, "test_accuracy": record["test_accuracy"],
            "elapsed_minutes": record["elapsed_minutes"], "command_seconds": round(wall, 1),
            "model": scaled.get("model"), "chosen": chosen.get("name"), "final_epochs": final.get("epochs"),
            "validated_epochs": final.get("validated_epochs"), "final_optimizer": final.get("recipe_changed_to")
            or (chosen.get("settings") or {}).get("optimizer"), "steps": [step["name"] for step in record["steps"]], "out": str(out),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _key(record: dict) -> tuple:
    return record["data"], record["budget_minutes"], record["seed"]


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for (data, minutes), rs in grouped(runs, lambda r: (r["data"], r["budget_minutes"])).items():
        acc, acc_sd = mean_std([r["test_accuracy"] for r in rs])
        wall, wall_sd = mean_std([r["elapsed_minutes"] for r in rs])
        rows.append({"data": data, "budget_minutes": minutes, "n": len(rs), "seeds": [r["seed"] for r in rs],
                     "test_accuracy_mean": round(acc, 4), "test_accuracy_std": round(acc_sd, 4),
                     "elapsed_minutes_mean": round(wall, 2), "elapsed_minutes_std": round(wall_sd, 2)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="cifar10", help="data set (default cifar10)")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="the workflow's budget (default 15)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/workflow-seeds"), help="where the workflows go")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/workflow-<cpu>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    machine = machine_info(default_threads())
    out = args.out or RESULTS / f"workflow-{machine_slug(machine)}.json"
    previous = read_json(out, "results").get("runs", []) if out.is_file() else []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        try:
            record = run_one(args.data, args.budget_minutes, seed, args.runs_dir)
        except subprocess.CalledProcessError as exc:  # imgflow printed why, in one line, above
            print(f"workflow_seeds: imgflow workflow failed for seed {seed} (exit {exc.returncode}); "
                  f"results so far are in {out if previous else 'no file'}", file=sys.stderr)
            return 2
        log.info("%s, %g min, seed %d: test accuracy %.4f in %.1f min (%s, %s, %d epochs)", args.data,
                 args.budget_minutes, seed, record["test_accuracy"], record["elapsed_minutes"], record["model"],
                 record["final_optimizer"], record["final_epochs"] or 0)
        by_key = {_key(r): r for r in previous}
        by_key[_key(record)] = record
        previous = sorted(by_key.values(), key=_key)
        # Written after every seed: a long series interrupted keeps what it measured.
        write_json(out, {"benchmark": "workflow_seeds", "machine": machine, "runs": previous,
                         "summary": summarise(previous)})
    for row in summarise(previous):
        print(f"{row['data']} {row['budget_minutes']:g} min: {row['test_accuracy_mean']:.4f} ± "
              f"{row['test_accuracy_std']:.4f} over seeds {row['seeds']}, {row['elapsed_minutes_mean']:.1f} ± "
              f"{row['elapsed_minutes_std']:.1f} min")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
