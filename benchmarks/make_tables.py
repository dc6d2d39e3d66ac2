"""Markdown tables from benchmarks/results/*.json, for the README.

    python benchmarks/make_tables.py            # prints, and writes benchmarks/results/TABLES.md

One performance table per throughput-*.json (each names its machine: numbers from different
machines are never mixed in one table), and one time-to-accuracy table per
time_to_accuracy*.json, beside the reference notebook's numbers, and one table per ablation-*.json
and per transfer-*.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The reference notebook (Keras, 20 epochs, last 20% of the training set held out), as measured
# in issue 5 on a 2-core Zen 4: ~89 min in Keras/TF-CPU, ~52 min in imgflow with bf16.
NOTEBOOK_ROWS = [
    ("notebook: seed-baseline (Keras)", "20", "-", "0.68", "reference notebook"),
    ("notebook: seed-batchnorm (Keras)", "20", "~89 min (TF-CPU, 2-core Zen 4)", "0.8318", "reference notebook"),
]


def describe_machine(m: dict) -> str:
    flags = m.get("flags", {})
    simd = "AVX-512" if flags.get("avx512f") else "AVX2" if flags.get("avx2") else "no AVX2"
    bf16 = "native bf16" if m.get("native_bf16") else "no native bf16"
    family = f" (family {m['cpu_family']} model {m['cpu_model']})" if m.get("cpu_family") else ""
    vm = ", virtualised" if m.get("hypervisor") else ""
    threads = "/".join(map(str, m.get("threads_measured") or [m.get("threads", "?")]))
    load = m.get("load_average_1_5_15")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    gpu = (m.get("device") or {}).get("gpu")
    on = f"GPU {gpu} ({m['device']['build']} build), host " if gpu else ""
    return (f"{on}{m.get('cpu', '?')}{family}{vm}, {m.get('logical_cpus', '?')} logical CPUs, {simd}, {bf16}; "
            f"torch {m.get('torch', '?')}, {threads} thread(s){load_text}")


def performance_table(result: dict) -> str:
    peaks = result.get("matmul_peaks") or [{"threads": result["machine"].get("threads"),
                                            **result.get("matmul_peak_gflops", {})}]
    peak_text = "; ".join(f"{p['threads']} thread(s): "
                          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p.items() if k != "threads")
                          for p in peaks)
    env = {k: v for k, v in (result["machine"].get("env") or {}).items() if v}
    lines = [f"Machine: {describe_machine(result['machine'])}. "
             f"Measured {result.get('date', '?')[:10]}"
             + (" with `--quick` (few steps: indicative)" if result.get("quick") else "")
             + (f", environment {', '.join(f'{k}={v}' for k, v in env.items())}" if env else "") + ".",
             f"Matmul peak measured in the same run: {peak_text}.", "",
             "| model | precision | threads | MFLOP/img | train img/s | train GFLOP/s (of peak) "
             "| inference img/s | inference GFLOP/s (of peak) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["pytorch"]:
        def util(key: str) -> str:
            u = r.get(key)
            return f" ({100 * u:.0f}%)" if u is not None else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r.get('threads', '')} | {r['mflop_per_image']:.1f} "
                     f"| {r['train_images_per_second']:,.0f} | {r['train_gflops']:.1f}{util('train_utilisation')} "
                     f"| {r['inference_images_per_second']:,.0f} "
                     f"| {r['inference_gflops']:.1f}{util('inference_utilisation')} |")
    for k in result.get("keras") or []:
        lines.append(f"| {k['model']} (Keras, TF {k['tensorflow']}) | fp32 | | | "
                     f"{k['train_images_per_second']:,.0f} | | {k['inference_images_per_second']:,.0f} | |")
    lines.append("")
    if result.get("tensorflow") is None:
        lines.append("TensorFlow was not installed: no Keras column.")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    lines.append("Training FLOPs are counted as 3x the forward pass; utilisation is against the "
                 "matmul peak of the same precision and thread count.")
    if any((r.get("train_utilisation") or 0) > 1 or (r.get("inference_utilisation") or 0) > 1
           for r in result["pytorch"]):
        lines.append("Utilisation above 100%: the matmul probe is only a lower bound of the peak when "
                     "other processes share the cores (and oneDNN's convolutions can beat a "
                     "1024x1024 `torch.mm`); read those rows as 'at the peak'.")
    return "\n".join(lines)


def _accuracy(summary: dict, kind: str) -> str:
    """A summary row's `kind` (test or val) accuracy: mean ± std over its seeds, or the one value."""
    mean = f"{summary[kind + '_accuracy_mean']:.4f}"
    return f"{mean} ± {summary[kind + '_accuracy_std']:.4f}" if summary["n"] > 1 else mean


def _minutes(mean: float, std: float, n: int) -> str:
    return f"{mean / 60:.1f} ± {std / 60:.1f} min" if n > 1 else f"{mean / 60:.1f} min"


def time_to_accuracy_table(result: dict) -> str:
    lines = [f"Machine: {describe_machine(result['machine'])}.", "",
             "| preset | model | epochs | wall time (train + evaluate) | test accuracy | n seeds | notes |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, epochs, minutes, acc, notes in NOTEBOOK_ROWS:
        lines.append(f"| {name} | | {epochs} | {minutes} | {acc} | 1 | {notes} |")
    for s in result.get("summary", []):
        acc = _accuracy(s, "test")
        notes = [s.get("precision", "")]
        if s.get("tta"):
            notes.append("TTA")
        if s.get("extra"):
            notes.append("`" + " ".join(s["extra"]) + "`")
        if s.get("data") not in (None, "cifar10"):
            notes.append(f"data {s['data']}")
        if s.get("median_epoch_seconds"):
            notes.append(f"median epoch {s['median_epoch_seconds']:,.0f} s")
        if s.get("resumed"):
            notes.append(f"{s['resumed']} run(s) continued across sessions: training loop time")
        if s.get("target"):
            notes.append(f"target {s['target']}")
        lines.append(f"| `{s['preset']}` | {s['model']} | {s['epochs']} "
                     f"| {_minutes(s['total_seconds_mean'], s['total_seconds_std'], s['n'])} "
                     f"| {acc} | {s['n']} | {', '.join(n for n in notes if n)} |")
    return "\n".join(lines)


def ablation_table(result: dict) -> str:
    summary = result.get("summary", [])
    tta = [k for k in ("probabilities", "logits") if any(f"val_tta_{k}_accuracy_mean" in s for s in summary)]
    lines = [f"Machine: {describe_machine(result['machine'])}. Preset `{result['preset']}` plus the "
             "options below; last-epoch validation accuracy (the test split is not used)"
             + (", without TTA and with six-view TTA averaging the views' probabilities or logits." if tta else
                " (no TTA)."), "",
             "| variant | options | epochs | validation accuracy | " + "".join(f"TTA, {k} | " for k in tta) + "seeds |",
             "|---|---|---:|---:|" + "---:|" * len(tta) + "---|"]
    for s in summary:
        accs = [_accuracy(s, "val")] + [_accuracy(s, f"val_tta_{k}") if f"val_tta_{k}_accuracy_mean" in s else "-"
                                        for k in tta]
        lines.append(f"| {s['variant']} | `{' '.join(s['options']) or '-'}` | {s['epochs']} | {' | '.join(accs)} "
                     f"| {', '.join(map(str, s['seeds']))} |")
    return "\n".join(lines)


def batchnorm_lag_table(results: list[dict]) -> str:
    lines = ["Validation accuracy of the same weights with BatchNorm's running averages and with "
             "statistics re-estimated on training images (`benchmarks/batchnorm_lag.py`; test not used).", "",
             "| run | model | weights | seed | running averages | re-estimated, dropout off | re-estimated, dropout on "
             "| train / val images | test: running → re-estimated |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    latest = {(r["run"], r["weights"]): r for r in results}  # a run measured again: its last measurement
    for r in latest.values():
        acc = r["val_accuracy"]
        run = "/".join(Path(r["run"]).parts[-2:])  # e.g. runs/7-augment: the run, not the whole path
        lines.append(f"| {run} | {r['model']} | {r['weights']} | {r['seed']} | {acc['running averages']:.4f} "
                     f"| {acc['re-estimated, dropout off']:.4f} | {acc['re-estimated, dropout on']:.4f} "
                     f"| {r['train_images']:,} / {r['val_images']:,} | {_test_change(r)} |")
    return "\n".join(lines)


def transfer_table(result: dict) -> str:
    b, t = result["backbone"], result["task"]
    backbone_acc = f", test accuracy {b['test_accuracy']:.4f}" if b.get("test_accuracy") is not None else ""
    lines = [f"Machine: {describe_machine(result['machine'])}. Backbone: {b['model']} trained on {b['data']} "
             f"({b.get('preset') or 'no preset'}, {b['epochs']} epochs{backbone_acc}). Task: {t['data']}, "
             f"{t['per_class']} training images per class ({t.get('num_train', '?')}), as {t['size'][0]}x"
             f"{t['size'][1]} RGB; test accuracy on {t.get('num_test', '?')} of its test images. Every arm "
             f"trains with `{' '.join(result['train_options'])}`.", "",
             "| arm | options | test accuracy | seeds | seconds per run |",
             "|---|---|---:|---|---:|"]
    for s in result.get("summary", []):
        acc = _accuracy(s, "test")
        options = " ".join(result.get("arms", {}).get(s["arm"], [])) or "-"
        lines.append(f"| {s['arm']} | `{options}` | {acc} | {', '.join(map(str, s['seeds']))} "
                     f"| {s['train_seconds_mean']:.0f} |")
    return "\n".join(lines)


def recipes_table(result: dict) -> str:
    """Issue 20's recipe series (recipes-1thread-*.json): one run per core, 1 thread each."""
    lines = [f"Machine: {describe_machine(result['machine'])}. {result['about']}.", "",
             "| recipe | test accuracy | seeds | minutes per run (train + evaluate, 1 thread) |",
             "|---|---:|---|---:|"]
    for s in result.get("summary", []):
        acc = _accuracy(s, "test")
        lines.append(f"| {s['recipe']} | {acc} | {', '.join(map(str, s['seeds']))} | "
                     f"{s['total_seconds_mean'] / 60:.1f} |")
    return "\n".join(lines)


def _test_change(r: dict) -> str:
    test = r.get("test_accuracy")
    if not test:
        return "-"
    return (f"{test['running averages']:.4f} → {test['re-estimated, dropout off']:.4f}"
            + (" (TTA)" if r.get("tta") else ""))


def workflow_table(result: dict) -> str:
    lines = [f"Machine: {describe_machine(result['machine'])}. `imgflow workflow DATA --budget-minutes M "
             "--seed S`; test accuracy of its final run (with TTA where it trained on flips).", "",
             "| data | budget | test accuracy | wall time | seeds | per seed: accuracy, model, final optimiser, epochs |",
             "|---|---:|---:|---:|---|---|"]
    for s in result.get("summary", []):
        runs = [r for r in result["runs"] if (r["data"], r["budget_minutes"]) == (s["data"], s["budget_minutes"])]
        acc = _accuracy(s, "test")
        wall = _minutes(s["elapsed_minutes_mean"] * 60, s["elapsed_minutes_std"] * 60, s["n"])
        detail = "; ".join(f"{r['seed']}: {r['test_accuracy']:.4f}, {r['model']}, {r['final_optimizer']}, "
                           f"{r['final_epochs']}" for r in runs)
        lines.append(f"| {s['data']} | {s['budget_minutes']:g} min | {acc} | {wall} "
                     f"| {', '.join(map(str, s['seeds']))} | {detail} |")
    return "\n".join(lines)


def build(results: Path) -> str:
    parts = ["# Benchmark tables", "",
             f"Generated by `benchmarks/make_tables.py` from `{results.name}/*.json`; do not edit by hand.", ""]
    # Shortest name first: the plain run of a machine before its variants (e.g. -omp-passive).
    throughput = sorted(results.glob("throughput-*.json"), key=lambda p: (len(p.name), p.name))
    tta = sorted(results.glob("time_to_accuracy*.json"), key=lambda p: (len(p.name), p.name))
    for path in throughput:
        parts += [f"## Throughput ({path.name})", "", performance_table(json.loads(path.read_text())), ""]
    for path in tta:
        parts += [f"## Time to accuracy ({path.name})", "", time_to_accuracy_table(json.loads(path.read_text())), ""]
    recipes = sorted(results.glob("recipes-1thread-*.json"))
    for path in recipes:
        parts += [f"## Recipes, one thread per run ({path.name})", "", recipes_table(json.loads(path.read_text())), ""]
    ablations = sorted(results.glob("ablation-*.json"))
    for path in ablations:
        parts += [f"## Ablation ({path.name})", "", ablation_table(json.loads(path.read_text())), ""]
    lags = sorted(results.glob("batchnorm-lag-*.json"))
    for path in lags:
        parts += [f"## BatchNorm statistics ({path.name})", "", batchnorm_lag_table(json.loads(path.read_text())), ""]
    transfers = sorted(results.glob("transfer-*.json"))
    for path in transfers:
        parts += [f"## Transfer from CIFAR-10 ({path.name})", "", transfer_table(json.loads(path.read_text())), ""]
    workflows = sorted(results.glob("workflow-*.json"))
    for path in workflows:
        parts += [f"## The whole workflow ({path.name})", "", workflow_table(json.loads(path.read_text())), ""]
    if not throughput and not tta and not recipes and not ablations and not lags and not transfers and not workflows:
        parts.append("No results yet: run `benchmarks/throughput.py` or `benchmarks/time_to_accuracy.py`.")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of result JSON files")
    p.add_argument("--out", type=Path, help="Markdown file (default RESULTS/TABLES.md); '-' = print only")
    args = p.parse_args(argv)
    text = build(args.results)
    print(text, end="")
    if str(args.out) != "-":
        out = args.out or args.results / "TABLES.md"
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
