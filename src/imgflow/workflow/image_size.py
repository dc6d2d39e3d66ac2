"""The working image size: decided before anything is decoded, from the headers of a sample.

A folder of large images (photos) trains at a smaller working size: training cost grows with
the pixel count, and at full size a budget buys a fraction of an epoch (240 photos of 300x400
at a 2-minute budget: the final run trained 1 epoch on 76 of them and tested 0.55 on a task
its validation had solved). The largest longer side on this ladder wins at which the whole
budget still pays for PASSES_PER_IMAGE training passes over every training image, at
fast-small's pace measured at 32x32 and scaled by the pixel count: at 15 minutes, 96 px for
1,000 images and 32 px for 10,000 on the README's Zen 1 (470 images/s), 128 and 64 px on its
Zen 5 (2,900 images/s). `--image-size` overrides.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from imgflow.errors import UserError
from imgflow.workflow.budget import SCALED_MODELS
from imgflow.workflow.record import Resize
from imgflow.workflow.throughput import probe_throughput

WORKING_SIDES = (32, 48, 64, 96, 128)
PASSES_PER_IMAGE = 40
SIZE_SAMPLE = 100  # image headers read to learn a folder's typical size


def working_image_size(sample, budget_seconds: float, images_per_second_32: Callable[[], float],
                       available_bytes: int | None) -> Resize:
    """The size to train at, by the rule at WORKING_SIDES, from a `folder.SizeSample`, with the
    facts behind it. `images_per_second_32` probes fast-small at 32x32; it runs only when the
    images are larger.
    """
    from imgflow.models.registry import MIN_IMAGE_SIZE

    if not sample.sizes:
        return Resize(image_size=None)
    H, W = Counter(sample.sizes).most_common(1)[0][0]
    longer = max(H, W)
    facts = Resize(image_size=None, typical_size=[H, W], sampled=len(sample.sizes), train_files=sample.train_files)
    if longer <= WORKING_SIDES[0]:
        return facts
    # Photos of one shape keep it; a mix of shapes is stretched to squares, as Keras does.
    same_shape = all(abs(h * W - w * H) <= 0.05 * H * w for h, w in sample.sizes)
    ips = images_per_second_32()
    n = max(sample.train_files, 1)

    def size(side: int) -> tuple[int, int]:
        if side >= longer:
            return H, W
        if not same_shape:
            return side, side
        # The models need MIN_IMAGE_SIZE pixels a side: a very long, thin shape gets stretched.
        return (max(MIN_IMAGE_SIZE, round(side * H / longer)), max(MIN_IMAGE_SIZE, round(side * W / longer)))

    def passes(hw: tuple[int, int]) -> float:
        return budget_seconds * ips * 32 * 32 / (hw[0] * hw[1]) / n

    def fits(hw: tuple[int, int]) -> bool:  # decoded uint8 RGB, with room for a copy while stacking
        return available_bytes is None or 2 * n * hw[0] * hw[1] * 3 <= 0.8 * available_bytes

    sides = [side for side in WORKING_SIDES if side < longer] + ([longer] if longer <= WORKING_SIDES[-1] else [])
    chosen, limit = sides[0], "smallest"  # when no rung is affordable
    for k in range(len(sides) - 1, -1, -1):
        hw = size(sides[k])
        if passes(hw) >= PASSES_PER_IMAGE and fits(hw):
            larger = size(sides[k + 1]) if k + 1 < len(sides) else None
            chosen = sides[k]
            limit = "top" if larger is None else "budget" if passes(larger) < PASSES_PER_IMAGE else "memory"
            break
    hw = size(chosen)
    facts.image_size = None if hw == (H, W) else list(hw)
    facts.same_shape, facts.images_per_second_32x32 = same_shape, round(ips, 1)
    facts.passes_per_image, facts.limit = round(passes(hw), 1), limit
    return facts


def decide_image_size(data: str, budget_seconds: float, threads: int | None,
                      option: tuple[int, int] | None, device: str = "auto") -> Resize:
    """Before anything is decoded: --image-size if given, else the working size for DATA."""
    from imgflow.data.decode import available_memory
    from imgflow.data.folder import sample_image_sizes
    from imgflow.data.load import named_source
    from imgflow.models.registry import MIN_IMAGE_SIZE

    if option is not None:
        if min(option) < MIN_IMAGE_SIZE:
            raise UserError(f"--image-size {option[0]}x{option[1]} is too small: the workflow's models need at "
                            f"least {MIN_IMAGE_SIZE} pixels a side")
        return Resize(image_size=list(option), chosen_by="--image-size")
    path = Path(data).expanduser()
    if named_source(data) or not path.exists():  # named sets are small; a bad path fails in loading
        return Resize(image_size=None)
    sample = sample_image_sizes(path, SIZE_SAMPLE)

    def probe() -> float:  # the speed does not depend on what the pixels show
        images = np.random.default_rng(0).integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8)
        return probe_throughput(SCALED_MODELS[-1], images, np.arange(128) % 2, 2, threads, device)

    return working_image_size(sample, budget_seconds, probe, available_memory())
