"""imgflow's version, as installed: pyproject.toml is the one place it is written."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgflow")
except PackageNotFoundError:  # a source tree on sys.path that was never pip-installed
    __version__ = "0+unknown"
