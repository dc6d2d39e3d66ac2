"""Training throughput of one process against several (torchrun) on this machine.

    python benchmarks/ddp_scaling.py [--model fast-small] [--images 5000] [--epochs 2]

Trains the same run (synthetic 32x32 RGB images, the model's own compute is what matters) as
1 process x N threads and as N processes x 1 thread, through `imgflow train` and `torchrun`,
and prints training images per second (of the epochs after the first: start-up and the first
epoch's allocations left out). Writes benchmarks/results/ddp-scaling-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _data(folder: Path, n: int) -> Path:
    from imgflow.data import save_arrays

    rng = np.random.default_rng(0)
    path = folder / "synthetic.npz"
    save_arrays(path, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                [str(i) for i in range(10)])
    return path


def _images_per_second(run_dir: Path) -> float:
    import csv

    config = json.loads((run_dir / "config.json").read_text())
    with open(run_dir / "history.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)][1:]
    return config["data"]["num_train"] / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fast-small")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from imgflow.precision import cpu_info

    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _data(tmp, args.images)
        common = [str(data), "--model", args.model, "--epochs", str(args.epochs), "--batch-size",
                  str(args.batch_size), "--val-split", "0", "--seed", "0"]
        env = {**os.environ, "IMGFLOW_CACHE": str(tmp / "cache")}
        rows = []
        for label, command in [
            (f"1 process x {n} threads", [sys.executable, "-m", "imgflow", "-q", "train", *common,
                                          "--threads", str(n), "--out", str(tmp / "one")]),
            (f"{n} processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", str(n), "-m", "imgflow", "-q", "train", *common,
                                           "--threads", "1", "--out", str(tmp / "many")]),
        ]:
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            run_dir = tmp / ("one" if label.startswith("1 ") else "many")
            rows.append({"setup": label, "images_per_second": round(_images_per_second(run_dir), 1),
                         "precision": json.loads((run_dir / "config.json").read_text())["precision"]})
    machine = cpu_info().get("model name", "?")
    print(f"{args.model}, {args.images} synthetic 32x32 images, batch {args.batch_size}, {machine}")
    print(f"{'setup':<26} {'images/s':>9}  precision")
    for row in rows:
        print(f"{row['setup']:<26} {row['images_per_second']:>9.1f}  {row['precision']}")
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")[:40]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ddp-scaling-{slug}.json").write_text(json.dumps(
        {"model": args.model, "images": args.images, "batch_size": args.batch_size, "machine": machine,
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
