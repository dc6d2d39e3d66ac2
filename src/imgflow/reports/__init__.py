"""Reports a person reads: one run's figures and HTML page, or several runs side by side.

Built only from files a run saved (config, history, weights, metrics, test predictions) plus the
data set for its images, never from live training objects.

    from imgflow.reports import report_run, compare_runs
    report_run("runs/seed-baseline-seed0")                        # -> .../report.html
    compare_runs(["runs/a", "runs/b"], "runs/compare")            # -> runs/compare/comparison.html
"""
from imgflow.reports.compare import compare_runs
from imgflow.reports.run_report import report_run

__all__ = ["compare_runs", "report_run"]
