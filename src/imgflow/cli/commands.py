"""One function per command: call the library, print its result. No ML logic lives here; heavy
modules (torch) are imported inside the command that needs them, so `--help` starts quickly."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgflow.errors import UserError
from imgflow.progress import interactive


def cmd_inspect(args: argparse.Namespace) -> int:
    from imgflow.data.card import format_card, inspect

    card = inspect(args.data, out_dir=Path(args.out) if args.out else None, image_size=args.image_size)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from imgflow.models import describe_models, format_models

    rows = describe_models(num_classes=args.num_classes, in_channels=args.channels,
                           image_size=args.image_size)
    print(json.dumps(rows, indent=2) if args.json else format_models(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imgflow.cli.arguments import config_from_args, other_rank
    from imgflow.training.config import LR_FIND
    from imgflow.training.loop import train

    config = config_from_args(args)
    if args.lr == LR_FIND:
        from imgflow.training.distributed import refuse_under_torchrun
        from imgflow.training.lr_find import train_at_found_lr

        refuse_under_torchrun("train --lr find", "the range test runs in one process; run 'imgflow lr-find' "
                                                 "first and pass its --lr")

        result, found = train_at_found_lr(config, Path(args.out), resume=args.resume, overwrite=args.overwrite)
        if found is not None:
            print(f"trained at the suggested lr {found.suggestion:.1e} ({found.rule})")
    else:
        result = train(config, Path(args.out), resume=args.resume, overwrite=args.overwrite)
    if not other_rank():  # under torchrun, rank 0 alone
        print(f"run directory: {result.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from imgflow.cli.arguments import overrides_from_args
    from imgflow.reports.lr_find import range_test_figure
    from imgflow.training.config import resolve_config
    from imgflow.training.lr_find import RangeTest, lr_find, save_curve

    config = resolve_config(args.data, overrides_from_args(args), preset=args.preset)
    given = {"steps": args.steps, "start_lr": args.start_lr, "end_lr": args.end_lr}
    test = RangeTest(**{k: v for k, v in given.items() if v is not None}).validate()
    out = Path(args.out or f"runs/lr-find/{config.model}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another path")
    found = lr_find(config, test, progress=interactive())
    csv_path = save_curve(found, out)
    png = range_test_figure(found, out / "lr_find.png", f"lr-find: {config.model}, seed {config.seed}")
    print(f"suggested lr {found.suggestion:.1e} ({found.rule})")
    print(f"wrote {png} and {csv_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgflow.evaluation import evaluate_run, format_metrics

    metrics = evaluate_run(Path(args.run_dir), tta=args.tta, device=args.device)
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from imgflow.reports import compare_runs, report_run

    runs = [Path(r) for r in args.run_dirs]
    if len(runs) == 1 and (runs[0] / "workflow.json").is_file():
        if args.out:
            raise UserError(f"{runs[0]} is a workflow: its report is written into it, so leave out --out")
        from imgflow.workflow import write_workflow_report

        path = write_workflow_report(runs[0])
    elif len(runs) == 1:
        path = report_run(runs[0], Path(args.out) if args.out else None)
    else:
        path = compare_runs(runs, Path(args.out or "runs/compare"))
    print(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgflow.prediction import format_predictions, predict_files

    inputs, onnx, run_dir = list(args.inputs), args.onnx, None
    if onnx is None and inputs[0].lower().endswith(".onnx"):
        onnx = inputs.pop(0)  # `imgflow predict MODEL.onnx IMAGE...`
    elif onnx is None:
        run_dir = inputs.pop(0)
    elif (Path(inputs[0]) / "config.json").is_file():
        raise UserError(f"give a run directory or --onnx, not both ({inputs[0]} is a run directory)")
    if not inputs:
        raise UserError("no images given: imgflow predict RUN_DIR IMAGE_OR_DIR...")
    results = predict_files(run_dir, inputs, top_k=args.top_k, tta=args.tta, onnx=onnx, device=args.device)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgflow.exporting import FORMATS, ParityError, export_run, format_parity

    formats = FORMATS if args.format == "all" else (args.format,)
    try:
        report = export_run(Path(args.run_dir), Path(args.out) if args.out else None, formats,
                            progress=interactive(), device=args.device)
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
                           test_split=args.test_split, device=args.device)
    print(table)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from imgflow.cli.arguments import other_rank, overrides_from_args
    from imgflow.training.config import resolve_config
    from imgflow.tune import format_summary, run_tune

    base = resolve_config(args.data, overrides_from_args(args), preset=args.preset)
    record = run_tune(base, Path(args.out), trials=args.trials, search=args.search,
                      budget_minutes=args.budget_minutes, progress=interactive(), storage=args.storage)
    if not other_rank():  # under torchrun, rank 0 alone
        print(format_summary(record))
    return 0


def cmd_workflow(args: argparse.Namespace) -> int:
    from imgflow.cli.arguments import other_rank
    from imgflow.workflow import format_summary, run_workflow

    record = run_workflow(args.data, Path(args.out), budget_minutes=args.budget_minutes, seed=args.seed,
                          threads=args.threads, image_size=args.image_size, device=args.device,
                          backbone=args.backbone)
    if not other_rank():  # under torchrun, rank 0 alone
        print(format_summary(record))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from imgflow.serving import serve

    serve(args.model, host=args.host, port=args.port, top_k=args.top_k, max_upload_mb=args.max_upload_mb,
          max_files=args.max_files, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
          device=args.device)
    return 0
