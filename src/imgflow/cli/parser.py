"""The `imgflow` command line: one function per command adds its options."""
from __future__ import annotations

import argparse

from imgflow.cli import commands
from imgflow.cli.arguments import (DATA_HELP, Parser, add_config_arguments, add_device_argument, add_train_arguments,
                                   image_size, non_negative_int, path, positive_int)
from imgflow.training.config import THREADS_HELP

_RAW = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    from imgflow.version import __version__

    parser = Parser(prog="imgflow", description="imgflow: the universal workflow of machine learning "
                    "for image classification, from a data set to a tested, exported model.")
    parser.add_argument("--version", action=_Version, version=f"imgflow {__version__}",
                        help="show the version, the PyTorch build and the device 'auto' picks, and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in (_add_inspect, _add_models, _add_train, _add_lr_find, _add_tune, _add_evaluate, _add_report,
                _add_predict, _add_export, _add_reproduce_seed, _add_workflow, _add_serve):
        add(sub)
    return parser


class _Version(argparse.Action):
    """--version: imgflow's version, then torch's build and device (torch imported only now)."""

    def __init__(self, option_strings, version: str, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)
        self.version = version

    def __call__(self, parser, namespace, values, option_string=None):
        from imgflow.device import device_line

        print(f"{self.version}\n{device_line()}")  # to stdout, as argparse's own version action
        parser.exit()


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="data set card and example grid")
    p.add_argument("data", type=path, help=DATA_HELP)
    p.add_argument("--out", type=path, help="directory for examples.png (default: runs/inspect/<data set>)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--image-size", type=image_size, help="resize every image to SIZE or HxW")
    p.set_defaults(func=commands.cmd_inspect)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="registered models with parameter counts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--num-classes", type=positive_int, default=10, help="(default: 10)")
    p.add_argument("--channels", type=positive_int, default=3, help="(default: 3)")
    p.add_argument("--image-size", type=image_size, default=(32, 32), help="(default: 32x32)")
    p.set_defaults(func=commands.cmd_models)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run directory",
                       description="Train one model into a run directory. Without --preset the defaults "
                                   "are the reference notebook's (shown below); a --preset sets its own "
                                   "values, and any option given wins over both.")
    add_train_arguments(p)
    p.set_defaults(func=commands.cmd_train)


def _add_lr_find(sub) -> None:
    p = sub.add_parser(
        "lr-find", help="learning-rate range test: suggest an lr for a model and its train options",
        formatter_class=_RAW, allow_abbrev=False,  # without --lr, '--lr X' would abbreviate --lr-floor
        description="Train a throwaway copy of the model that the train options describe for at most\n"
                    "--steps steps, the learning rate growing exponentially from --start-lr to --end-lr,\n"
                    "stopping once the smoothed loss passes 4x its lowest. Prints the suggested lr and the\n"
                    "rule that chose it (the valley rule), and writes lr_find.png (loss against lr on a log\n"
                    "axis, the suggestion marked) and lr_find.csv (lr, loss, smoothed_loss) into --out.\n"
                    "No run is touched; the same options and --seed give the same suggestion.\n"
                    "'imgflow train ... --lr find' runs this first and trains at the suggestion.")
    p.add_argument("data", type=path, help=DATA_HELP)
    p.add_argument("--out", type=path, help="directory for lr_find.png and lr_find.csv "
                                            "(default: runs/lr-find/<model>)")
    p.add_argument("--steps", type=positive_int, metavar="N", help="steps at most, 10 or more (default: 100)")
    p.add_argument("--start-lr", type=float, metavar="F", help="lr of the first step (default: 1e-07)")
    p.add_argument("--end-lr", type=float, metavar="F", help="lr of the last step (default: 10)")
    add_config_arguments(p, leave_out=("lr",))
    p.set_defaults(func=commands.cmd_lr_find)


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune", help="hyperparameter search (Optuna): each trial a training run, judged on validation",
        formatter_class=_RAW,
        description="Train the base configuration (a --preset and/or train options) --trials times\n"
                    "with values of the --search options drawn by Optuna's TPE sampler, each into\n"
                    "OUT/trials/NNN, scored by validation accuracy; trials behind the median of\n"
                    "earlier ones at the same epoch are stopped early. Writes OUT/tune.json,\n"
                    "OUT/report.html and prints the 'imgflow train' command of the best trial.\n"
                    "The study is kept in OUT/study.db: the same command again continues it\n"
                    "(an interrupted trial continues its run), and a larger --trials extends it.\n"
                    "Several workers share one study with --storage: start the same command in\n"
                    "several processes with --storage journal:OUT.log (one machine), or on several\n"
                    "machines with --storage postgresql://user:password@host/db (or mysql://).",
        epilog="Search space: lr (base lr / 10 .. x 10, log), weight-decay (1e-5 .. 1e-2, log),\n"
               "label-smoothing (0 .. 0.3), augment (none | flip | flip+translate |\n"
               "flip+translate+cutout), momentum (0.8 .. 0.95). The test split is never used.")
    p.add_argument("data", type=path, help=DATA_HELP)
    p.add_argument("--out", type=path, required=True, help="study directory (continued when run again)")
    p.add_argument("--trials", type=positive_int, default=20, help="trials in the study (default: 20)")
    p.add_argument("--search", metavar="A,B,...",
                   help="options to search (default: lr,weight-decay,label-smoothing,augment)")
    p.add_argument("--budget-minutes", type=float, metavar="M",
                   help="start no new trial after M minutes (the running one finishes)")
    p.add_argument("--storage", metavar="URL",
                   help="where the study lives, shared by every worker given the same: journal:PATH (or a "
                        "PATH ending in .log) for processes on one machine, a database URL "
                        "(postgresql://, mysql://, sqlite:///) across machines (default: OUT/study.db)")
    add_config_arguments(p)
    p.set_defaults(func=commands.cmd_tune)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's model on its test split")
    p.add_argument("run_dir", type=path)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (flip + shifts; photo runs: flip + crops)")
    p.add_argument("--json", action="store_true", help="print metrics.json's content")
    add_device_argument(p)
    p.set_defaults(func=commands.cmd_evaluate)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="HTML report of a run or a workflow, or several runs side by side")
    p.add_argument("run_dirs", nargs="+", type=path, metavar="RUN_DIR",
                   help="a run directory, a workflow's --out, or several run directories to compare")
    p.add_argument("--out", type=path, help="output directory (default: the run directory for one run, "
                                            "runs/compare for several)")
    p.set_defaults(func=commands.cmd_report)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="classify image files with a run's model or an exported ONNX model",
        usage="imgflow predict RUN_DIR IMAGE_OR_DIR... [--top-k K] [--json] [--tta]\n"
              "       imgflow predict MODEL.onnx IMAGE_OR_DIR... [--top-k K] [--json]\n"
              "       imgflow predict --onnx MODEL.onnx IMAGE_OR_DIR... [--top-k K] [--json]",
        formatter_class=_RAW,
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
    p.add_argument("inputs", nargs="+", type=path, metavar="IMAGE_OR_DIR",
                   help="RUN_DIR or MODEL.onnx (unless --onnx is given), then images/directories")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="classes shown per image (default: 5, at most the number of classes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (flip + shifts; photo runs: flip + crops), as 'evaluate --tta'; "
                        "run dirs only")
    p.add_argument("--onnx", type=path, metavar="MODEL.onnx", help="run an exported ONNX model (no PyTorch)")
    add_device_argument(p, "run dirs only (ONNX models run on the CPU); ")
    p.set_defaults(func=commands.cmd_predict)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="export a run's model to ONNX and TorchScript, parity-checked",
        formatter_class=_RAW,
        description="Write model.onnx (dynamic batch) and/or model.torchscript.pt with model.json\n"
                    "(classes, input size, channel order, mean/std, NCHW float32 input, logits\n"
                    "output) into the out directory. Each export is loaded back and compared with\n"
                    "the PyTorch model on up to 256 images of the run's test split: max |probability\n"
                    "difference| <= 1e-4 and identical top-1, saved in parity.json.",
        epilog="Exit status: 0 exported and parity passed; 1 parity check failed (nothing\n"
               "installed, numbers in parity-failed.json); 2 unusable run directory, bad usage, or an\n"
               "--out holding another model's export (one directory, one model).")
    p.add_argument("run_dir", type=path)
    p.add_argument("--format", choices=["onnx", "torchscript", "all"], default="all",
                   help="what to export (default: all)")
    p.add_argument("--out", type=path, help="output directory (default: RUN_DIR/export)")
    add_device_argument(p, "where the PyTorch model that the exports are checked against runs (the "
                           "exports are made on the CPU and load anywhere); ")
    p.set_defaults(func=commands.cmd_export)


def _add_reproduce_seed(sub) -> None:
    p = sub.add_parser("reproduce-seed", help="the reference notebook's two experiments")
    p.add_argument("data", nargs="?", type=path, default="cifar10", help="(default: cifar10)")
    p.add_argument("--out", type=path, default="runs/reproduce-seed", help="(default: runs/reproduce-seed)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 (default, as the notebook), bf16, or auto (bf16 where the CPU has it natively)")
    p.add_argument("--epochs", type=positive_int, default=20, help="(default: 20)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="(default: 0)")
    p.add_argument("--models", nargs="+", default=["seed-baseline", "seed-batchnorm"],
                   help="(default: seed-baseline seed-batchnorm)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--test-split", type=float, metavar="F",
                   help="data without a test split: hold out this fraction of each class as one")
    p.add_argument("--precise-bn", type=non_negative_int, metavar="N",
                   help="also test BatchNorm models with their statistics re-estimated on N training "
                        "images (default: 10000; 0 = don't); the runs themselves stay as Keras trains them")
    add_device_argument(p)
    p.set_defaults(func=commands.cmd_reproduce_seed)


def _add_workflow(sub) -> None:
    p = sub.add_parser("workflow", help="the universal workflow of ML, step by step, in a time budget")
    p.add_argument("data", type=path, help=DATA_HELP)
    p.add_argument("--budget-minutes", type=float, default=15.0, help="total wall time (default: 15)")
    p.add_argument("--out", type=path, default="runs/workflow", help="output directory (default: runs/workflow)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="(default: 0)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--image-size", type=image_size, metavar="SIZE|HxW",
                   help="train at this size (default: the data's own, or for large images the largest "
                        "of 32-128 px the budget affords)")
    p.add_argument("--backbone", metavar="hf:DIR|hf:HUB_ID",
                   help="a pretrained backbone step 7 tries frozen and fine-tuned beside the scratch models: a "
                        "directory saved with save_pretrained, or a hub id in Hugging Face's cache (nothing is "
                        "downloaded; default for photos: hf:microsoft/resnet-18 when cached)")
    add_device_argument(p, "where every run trains, and so what the budget plans are measured on; ")
    p.set_defaults(func=commands.cmd_workflow)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP, with an upload page for a browser or a phone",
        usage="imgflow serve RUN_DIR_OR_MODEL.onnx [--host HOST] [--port P] [--top-k K]\n"
              "                     [--max-upload-mb MB] [--max-files N]",
        formatter_class=_RAW,
        description="Load the model once (a run directory in PyTorch, or an exported MODEL.onnx with\n"
                    "onnxruntime) and answer over HTTP, preprocessing as 'imgflow predict' does:\n"
                    "  POST /predict   images as multipart files (field 'files') or one as the raw body\n"
                    "                  -> {\"predictions\": [{\"image\", \"top\": [{\"class\", \"probability\"}]}]}\n"
                    "  GET  /model     classes, input size, test accuracy, source;  GET /health\n"
                    "  GET  /          a page to drop or pick images and see their top classes\n"
                    "Requests that arrive together are run as one batch. Needs pip install 'imgflow[serve]'.",
        epilog="Bad input (not an image, truncated, a decompression bomb, empty, too large, too\n"
               "many files) gets a 4xx with {\"detail\": ...}; the server keeps serving.\n"
               "Exit status: 0 after Ctrl-C; 2 when the model is unusable, the port is taken or\n"
               "the serving packages are missing.")
    p.add_argument("model", type=path, metavar="RUN_DIR_OR_MODEL.onnx")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = the network)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="(default: 8000; 0 = any free port)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="classes per image (default: 5; a request may ask ?top_k=K)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body, larger ones get 413 (default: 20)")
    p.add_argument("--max-files", type=positive_int, default=16, metavar="N",
                   help="images per request (default: 16)")
    p.add_argument("--max-batch", type=positive_int, default=64, metavar="N",
                   help="images per forward pass (default: 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a request waits for others to batch with (default: 5)")
    add_device_argument(p)
    p.set_defaults(func=commands.cmd_serve)
