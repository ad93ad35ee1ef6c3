"""SpecMesh's shared Python code: settings, messages, the engine, the model family, the stack."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("specmesh")
except PackageNotFoundError:  # run from a checkout that was not installed
    __version__ = "0+unknown"
