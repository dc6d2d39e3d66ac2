"""`imgflow workflow DATA`: the universal workflow of machine learning, step by step, in a time budget.

Each step records what was done, what was decided and why, with its numbers, in
OUT/workflow.json; a step that finished is not redone when the same command runs again.
The test split is touched exactly once, in the last step.

One job per module, each importing only the ones above it in this list:
    budget       each step's share of the budget; epoch, final-run and step-7 plans; the reserve
    record       workflow.json's schema: the typed record and state, checked on read
    context      what the steps share while running; the data as the protocol splits it
    throughput   training pace: probed with the engine's own step, or observed in a finished run
    image_size   the working image size and its rule
    training_runs  plan once, train or continue, score a run under OUT/runs
    backbone     a pretrained backbone for photos: its local weights, input size and pace, step 7's
                 frozen and fine-tuned candidates
    selection    overfitting, the one-standard-error rule and its standard error
    recipes      the fast recipe of step 6 and the candidates of step 7
    decisions    what each step decided, as data
    wording      each step's decision and why, in words, from its decision
    steps        the eight steps
    report       OUT/report.html, from workflow.json (record) and the run directories
    run          run_workflow (new or continued), format_summary
Modules that import torch (training, inference, evaluation, models) are imported inside the
functions that use them, so that importing this package stays quick.
"""
from imgflow.workflow.budget import BUDGET_SHARE, final_reserve_seconds, plan_epochs, plan_final_run
from imgflow.workflow.image_size import working_image_size
from imgflow.workflow.recipes import CANDIDATES
from imgflow.workflow.record import STEP_NAMES, WorkflowRecord, read_workflow_record
from imgflow.workflow.report import write_workflow_report
from imgflow.workflow.run import format_summary, run_workflow
from imgflow.workflow.selection import choose_candidate, detect_overfitting, score_standard_error
from imgflow.workflow.throughput import probe_throughput

__all__ = ["BUDGET_SHARE", "CANDIDATES", "STEP_NAMES", "WorkflowRecord", "choose_candidate",
           "detect_overfitting", "final_reserve_seconds", "format_summary", "plan_epochs", "plan_final_run",
           "probe_throughput", "read_workflow_record", "run_workflow", "score_standard_error",
           "working_image_size", "write_workflow_report"]
