"""Command line: parse, validate, call one library function, turn known errors into exit 2.

No ML logic lives here. Heavy modules (torch) are imported inside the command that needs them,
so `imgflow --help` and `imgflow inspect` start quickly.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made two
# threads 2-5x slower than one; on an idle one both policies measured the same
# (benchmarks/results). Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from imgflow.errors import UserError

log = logging.getLogger("imgflow")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line ('imgflow: error: ...') and exit 2, without usage spam."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _path(text: str) -> str:
    """A path argument. An empty one would silently mean the current directory (a run written
    into it, or it read as a data set), so it is refused."""
    if not text:
        raise argparse.ArgumentTypeError("empty path: give a path (use . for the current directory)")
    return text


def _image_size(text: str) -> tuple[int, int]:
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


# ----------------------------------------------------------------------------------------------
# commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from imgflow.data.card import format_card, inspect

    card = inspect(args.data, out_dir=Path(args.out), image_size=args.image_size)
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(format_card(card))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from imgflow.models import describe_models, format_models

    rows = describe_models(num_classes=args.num_classes, in_channels=args.channels,
                           image_size=args.image_size)
    print(json.dumps(rows, indent=2) if args.json else format_models(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imgflow.training.config import config_from_args
    from imgflow.training.loop import train

    config = config_from_args(args)
    result = train(config, Path(args.out), resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgflow.evaluation import evaluate_run, format_metrics

    metrics = evaluate_run(Path(args.run_dir), tta=args.tta)
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from imgflow.reports import compare_runs, report_run

    runs = [Path(r) for r in args.run_dirs]
    if len(runs) == 1:
        path = report_run(runs[0], Path(args.out) if args.out else None)
    else:
        path = compare_runs(runs, Path(args.out or "runs/compare"))
    print(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgflow.predict import format_predictions, predict_files

    inputs, onnx, run_dir = list(args.inputs), args.onnx, None
    if onnx is None and inputs[0].lower().endswith(".onnx"):
        onnx = inputs.pop(0)  # `imgflow predict MODEL.onnx IMAGE...`
    elif onnx is None:
        run_dir = inputs.pop(0)
    elif (Path(inputs[0]) / "config.json").is_file():
        raise UserError(f"give a run directory or --onnx, not both ({inputs[0]} is a run directory)")
    if not inputs:
        raise UserError("no images given: imgflow predict RUN_DIR IMAGE_OR_DIR...")
    results = predict_files(run_dir, inputs, top_k=args.top_k, tta=args.tta, onnx=onnx)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgflow.export import FORMATS, ParityError, export_run, format_parity

    formats = FORMATS if args.format == "all" else (args.format,)
    try:
        report = export_run(Path(args.run_dir), Path(args.out) if args.out else None, formats,
                            progress=sys.stderr.isatty())
    except ParityError as exc:
        print(format_parity(exc.report))
        print(f"imgflow: error: {exc}", file=sys.stderr)
        return 1
    print(format_parity(report))
    return 0


def cmd_reproduce_seed(args: argparse.Namespace) -> int:
    from imgflow.reproduce import PRECISE_BN_IMAGES, reproduce_seed

    table = reproduce_seed(args.data, Path(args.out), precision=args.precision,
                           epochs=args.epochs, models=args.models, seed=args.seed,
                           resume=args.resume, threads=args.threads,
                           precise_bn=PRECISE_BN_IMAGES if args.precise_bn is None else args.precise_bn,
                           test_split=args.test_split)
    print(table)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from imgflow.training.config import overrides_from_args, resolve_config
    from imgflow.tune import format_summary, run_tune

    base = resolve_config(args.data, overrides_from_args(args), preset=args.preset)
    record = run_tune(base, Path(args.out), trials=args.trials, search=args.search,
                      budget_minutes=args.budget_minutes, progress=sys.stderr.isatty())
    print(format_summary(record))
    return 0


def cmd_workflow(args: argparse.Namespace) -> int:
    from imgflow.workflow import format_summary, run_workflow

    record = run_workflow(args.data, Path(args.out), budget_minutes=args.budget_minutes, seed=args.seed,
                          threads=args.threads, image_size=args.image_size)
    print(format_summary(record))
    return 0


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    from imgflow import __version__
    from imgflow.training.config import (THREADS_HELP, add_config_arguments,  # no torch: --help stays quick
                                         add_train_arguments)

    parser = _Parser(prog="imgflow", description="imgflow: the universal workflow of machine learning "
                     "for image classification, from a data set to a tested, exported model.")
    parser.add_argument("--version", action="version", version=f"imgflow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="data set card and example grid")
    p.add_argument("data", type=_path, help="cifar10, fashion-mnist, or a folder/.zip/.tar(.gz) of images")
    p.add_argument("--out", type=_path, default=".", help="directory for examples.png (default: .)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--image-size", type=_image_size, help="resize every image to SIZE or HxW")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="registered models with parameter counts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--num-classes", type=_positive_int, default=10)
    p.add_argument("--channels", type=_positive_int, default=3)
    p.add_argument("--image-size", type=_image_size, default=(32, 32))
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model into a run directory")
    add_train_arguments(p, _positive_int, _non_negative_int, _image_size, _path)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "tune", help="hyperparameter search (Optuna): each trial a training run, judged on validation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the base configuration (a --preset and/or train options) --trials times\n"
                    "with values of the --search options drawn by Optuna's TPE sampler, each into\n"
                    "OUT/trials/NNN, scored by validation accuracy; trials behind the median of\n"
                    "earlier ones at the same epoch are stopped early. Writes OUT/tune.json,\n"
                    "OUT/report.html and prints the 'imgflow train' command of the best trial.\n"
                    "The study is kept in OUT/study.db: the same command again continues it\n"
                    "(an interrupted trial continues its run), and a larger --trials extends it.",
        epilog="Search space: lr (base lr / 10 .. x 10, log), weight-decay (1e-5 .. 1e-2, log),\n"
               "label-smoothing (0 .. 0.3), augment (none | flip | flip+translate |\n"
               "flip+translate+cutout), momentum (0.8 .. 0.95). The test split is never used.")
    p.add_argument("data", type=_path, help="cifar10, fashion-mnist, or a folder/.zip/.tar(.gz) of images")
    p.add_argument("--out", type=_path, required=True, help="study directory (continued when run again)")
    p.add_argument("--trials", type=_positive_int, default=20, help="trials in the study (default 20)")
    p.add_argument("--search", metavar="A,B,...",
                   help="options to search (default lr,weight-decay,label-smoothing,augment)")
    p.add_argument("--budget-minutes", type=float, metavar="M",
                   help="start no new trial after M minutes (the running one finishes)")
    add_config_arguments(p, _positive_int, _non_negative_int, _image_size)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="evaluate a run's model on its test split")
    p.add_argument("run_dir", type=_path)
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flip + shifts)")
    p.add_argument("--json", action="store_true", help="print metrics.json's content")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="HTML report of one run, or several runs side by side")
    p.add_argument("run_dirs", nargs="+", type=_path, metavar="RUN_DIR")
    p.add_argument("--out", type=_path, help="output directory (default: the run directory for one run, "
                                 "runs/compare for several)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "predict", help="classify image files with a run's model or an exported ONNX model",
        usage="imgflow predict RUN_DIR IMAGE_OR_DIR... [--top-k K] [--json] [--tta]\n"
              "       imgflow predict MODEL.onnx IMAGE_OR_DIR... [--top-k K] [--json]\n"
              "       imgflow predict --onnx MODEL.onnx IMAGE_OR_DIR... [--top-k K] [--json]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify image files (any format, size and mode Pillow reads) and directories\n"
                    "of them (recursive; hidden files skipped; image extensions only), with exactly\n"
                    "the preprocessing the model was trained with.\n\n"
                    "With a run directory the model runs in PyTorch, as 'imgflow evaluate' runs it.\n"
                    "With an exported MODEL.onnx (first argument or --onnx) it runs with onnxruntime,\n"
                    "NumPy and Pillow only, reading model.json beside the .onnx file (or the copy\n"
                    "embedded in it); PyTorch is not needed: pip install onnxruntime numpy pillow.",
        epilog="--json prints [{\"image\", \"top\": [{\"class\", \"probability\"}]}]; files that cannot\n"
               "be read get \"top\": [] and an \"error\" and never stop the others.\n"
               "Exit status: 0 when at least one file was classified; 2 when none could be read or\n"
               "the run directory / ONNX model is unusable.")
    p.add_argument("inputs", nargs="+", type=_path, metavar="IMAGE_OR_DIR",
                   help="RUN_DIR or MODEL.onnx (unless --onnx is given), then images/directories")
    p.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                   help="classes shown per image (default 5, at most the number of classes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (flip + shifts), as 'evaluate --tta'; run dirs only")
    p.add_argument("--onnx", type=_path, metavar="MODEL.onnx", help="run an exported ONNX model (no PyTorch)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export", help="export a run's model to ONNX and TorchScript, parity-checked",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write model.onnx (dynamic batch) and/or model.torchscript.pt with model.json\n"
                    "(classes, input size, channel order, mean/std, NCHW float32 input, logits\n"
                    "output) into the out directory. Each export is loaded back and compared with\n"
                    "the PyTorch model on up to 256 images of the run's test split: max |probability\n"
                    "difference| <= 1e-4 and identical top-1, saved in parity.json.",
        epilog="Exit status: 0 exported and parity passed; 1 parity check failed (nothing\n"
               "installed, numbers in parity-failed.json); 2 unusable run directory, bad usage, or an\n"
               "--out holding another model's export (one directory, one model).")
    p.add_argument("run_dir", type=_path)
    p.add_argument("--format", choices=["onnx", "torchscript", "all"], default="all",
                   help="what to export (default all)")
    p.add_argument("--out", type=_path, help="output directory (default RUN_DIR/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reproduce-seed", help="the reference notebook's two experiments")
    p.add_argument("data", nargs="?", type=_path, default="cifar10")
    p.add_argument("--out", type=_path, default="runs/reproduce-seed")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 (default, as the notebook), bf16, or auto (bf16 where the CPU has it natively)")
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--models", nargs="+", default=["seed-baseline", "seed-batchnorm"])
    p.add_argument("--resume", action="store_true", help="continue interrupted runs")
    p.add_argument("--threads", type=_positive_int, help=THREADS_HELP)
    p.add_argument("--test-split", type=float, metavar="F",
                   help="data without a test split: hold out this fraction of each class as one")
    p.add_argument("--precise-bn", type=_non_negative_int, metavar="N",
                   help="also test BatchNorm models with their statistics re-estimated on N training "
                        "images (default 10000; 0 = don't); the runs themselves stay as Keras trains them")
    p.set_defaults(func=cmd_reproduce_seed)

    p = sub.add_parser("workflow", help="the universal workflow of ML, step by step, in a time budget")
    p.add_argument("data", type=_path, help="cifar10, fashion-mnist, or a folder/.zip/.tar(.gz) of images")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="total wall time (default 15)")
    p.add_argument("--out", type=_path, default="runs/workflow", help="output directory (default runs/workflow)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--threads", type=_positive_int, help=THREADS_HELP)
    p.add_argument("--image-size", type=_image_size, metavar="SIZE|HxW",
                   help="train at this size (default: the data's own, or for large images the largest "
                        "of 32-128 px the budget affords)")
    p.set_defaults(func=cmd_workflow)

    return parser


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)
    if verbosity <= -2:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def _escape_unencodable_output() -> None:
    """Print paths whose bytes are not UTF-8 (kept by Python as lone surrogates) as \\x escapes.

    stderr already does this; stdout would raise UnicodeEncodeError mid-output instead.
    """
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR, errno.ENOENT, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose - args.quiet)
    _escape_unencodable_output()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"imgflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = f": {exc}" if str(exc) else ""
        print(f"imgflow: interrupted{detail}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except OSError as exc:
        # The file system refused a path the user gave (an --out that is a file, no permission,
        # disk full): one line. Anything else is a bug and keeps its traceback.
        if exc.filename is None or exc.errno not in _PATH_ERRNOS:
            raise
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            message = f"{exc.filename}: a file stands where a directory is needed (check --out and the paths given)"
        else:
            message = f"{exc.filename}: {exc.strerror} (check the path, and that you may write there)"
        print(f"imgflow: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
