"""`imgflow inspect`: the data set card (a dict, JSON-ready) and its text form.

Card keys (DESIGN.md, stable): name, source, sha256, classes, image_shape [H, W, C],
splits {"train": {"count", "per_class"}, "test": {...} or null}, skipped [{"path", "reason"}],
channel_mean, channel_std (of the training split, in [0, 1] units). Added keys: num_classes,
has_test_split (false when the source has no test split; then splits["test"] is null),
notes (remarks made while loading), examples (path of examples.png).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from imgflow.data.dataset import Dataset, Split
from imgflow.data.examples import save_example_grid
from imgflow.data.load import load_dataset
from imgflow.data.stats import channel_stats
from imgflow.text import plural

log = logging.getLogger(__name__)

_SKIPPED_LISTED = 20  # skipped files named in the text card


def _split_card(split: Split, classes: list[str]) -> dict:
    counts = np.bincount(split.labels, minlength=len(classes))
    return {"count": len(split), "per_class": {c: int(n) for c, n in zip(classes, counts)}}


def make_card(dataset: Dataset) -> dict:
    """The card of an already loaded data set (no files written)."""
    mean, std = channel_stats(dataset.train.images)
    return {
        "name": dataset.name,
        "source": dataset.source,
        "sha256": dataset.sha256,
        "classes": list(dataset.classes),
        "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape),
        "splits": {
            "train": _split_card(dataset.train, dataset.classes),
            "test": None if dataset.test is None else _split_card(dataset.test, dataset.classes),
        },
        "has_test_split": dataset.test is not None,
        "skipped": list(dataset.skipped),
        "channel_mean": [round(m, 6) for m in mean],
        "channel_std": [round(s, 6) for s in std],
        "notes": list(dataset.notes),
    }


def default_inspect_dir(name: str) -> Path:
    """Where `inspect` writes when no directory is given: runs/inspect/<name>/, relative to the
    current directory, so a file never lands in the working directory unannounced."""
    return Path("runs") / "inspect" / (name if name not in ("", ".", "..") else "data")


def inspect(spec: str, out_dir: str | os.PathLike | None = None,
            image_size: tuple[int, int] | None = None) -> dict:
    """Load `spec`, write `out_dir/examples.png`, and return the data set card.

    out_dir: default `default_inspect_dir(<data set name>)`; created if missing. The card's
        "examples" key holds the path written.
    """
    dataset = load_dataset(spec, image_size=image_size)
    card = make_card(dataset)
    folder = Path(out_dir) if out_dir is not None else default_inspect_dir(dataset.name)
    examples = save_example_grid(dataset, folder / "examples.png")  # creates the folder
    log.info("wrote the example grid to %s", examples)
    card["examples"] = str(examples)
    return card


def format_card(card: dict) -> str:
    """The card as readable text: provenance, a table of classes with counts, skipped files."""
    H, W, C = card["image_shape"]
    train, test = card["splits"]["train"], card["splits"].get("test")
    lines = [
        f"{card['name']}: {plural(len(card['classes']), 'class')}, images {H}x{W}x{C}",
        f"  source   {card['source']}",
        f"  sha256   {card['sha256']}",
        f"  train    {plural(train['count'], 'image')}",
        f"  test     {plural(test['count'], 'image')}" if test else "  test     no test split",
        "  channel mean " + " ".join(f"{m:.4f}" for m in card["channel_mean"])
        + "   std " + " ".join(f"{s:.4f}" for s in card["channel_std"])
        + "   (training split, pixels in [0, 1])",
        "",
    ]
    width = max(len("class"), *(len(c) for c in card["classes"]))
    header = f"  {'#':>3}  {'class':<{width}}  {'train':>8}"
    lines.append(header + (f"  {'test':>8}" if test else ""))
    for i, c in enumerate(card["classes"]):
        row = f"  {i:>3}  {c:<{width}}  {train['per_class'][c]:>8,}"
        lines.append(row + (f"  {test['per_class'][c]:>8,}" if test else ""))
    total = f"  {'':>3}  {'total':<{width}}  {train['count']:>8,}"
    lines.append(total + (f"  {test['count']:>8,}" if test else ""))

    notes = card.get("notes") or []
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    skipped = card["skipped"]
    lines.append("")
    if skipped:
        lines.append(f"skipped {plural(len(skipped), 'file')}:")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:_SKIPPED_LISTED]]
        if len(skipped) > _SKIPPED_LISTED:
            lines.append(f"  ... and {len(skipped) - _SKIPPED_LISTED} more (see --json)")
    else:
        lines.append("skipped: none")
    if card.get("examples"):
        lines.append(f"examples: {card['examples']}")
    return "\n".join(lines)
