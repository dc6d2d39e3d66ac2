"""Shared fixtures: a private cache for the whole session, a tiny data set, a tiny trained run.

Session-scoped fixtures are read-only for tests: copy them (shutil.copytree) before changing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from datagen import make_image_folder


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """No test reads or writes the user's cache."""
    old = os.environ.get("IMGFLOW_CACHE")
    os.environ["IMGFLOW_CACHE"] = str(tmp_path_factory.mktemp("imgflow-cache"))
    yield
    if old is None:
        os.environ.pop("IMGFLOW_CACHE", None)
    else:
        os.environ["IMGFLOW_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 learnable classes of 16x16 RGB images: 40 train + 13 test per class."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "data", per_class=40, size=(16, 16))


def train_tiny(data: Path, run_dir: Path, resume: bool = False, **overrides):
    from imgflow.training.config import resolve_config
    from imgflow.training.loop import train

    settings = dict(model="seed-baseline", epochs=3, batch_size=16, precision="fp32")
    settings.update(overrides)
    config = resolve_config(str(data), settings)
    return train(config, run_dir, resume=resume, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A finished, evaluated seed-baseline run on tiny_data (do not modify: copy it)."""
    from imgflow.evaluation import evaluate_run

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-run"
    train_tiny(tiny_data, run_dir)
    evaluate_run(run_dir, progress=False)
    return run_dir
