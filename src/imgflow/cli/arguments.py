"""argparse pieces: one-line errors, argument types, and `train`'s options built from the
TrainConfig option table (training/config.py), with the defaults shown in --help."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from imgflow.errors import UserError
from imgflow.training.config import (DEVICE_HELP, DEVICE_METAVAR, PRESETS, TRAIN_OPTIONS, TrainConfig,
                                     config_to_train, default_of)

DATA_HELP = "cifar10, fashion-mnist, a folder/.zip/.tar(.gz) of images, or a .npz of arrays"


def other_rank() -> bool:
    """True in a process that torchrun started as rank 1, 2, ... of several: it says nothing (rank
    0 prints every message and error once) but exits with the same status."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1 and rank != "0"


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line ('imgflow: error: ...') and exit 2, without usage spam."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, None if other_rank() else f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def path(text: str) -> str:
    """A path argument. An empty one would silently mean the current directory (a run written
    into it, or it read as a data set), so it is refused."""
    if not text:
        raise argparse.ArgumentTypeError("empty path: give a path (use . for the current directory)")
    return text


def image_size(text: str) -> tuple[int, int]:
    """'32' or '32x48' (height x width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW such as 32 or 32x48, got {text!r}")
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW such as 32 or 32x48, got {text!r}")
    return sizes[0], sizes[1]


def add_device_argument(p: argparse.ArgumentParser, what: str = "") -> None:
    """--device for a command that runs a model (train and tune have it from the option table)."""
    p.add_argument("--device", default="auto", metavar=DEVICE_METAVAR,
                   help=f"{what}{DEVICE_HELP} (default: auto)")


def learning_rate(text: str) -> float | str:
    """A number, or 'find' (train: run the lr range test first and train at its suggestion)."""
    from imgflow.training.config import LR_FIND

    if text.strip().lower() == LR_FIND:
        return LR_FIND
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{LR_FIND}', got {text!r}") from None


_TYPES = {"float": float, "str": str, "positive_int": positive_int, "non_negative_int": non_negative_int,
          "image_size": image_size, "lr": learning_rate}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The `imgflow train` options."""
    p.add_argument("data", nargs="?", type=path, help=f"{DATA_HELP} (with --resume: taken from the "
                   "run's config.json when left out)")
    p.add_argument("--out", type=path, default=None, help="run directory (default: runs/<model>-seed<N>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out, with the options it was started with")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    add_config_arguments(p)


def add_config_arguments(p: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """The options that make a TrainConfig (`train`'s, and the base configuration of `tune`).

    Their argparse defaults are None, so that a preset can fill what is not given; --help shows
    the value a run gets without a preset. leave_out: fields a command has no use for (lr-find's lr).
    """
    p.add_argument("--preset", help=f"named configuration: {', '.join(PRESETS)} (its values are the "
                   "defaults; options given win)")
    for option in (option for option in TRAIN_OPTIONS if option.field not in leave_out):
        if option.kind == "flag":  # None when not given, as the others: a preset may set it
            p.add_argument(option.flag, action="store_true", default=None, help=option.help)
            continue
        p.add_argument(option.flag, type=_TYPES[option.kind], choices=option.choices, metavar=option.metavar,
                       help=(option.help + _shown_default(option.field)).strip() or None)


def _shown_default(field: str) -> str:
    default = default_of(field)
    if default is dataclasses.MISSING or default is None:  # model; threads and image_size say theirs
        return ""
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values given on the command line (None: not given, or not an option of this command)."""
    return {option.field: getattr(args, option.field, None) for option in TRAIN_OPTIONS}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """`train`'s TrainConfig: defaults, preset, options; with --resume, the run's own options."""
    from imgflow.training.config import LR_FIND
    from imgflow.training.rundir import started_config

    started = started_config(Path(args.out)) if args.resume and args.out and args.preset is None else None
    if args.data is None and started is None:
        raise UserError("no DATA given: name a data set (cifar10, fashion-mnist) or an image folder/archive"
                        + ("; or continue a run with --resume --out RUN_DIR" if args.resume else ""))
    overrides = overrides_from_args(args)
    if overrides["lr"] == LR_FIND:
        # Stands for the lr until lr-find has run (train_at_found_lr); a resumed run keeps its own.
        overrides["lr"] = None
    config = config_to_train(args.data, overrides, args.preset, started)
    if args.out is None:
        from imgflow.training.rundir import default_run_dir

        args.out = str(default_run_dir(config))
    return config
