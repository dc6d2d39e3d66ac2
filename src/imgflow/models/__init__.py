"""Models: a registry of named variants (the notebook's two CNNs, the fast family) and their counts."""

from imgflow.models.registry import (
    ModelSpec,
    count_flops,
    count_params,
    create_model,
    describe_models,
    format_models,
    get_model_spec,
    list_models,
    register_model,
)

# Imported for their side effect: each module registers its variants.
from imgflow.models import seed as _seed  # noqa: E402,F401  isort: skip
from imgflow.models import fast as _fast  # noqa: E402,F401  isort: skip

__all__ = [
    "ModelSpec",
    "count_flops",
    "count_params",
    "create_model",
    "describe_models",
    "format_models",
    "get_model_spec",
    "list_models",
    "register_model",
]
