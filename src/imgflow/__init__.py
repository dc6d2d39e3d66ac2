"""imgflow: the universal workflow of machine learning for image classification.

    import imgflow
    run = imgflow.train("my_photos", model="fast-small", epochs=3, out="runs/first")
    metrics = imgflow.evaluate(run)
    imgflow.predict(run, ["new_photo.jpg"])

The functions (train, evaluate, predict, inspect, run_workflow, export, report, lr_find, serve:
`imgflow.api`) load on first use, so that `import imgflow` and the command line stay quick and do
not import torch. No module of the package is named like one of them (the modules are
`prediction`, `exporting`, `serving`, `workflow`), so importing one never hides a function.
"""
from imgflow.version import __version__

_API = ("train", "evaluate", "predict", "inspect", "run_workflow", "export", "report", "lr_find", "serve")
__all__ = [*_API, "UserError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from imgflow import api

        return getattr(api, name)
    if name == "UserError":
        from imgflow.errors import UserError

        return UserError
    raise AttributeError(f"module 'imgflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
