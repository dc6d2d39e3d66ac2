"""Progress bars that work where users run us: a terminal, a Jupyter notebook, or a pipe.

In a terminal tqdm draws text bars; in a notebook tqdm.auto draws widgets; piped into a file or
a CI log there are no bars at all (a line per step would drown the log), and the per-epoch log
lines are the progress.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where stderr is not a terminal."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    return get_ipython is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether progress bars would be seen: stderr is a terminal, or we run in a notebook."""
    return sys.stderr.isatty() or in_notebook()


def progress_bar(*, enabled: bool, **options) -> tqdm:
    """A tqdm bar (text or notebook widget), drawn only when `enabled`."""
    return tqdm(disable=not enabled, dynamic_ncols=True, **options)
