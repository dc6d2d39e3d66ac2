"""Judging runs from their numbers: when a model overfits (step 6), and which candidate the
validation scores pick, and how sure they are of it (step 7)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from imgflow.workflow.record import Candidate

OVERFIT_PATIENCE = 2  # epochs validation loss must rise in a row, while training loss falls, to call it overfitting
# Training accuracy this far above validation accuracy, without regularisation, is the model
# fitting its training images' particulars: capacity to spare, even before validation loss turns.
MEMORISATION_GAP = 0.10


def detect_overfitting(history: list[dict], patience: int = OVERFIT_PATIENCE) -> int | None:
    """The epoch after which validation loss rose for `patience` epochs while training loss fell.

    Returns that best epoch (1-based), or None when the curves show no overfitting.
    """
    val = [r["val_loss"] for r in history]
    if len(val) < patience + 1 or any(v is None for v in val):
        return None
    best = int(np.argmin(val))
    after = history[best + 1:]
    if len(after) < patience:
        return None
    train_falls = after[-1]["train_loss"] < history[best]["train_loss"]
    return best + 1 if train_falls and all(r["val_loss"] > val[best] for r in after[:patience]) else None


def overfit_verdict(best_epoch: int | None, train_acc: float, val_acc: float) -> str:
    """Step 6's verdict: "overfits" (the curves turned at best_epoch), "memorises" (they did not,
    but training accuracy is MEMORISATION_GAP or more above validation), or "neither"."""
    if best_epoch:
        return "overfits"
    return "memorises" if train_acc - val_acc >= MEMORISATION_GAP else "neither"


def score_standard_error(score: float, class_counts: list[int], balanced: bool) -> float:
    """Sampling standard error of a validation accuracy, or of a balanced accuracy (mean of recalls).

    Binomial, with the Agresti-Coull adjustment ((k + 2) / (n + 4)) so that a score of 0 or 1 is
    not taken as exact. A balanced accuracy averages C recalls over n_c images each: its variance
    is p(1 - p) / C * mean(1 / n_c), larger than accuracy's p(1 - p) / n when classes are uneven.
    """
    counts = np.asarray([c for c in class_counts if c > 0], dtype=float)
    n = float(counts.sum())
    if n == 0:
        return 0.0
    p = (score * n + 2) / (n + 4)
    if not balanced:
        return math.sqrt(p * (1 - p) / n)
    return math.sqrt(p * (1 - p) * float(np.mean(1 / counts)) / len(counts))


def choose_candidate(results: list[Candidate],
                     standard_error: Callable[[float], float]) -> tuple[Candidate, Candidate, float]:
    """(chosen, best-scoring, standard error of the best score): the one-standard-error rule.

    Hastie, Tibshirani & Friedman, The Elements of Statistical Learning, 7.10: a candidate at most
    one standard error below the best score is as good as far as the validation data can tell,
    and among those the one that regularises most is the safer choice. ESL takes the standard
    error from the spread across folds; a single hold-out has no such spread, so here it is the
    score's sampling error on the images it averages over (the same for every candidate).
    Ties in regularisation go to the better score, then the lower validation loss.
    """
    best = max(results, key=lambda r: (r.val_score, -r.val_loss))
    se = standard_error(best.val_score)
    tied = [r for r in results if r.val_score >= best.val_score - se] or [best]  # NaN ties with nothing
    chosen = max(tied, key=lambda r: (r.regularisation, r.val_score, -r.val_loss))
    return chosen, best, se
