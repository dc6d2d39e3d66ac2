"""Wording shared by every message: counts with the right plural. Imports nothing of imgflow."""
from __future__ import annotations


def plural(n: int, word: str, plural: str | None = None) -> str:
    """'1 epoch', '2 epochs', '1,200 images', '3 classes'.

    plural: the plural form when adding 's' (or 'es' after s, x, z, sh) is wrong, e.g.
        plural(n, "batch", "batches"): 'ch' is not guessed, since 'epoch' takes a plain 's'.
    """
    if n == 1:
        return f"1 {word}"
    if plural is None:
        plural = word + ("es" if word.endswith(("s", "x", "z", "sh")) else "s")
    return f"{n:,} {plural}"
