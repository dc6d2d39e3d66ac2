"""Running the workflow: a new one, or the continuation of one in the same OUT, step by step.

Each step records what was done, what was decided and why, with its numbers, in
OUT/workflow.json; a step that finished is not redone when the same command runs again.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from imgflow.errors import UserError
from imgflow.fileio import write_json
from imgflow.progress import interactive
from imgflow.workflow.context import Context
from imgflow.workflow.image_size import decide_image_size
from imgflow.workflow.record import STEP_NAMES, Constants, WorkflowRecord, WorkflowState, read_workflow_record
from imgflow.workflow.report import write_workflow_report
from imgflow.workflow.steps import STEPS

log = logging.getLogger(__name__)


def _new_record(out: Path, data: str, seed: int, budget_minutes: float, progress: bool, threads: int | None,
                image_size: tuple[int, int] | None, device: str = "auto",
                backbone: str | None = None) -> WorkflowRecord:
    """A record for a new workflow, after checking DATA (nothing is written yet)."""
    from imgflow.data import load_dataset
    from imgflow.runs import holds_run
    from imgflow.training.batches import check_classifiable

    if holds_run(out):  # its report.html and plots would be replaced by the workflow's
        raise UserError(f"{out} holds a training run, not a workflow: choose another --out")
    # The working size is chosen before decoding: a folder of photos is never held at full size.
    resize = decide_image_size(data, budget_minutes * 60, threads, image_size, device)
    # A bad DATA fails here, before anything is written.
    size = tuple(resize.image_size) if resize.image_size else None
    check_classifiable(load_dataset(data, image_size=size, progress=progress))
    # The constants are recorded so that the report explains this run with its own numbers.
    return WorkflowRecord(data=data, seed=seed, budget_minutes=budget_minutes,
                          image_size=list(image_size) if image_size else None, backbone=backbone,
                          constants=Constants.current(),
                          state=WorkflowState(image_size=resize.image_size, resize=resize), elapsed_minutes=0.0)


def _check_same_workflow(saved: WorkflowRecord, out: Path, data: str, seed: int, budget_minutes: float,
                         image_size: tuple[int, int] | None, backbone: str | None = None) -> None:
    """A saved workflow continues only with its own DATA, seed, budget and --image-size."""
    from imgflow.training.config import absolute_if_path

    # ./data, data and /abs/path/data are the same folder: paths compare resolved.
    if absolute_if_path(saved.data) != absolute_if_path(data) or saved.seed != seed:
        raise UserError(f"{out} holds a workflow for data {saved.data!r} seed {saved.seed}: "
                        "use the same DATA and --seed to continue it, or another --out")
    if saved.budget_minutes != budget_minutes:  # the plans so far were cut to the first budget
        raise UserError(f"{out} holds a workflow with a {saved.budget_minutes:g}-minute budget: "
                        f"continue it with --budget-minutes {saved.budget_minutes:g}, or use another --out")
    if saved.image_size != (list(image_size) if image_size else None):  # every run so far trained at the first size
        given = "x".join(map(str, saved.image_size)) if saved.image_size else None
        raise UserError(f"{out} holds a workflow " + (f"run with --image-size {given}: continue it with that"
                        if given else "run without --image-size: continue it without one")
                        + ", or use another --out")
    if saved.backbone != backbone:  # step 6 planned (or did not plan) its candidates with the first one
        raise UserError(f"{out} holds a workflow " + (f"run with --backbone {saved.backbone}: continue it with that"
                        if saved.backbone else "run without --backbone: continue it without one")
                        + ", or use another --out")


def _record_to_continue(out: Path, data: str, seed: int, budget_minutes: float, progress: bool,
                        threads: int | None, image_size: tuple[int, int] | None,
                        device: str = "auto", backbone: str | None = None) -> WorkflowRecord:
    """OUT/workflow.json to continue (the same DATA, seed, budget and --image-size), or a new one."""
    record_path = out / "workflow.json"
    if not record_path.is_file():
        return _new_record(out, data, seed, budget_minutes, progress, threads, image_size, device, backbone)
    saved = read_workflow_record(record_path, to_continue=True)
    _check_same_workflow(saved, out, data, seed, budget_minutes, image_size, backbone)
    saved.data = data  # as this invocation spells it (the same folder)
    if len(saved.steps) < len(STEPS):
        log.info("continuing the workflow in %s after step %d", out, len(saved.steps))
    return saved


def _check_arguments(out: Path, budget_minutes: float, seed: int, threads: int | None,
                     device: str = "auto") -> None:
    from imgflow.device import resolve_device
    from imgflow.training.config import check_seed_and_threads

    if not 0 < budget_minutes < math.inf:
        raise UserError(f"--budget-minutes must be a number > 0, got {budget_minutes}")
    check_seed_and_threads(seed, threads)
    resolve_device(device)  # --device cuda without CUDA: refused before anything is probed or written
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another path")


def _run_steps(ctx: Context, record: WorkflowRecord) -> bool:
    """Run the steps not yet finished, saving the record after each; return whether any ran."""
    ran = False
    for index, step in enumerate(STEPS):
        if index < len(record.steps):
            continue
        log.info("step %d/%d: %s", index + 1, len(STEPS), STEP_NAMES[index])
        ran = True
        t0 = time.perf_counter()
        try:
            result = step(ctx)
        except BaseException:
            # Ctrl-C or an error: the time spent still counts against the budget when the
            # same command continues (after a kill -9, the time since the last save is lost).
            # A failure before anything was decided leaves no record tying --out to this run.
            if record.steps or ctx.state.plans:
                ctx.save()
            raise
        result.seconds = round(time.perf_counter() - t0, 1)
        record.steps.append(result)
        ctx.save()
        log.info("  -> %s", result.decision)
    return ran


def run_workflow(data: str, out: Path, budget_minutes: float = 15.0, seed: int = 0,
                 progress: bool | None = None, threads: int | None = None,
                 image_size: tuple[int, int] | None = None, device: str = "auto",
                 backbone: str | None = None) -> dict:
    """Run (or continue) the eight steps into `out`; return the workflow.json content.

    image_size: (H, W) to train at; None lets step 1 choose (the data's own size, or a smaller
    working size for large images: see image_size.WORKING_SIDES).
    device: where every run trains, and so what the throughput probes behind the budget plans
    measure (a GPU's speed buys a GPU's epochs).
    backbone: hf:<local directory or hub id in Hugging Face's cache>, the pretrained backbone step 6
    prices and step 7 tries frozen and fine-tuned (None: for photos, hf:microsoft/resnet-18 when
    the cache holds it). Nothing is downloaded.

    Under torchrun, every rank trains each run and takes part in each probe (so the plans rest
    on what the ranks train together); rank 0 alone decides and writes OUT (`training.crew`),
    and every rank returns its record.
    """
    from imgflow.training.crew import lead_or_follow

    return lead_or_follow(device, lambda: _run_workflow(data, Path(out), budget_minutes, seed, progress, threads,
                                                        image_size, device, backbone))


def _run_workflow(data: str, out: Path, budget_minutes: float, seed: int, progress: bool | None,
                  threads: int | None, image_size: tuple[int, int] | None, device: str,
                  backbone: str | None) -> dict:
    """run_workflow in one process (rank 0 under torchrun)."""
    from imgflow.workflow.backbone import resolve_backbone

    _check_arguments(out, budget_minutes, seed, threads, device)
    backbone_dir = resolve_backbone(backbone)  # a bad one is refused before anything is written
    if progress is None:
        progress = interactive()
    record = _record_to_continue(out, data, seed, budget_minutes, progress, threads, image_size, device, backbone)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "workflow.json"
    ctx = Context(data=data, out=out, seed=seed, budget_seconds=budget_minutes * 60,
                  started=time.perf_counter(), elapsed_before=record.elapsed_minutes * 60,
                  progress=progress, threads=threads, device=device, state=record.state, backbone=backbone,
                  backbone_dir=backbone_dir)

    def save() -> None:
        record.elapsed_minutes = round(ctx.elapsed() / 60, 3)
        write_json(record_path, record.to_dict())

    ctx.save = save
    ran = _run_steps(ctx, record)  # a finished workflow run again only rewrites its report: its time is not added
    record.final_run, record.test_accuracy = ctx.state.final_run, ctx.state.test_accuracy
    if ran:
        record.elapsed_minutes = round(ctx.elapsed() / 60, 3)
    write_json(record_path, record.to_dict())
    record.report = str(write_workflow_report(out))
    if ran:  # the wall time includes the report (which quotes the time up to the last step)
        record.elapsed_minutes = round(ctx.elapsed() / 60, 3)
    write_json(record_path, record.to_dict())
    return record.to_dict()


def format_summary(record: dict) -> str:
    """What `imgflow workflow` prints: each step's decision, the test accuracy, how to use the model."""
    lines = [f"{i}. {step['name']}: {step['decision']}" for i, step in enumerate(record["steps"], 1)]
    lines.append("")
    if record.get("test_accuracy") is not None:
        lines.append(f"test accuracy {record['test_accuracy']:.4f} in {record['elapsed_minutes']:.1f} min "
                     f"(budget {record['budget_minutes']:g} min)")
        if record["elapsed_minutes"] > 1.1 * record["budget_minutes"]:
            lines.append("over budget: loading data, speed probes, evaluation and reports take a fixed "
                         "time that a budget this small cannot absorb; see the report's budget section")
    if record["steps"] and "usage" in record["steps"][-1]:
        lines.append(record["steps"][-1]["usage"])
    if record.get("report"):
        lines.append(f"report: {record['report']}")
    return "\n".join(lines)
