"""imgflow: the universal workflow of machine learning for image classification.

    import imgflow
    run = imgflow.train("my_photos", model="fast-small", epochs=3, out="runs/first")
    metrics = imgflow.evaluate(run)
    imgflow.predict(run, ["new_photo.jpg"])

The functions (train, evaluate, predict, inspect, workflow, export, report: `imgflow.api`) load on
first use, so that `import imgflow` and the command line stay quick and do not import torch.
"""
import sys
import types

from imgflow.version import __version__

_API = ("train", "evaluate", "predict", "inspect", "workflow", "export", "report")
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


class _CallableModule(types.ModuleType):
    """A submodule named like an API function (imgflow.predict, .workflow, .export): still that
    module for imports and patching, and calling it calls the function."""

    def __call__(self, *args, **kwargs):
        from imgflow import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """Importing a submodule sets the package attribute of its name (`imgflow.predict` becomes
    the module imgflow/predict.py, the first time anything imports it); for the API's names that
    module is made callable, so that `imgflow.predict(...)` works before and after."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
