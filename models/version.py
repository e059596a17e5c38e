"""The installed fedsynth version, recorded in every checkpoint."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def fedsynth_version() -> str:
    """The installed fedsynth distribution's version; ``"0+unknown"`` from a bare source tree."""
    try:
        return version("fedsynth")
    except PackageNotFoundError:
        return "0+unknown"
