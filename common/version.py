"""The version every process reports: the installed distribution's own (pyproject.toml is its one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("headrace")
except PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0.0.0+unknown"
