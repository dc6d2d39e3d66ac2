"""The report's figures: matplotlib without pyplot (Agg canvas, no global figure state), one style.

Every function takes plain arrays and lists (never a run directory), draws one figure and writes
it as a PNG atomically. Sizes grow with what is drawn (classes, images) so that text stays about
9-11 pt at the size the HTML shows it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from imgflow.fileio import atomic_write
from imgflow.text import plural

DPI = 110
MAX_MATRIX_CLASSES = 30  # above this a labelled confusion matrix is unreadable: top-confusions view
MAX_BAR_CLASSES = 40  # above this the per-class chart shows the worst and best 20 only

TRAIN = "#1f77b4"  # blue: training curves
VAL = "#ff7f0e"  # orange: validation curves
RIGHT = "#2a7d2e"  # dark green: correct predictions (dark enough to read on white)
WRONG = "#d62728"  # red: wrong predictions
MUTED = "#555555"
# Distinct colours for runs side by side (tab10 without its grey, which reads as "disabled").
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#bcbd22", "#17becf"]

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "lines.linewidth": 1.8,
    "lines.markersize": 4,
    "image.cmap": "Blues",
    "savefig.facecolor": "white",
}


@contextmanager
def _figure(path: Path, width: float, height: float) -> Iterator:
    """A styled Figure of width x height inches, saved to `path` (atomically) when the block ends."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):  # artists read rcParams when created: keep it open
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percent_axis(axis) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one history column, leaving out epochs where it is empty."""
    pairs = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _wants_log_scale(values: Sequence[float]) -> bool:
    # Losses that fall by orders of magnitude are a flat line on a linear axis.
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > 100


# ----------------------------------------------------------------------------------------------
# curves


def training_curves(history: Sequence[dict], path: Path, title: str,
                    best_epoch: int | None = None, best_label: str | None = None,
                    references: dict[str, float] | None = None) -> Path:
    """The notebook's two plots side by side: accuracy and loss per epoch, training vs validation.

    The legend gives each curve's last value; `best_epoch` (weights restored by early stopping)
    is marked with a dotted line, labelled `best_label` when given. `references` (name ->
    accuracy, e.g. the majority-class baseline) are drawn as dashed levels on the accuracy plot.
    """
    marker = "o" if len(history) <= 30 else None
    with _figure(path, 10, 4.2) as fig:
        fig.suptitle(title, fontsize=12, fontweight="bold")
        axes = fig.subplots(1, 2)
        for ax, metric, name in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
            drawn = []
            for split, label, colour in (("train", "training", TRAIN), ("val", "validation", VAL)):
                epochs, values = _series(history, f"{split}_{metric}")
                if not values:
                    continue
                last = f"{values[-1]:.1%}" if metric == "acc" else f"{values[-1]:.4g}"
                ax.plot(epochs, values, color=colour, marker=marker, label=f"{label} (last {last})")
                drawn += values
            if best_epoch:
                ax.axvline(best_epoch, color=MUTED, linestyle=":", linewidth=1.2,
                           label=best_label or f"best epoch ({best_epoch}), weights kept")
            _epoch_axis(ax)
            if metric == "acc":
                for name, level in (references or {}).items():
                    # Labelled on the line, at the right where curves have usually risen above
                    # it; in the legend, 'best' placement still lays it across the line.
                    ax.axhline(level, color=MUTED, linestyle="--", linewidth=1.1)
                    ax.text(0.99, level, f"{name} ({level:.1%})", color=MUTED, fontsize=8.5,
                            ha="right", va="bottom", transform=ax.get_yaxis_transform())
                _percent_axis(ax.yaxis)
                ax.set_ylabel("accuracy")
                ax.set_title("Accuracy")
                ax.legend(loc="best")
            else:
                log_scale = _wants_log_scale(drawn)
                if log_scale:
                    ax.set_yscale("log")
                ax.set_ylabel("cross-entropy loss" + (" (log scale)" if log_scale else ""))
                ax.set_title("Loss")
                ax.legend(loc="best")
    return Path(path)


def compare_curves(histories: dict[str, Sequence[dict]], path: Path,
                   title: str = "Runs side by side") -> Path:
    """Validation accuracy and loss of several runs, overlaid; training curves dashed and faint."""
    from matplotlib.lines import Line2D

    many = max((len(h) for h in histories.values()), default=0) > 30
    loss_values: list[float] = []
    with _figure(path, 10, 4.6 + 0.25 * ((len(histories) + 2) // 3)) as fig:
        fig.suptitle(title, fontsize=12, fontweight="bold")
        axes = fig.subplots(1, 2)
        handles = []
        for i, (name, history) in enumerate(histories.items()):
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            for ax, metric in ((axes[0], "acc"), (axes[1], "loss")):
                epochs, values = _series(history, f"val_{metric}")
                ax.plot(epochs, values, color=colour, marker=None if many else "o")
                t_epochs, t_values = _series(history, f"train_{metric}")
                ax.plot(t_epochs, t_values, color=colour, linestyle="--", linewidth=1.1, alpha=0.55)
                if metric == "loss":
                    loss_values += values + t_values
            handles.append(Line2D([], [], color=colour, label=name))
        handles += [Line2D([], [], color=MUTED, label="validation (solid)"),
                    Line2D([], [], color=MUTED, linestyle="--", alpha=0.55, label="training (dashed)")]
        for ax, title in ((axes[0], "Validation accuracy"), (axes[1], "Validation loss")):
            _epoch_axis(ax)
            ax.set_title(title)
        _percent_axis(axes[0].yaxis)
        axes[0].set_ylabel("accuracy")
        log_scale = _wants_log_scale(loss_values)
        if log_scale:
            axes[1].set_yscale("log")
        axes[1].set_ylabel("cross-entropy loss" + (" (log scale)" if log_scale else ""))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# confusion


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path, normalize: bool) -> Path:
    """Heat map with class names and a number in every cell: counts, or row-normalised percent.

    Row-normalised, the diagonal is each class's recall. For at most MAX_MATRIX_CLASSES classes.
    """
    from matplotlib.patches import Rectangle

    cm = np.asarray(cm)
    K = len(classes)
    assert cm.shape == (K, K), f"expected a {K}x{K} matrix, got {cm.shape}"
    assert K <= MAX_MATRIX_CLASSES, f"{K} classes: use confusion_overview and top_confusions"
    rows = cm.sum(1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0) if normalize else cm
    labels = [_shorten(c, 18) for c in classes]
    cell = 0.52 if K <= 12 else 0.42 if K <= 20 else 0.36  # inches per cell
    side = max(4.5, cell * K + 2.6)
    fontsize = 9 if K <= 12 else 7 if K <= 20 else 6
    with _figure(path, side + 0.9, side) as fig:
        ax = fig.subplots()
        vmax = 1.0 if normalize else max(int(values.max()), 1)
        im = ax.imshow(values, vmin=0, vmax=vmax, interpolation="nearest")
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xticks(range(K), labels, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(K), labels)
        ax.tick_params(length=0)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        for i in range(K):
            for j in range(K):
                if normalize:  # empty cells stay empty: the few mistakes stand out
                    text = "" if cm[i, j] == 0 else f"{values[i, j]:.0%}"
                else:
                    text = f"{cm[i, j]:d}"
                dark = values[i, j] > 0.55 * vmax
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                        color="white" if dark else ("#b0b0b0" if cm[i, j] == 0 else "black"))
        # Outline the diagonal (the correct predictions) so it reads even where it is pale.
        for i in range(K):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=MUTED,
                                   linewidth=0.8))
        cbar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
        if normalize:
            _percent_axis(cbar.ax.yaxis)
        fig.suptitle("Confusion matrix, row-normalised (diagonal = recall)" if normalize
                     else "Confusion matrix, counts", fontsize=11, fontweight="bold")
    return Path(path)


def confusion_overview(cm: np.ndarray, path: Path) -> Path:
    """The whole row-normalised matrix as an image with class indices, for many classes.

    Too small for names or numbers; it shows the pattern (a strong diagonal, confused blocks).
    """
    from matplotlib.ticker import MaxNLocator

    cm = np.asarray(cm)
    K = len(cm)
    rows = cm.sum(1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    with _figure(path, 7.6, 6.6) as fig:
        ax = fig.subplots()
        # A power-law colour scale: small off-diagonal fractions stay visible beside the diagonal.
        from matplotlib.colors import PowerNorm

        im = ax.imshow(values, norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
        ax.grid(False)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax.set_xlabel("predicted class (index, see the per-class table)")
        ax.set_ylabel("true class (index)")
        cbar = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        _percent_axis(cbar.ax.yaxis)
        fig.suptitle(f"Confusion matrix of {K} classes, row-normalised", fontsize=11,
                     fontweight="bold")
    return Path(path)


def top_confusions(pairs: Sequence[dict], path: Path, num_classes: int) -> Path:
    """Horizontal bars: the most frequent (true -> predicted) mistakes, as % of the true class.

    pairs: dicts with "true", "predicted", "count", "fraction" (of the true class's images),
    most frequent first.
    """
    n = len(pairs)
    with _figure(path, 8.5, max(2.2, 0.3 * n + 1.3)) as fig:
        ax = fig.subplots()
        ax.set_title(f"Most frequent confusions ({num_classes} classes)")
        if not n:
            ax.text(0.5, 0.5, "no test image was misclassified", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            return Path(path)
        y = np.arange(n)
        fractions = [p["fraction"] for p in pairs]
        ax.barh(y, fractions, color=WRONG, alpha=0.8)
        ax.set_yticks(y, [f"{_shorten(p['true'], 22)} → {_shorten(p['predicted'], 22)}" for p in pairs])
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        _percent_axis(ax.xaxis)
        ax.set_xlabel("share of the true class's test images predicted as the other class")
        ax.set_xlim(0, max(fractions) * 1.22)
        for yi, p in zip(y, pairs):
            ax.text(p["fraction"], yi, f"  {p['count']} ({p['fraction']:.0%})", va="center",
                    fontsize=8)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# per class


def per_class_accuracy(classes: Sequence[str], accuracy: Sequence[float], path: Path,
                       overall: float) -> Path:
    """Horizontal bars of each class's accuracy (its recall), worst at the top.

    Above MAX_BAR_CLASSES classes, only the 20 worst and the 20 best are drawn.
    """
    order = np.argsort(np.asarray(accuracy), kind="stable")  # worst first
    shown: list[int | None] = list(order)
    hidden = 0
    if len(order) > MAX_BAR_CLASSES:
        hidden = len(order) - 40
        shown = list(order[:20]) + [None] + list(order[-20:])
    with _figure(path, 8.5, 0.26 * len(shown) + 1.4) as fig:
        ax = fig.subplots()
        y = np.arange(len(shown))
        bars = [accuracy[i] if i is not None else 0.0 for i in shown]
        ax.barh(y, bars, color=[TRAIN if i is not None else "none" for i in shown], height=0.7)
        names = [_shorten(classes[i], 24) if i is not None else f"… {plural(hidden, 'class')} in between …"
                 for i in shown]
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        for yi, i in zip(y, shown):
            if i is not None:
                ax.text(accuracy[i], yi, f" {accuracy[i]:.0%}", va="center", fontsize=8)
        ax.axvline(overall, color=MUTED, linestyle="--", linewidth=1.2)
        ax.text(overall, 1.0, f"overall {overall:.1%}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color=MUTED)
        ax.set_xlim(0, 1.09)
        _percent_axis(ax.xaxis)
        ax.set_xlabel("accuracy on the class's test images (recall)")
        title = "Per-class accuracy, worst first"
        if hidden:
            title += f" (20 worst and 20 best of {len(classes)})"
        ax.set_title(title, pad=16)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# images


def _show(ax, image: np.ndarray) -> None:
    H, W, C = image.shape
    small = max(H, W) <= 64  # upscaled: keep the pixels crisp
    if C == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest" if small else "antialiased")
    else:
        ax.imshow(image, interpolation="nearest" if small else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _mark(ax, colour: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def prediction_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    classes: Sequence[str], path: Path, title: str, columns: int = 5) -> Path:
    """A grid of test images captioned with the true class, the prediction and its confidence.

    Wrong predictions have a red caption and a thick red frame; right ones a green caption.
    """
    N = len(images)
    assert N == len(labels) == len(probs), "images, labels and probs differ in length"
    rows = max(1, -(-N // columns))
    pred = probs.argmax(1)
    with _figure(path, 2.0 * columns, 2.35 * rows + 0.5) as fig:
        fig.suptitle(title, fontsize=12, fontweight="bold")
        axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
        for ax in axes[N:]:
            ax.set_axis_off()
        for ax, image, y, p, pr in zip(axes, images, labels, pred, probs):
            _show(ax, image)
            wrong = p != y
            ax.set_title(f"true: {_shorten(classes[y], 16)}\npred: {_shorten(classes[p], 16)} "
                         f"{pr[p]:.0%}", fontsize=9, fontweight="bold" if wrong else "normal",
                         color=WRONG if wrong else RIGHT)
            if wrong:
                _mark(ax, WRONG, 3.5)
            else:
                _mark(ax, "#cccccc", 0.6)
    return Path(path)


def top_losses(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
               classes: Sequence[str], path: Path, columns: int = 5) -> Path:
    """The given misclassified images, captioned with the predicted and the true class's probability.

    The caller picks and orders them (highest loss first).
    """
    N = len(images)
    rows = max(1, -(-N // columns))
    pred = probs.argmax(1)
    with _figure(path, 2.0 * columns, 2.55 * rows + 0.5) as fig:
        fig.suptitle(f"Top losses: the {plural(N, 'most confidently wrong test image')}",
                     fontsize=12, fontweight="bold")
        axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
        for ax in axes[N:]:
            ax.set_axis_off()
        for ax, image, y, p, pr in zip(axes, images, labels, pred, probs):
            _show(ax, image)
            ax.set_title(f"pred: {_shorten(classes[p], 15)} {pr[p]:.0%}\n"
                         f"true: {_shorten(classes[y], 15)} {pr[y]:.0%}\n"
                         f"loss {-np.log(max(float(pr[y]), 1e-12)):.2f}", fontsize=8.5, color=WRONG)
            _mark(ax, WRONG, 3.0)
    return Path(path)


def trial_scores(trials: Sequence[dict], names: Sequence[str], path: Path,
                 choices: dict[str, Sequence] | None = None) -> Path:
    """One panel per searched option: each finished trial's value of it against its validation accuracy.

    choices: the values of categorical options, in the order their axis shows them. Pruned trials
    sit at the accuracy of the epoch they were stopped at, hollow: where the search stopped
    spending time.
    """
    from matplotlib.lines import Line2D

    choices = choices or {}
    cols = max(len(names), 1)
    with _figure(path, min(3.6 * cols, 14), 3.8) as fig:
        fig.suptitle("Tuning: validation accuracy of each trial", fontsize=12, fontweight="bold")
        axes = np.atleast_1d(fig.subplots(1, cols))
        for ax, name in zip(axes, names):
            order = list(choices.get(name, ()))
            for pruned in (False, True):
                rows = [t for t in trials if (t["state"] == "pruned") == pruned and name in t["params"]]
                scores = [(t["curve"] or [np.nan])[-1] if pruned else t["val_acc"] for t in rows]
                values = [order.index(t["params"][name]) if order else t["params"][name] for t in rows]
                ax.scatter(values, scores, s=28, facecolors="none" if pruned else RUN_COLOURS[0],
                           edgecolors=RUN_COLOURS[0])
            if order:
                ax.set_xticks(range(len(order)), [str(c) for c in order], rotation=25, ha="right")
                ax.set_xlim(-0.5, len(order) - 0.5)
            elif name in ("lr", "weight_decay"):
                ax.set_xscale("log")
            ax.set_xlabel(name.replace("_", " "))
            _percent_axis(ax.yaxis)
        axes[0].set_ylabel("validation accuracy")
        marker = dict(marker="o", linestyle="", color=RUN_COLOURS[0])
        fig.legend(handles=[Line2D([], [], label="finished", **marker),
                            Line2D([], [], label="pruned (accuracy when stopped)", markerfacecolor="none", **marker)],
                   loc="outside lower center", ncol=2)
    return Path(path)
