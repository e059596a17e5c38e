"""The ``--device`` option of the stage commands (pretrain, federate, sample, release, evaluate,
benchmark): it overrides the config's ``device`` for one run (``models.device``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

T = TypeVar("T")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--device auto|cpu|cuda|cuda:N`` to a command."""
    parser.add_argument("--device", metavar="DEVICE",
                        help="auto | cpu | cuda | cuda:N: where this run computes (default: the "
                             "config's device, else auto = CUDA when present)")


def checked_device(device: str | None) -> str | None:
    """``device`` itself when it is a device setting (or None); raises
    :class:`models.device.DeviceError`. (torch is imported only here: ``--help`` stays fast.)"""
    if device is None:
        return None
    from models.device import DeviceError, device_problem
    if device_problem(device):
        raise DeviceError(f"--device: {device_problem(device)}")
    return device


def with_device(config: T, device: str | None) -> T:
    """``config`` with its ``device`` replaced by ``--device`` when one was given."""
    if checked_device(device) is None:
        return config
    return dataclasses.replace(config, device=device)
