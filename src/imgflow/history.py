"""A run's history.csv: one row per finished epoch, written whole and atomically after each."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from imgflow.errors import MalformedContent, UserError
from imgflow.fileio import atomic_write_text
from imgflow.runs import RunPaths


HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict]:
    """history.csv as a list of dicts with floats (empty cells -> None); a damaged file (not
    UTF-8, missing columns, cells that are not numbers) is a UserError."""
    if not Path(path).is_file():
        raise UserError(f"history not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in HISTORY_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise MalformedContent(f"its header lacks {', '.join(missing)}")
            return [_history_row(row, reader.line_num) for row in reader]
    except UnicodeDecodeError as exc:
        detail = f"byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8 text"
    except (MalformedContent, csv.Error) as exc:
        detail = str(exc)
    raise UserError(f"{path} is not a valid imgflow history: {detail}; restore it, or train the run "
                    "again (imgflow train ... --overwrite)")


def _history_row(row: dict, line: int) -> dict:
    if None in row or None in row.values():  # csv's markers for extra and for missing cells
        raise MalformedContent(f"line {line} does not have one cell per column")
    try:
        parsed = {k: (float(v) if v != "" else None) for k, v in row.items()}
    except ValueError:
        raise MalformedContent(f"line {line} holds a cell that is not a number") from None
    if parsed["epoch"] is None or not parsed["epoch"].is_integer():
        raise MalformedContent(f"line {line} has no whole epoch number")
    parsed["epoch"] = int(parsed["epoch"])
    return parsed


def run_history(run_dir: Path) -> list[dict]:
    """The history of the run in run_dir (read_history of its history.csv)."""
    return read_history(RunPaths(Path(run_dir)).history)
