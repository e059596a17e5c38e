"""Where a stage computes and at what precision: one ``device`` and one ``precision`` setting.

``device`` is ``auto`` (CUDA when this machine has it, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. Every stage resolves it once with :func:`resolve_device`, moves its networks and
batches there, and moves what leaves the stage (checkpoints, messages, NIfTI) back to the CPU
(:func:`cpu_state_dict`), so nothing written depends on the device it was computed on.

``precision`` is ``fp32`` or ``bf16``. :func:`autocast` returns torch's autocast context for
``bf16`` and a no-op for ``fp32``. bf16 has fp32's exponent range, so no loss scaling is needed:
fedsynth never uses a GradScaler (under DP-SGD a scaled gradient would be clipped at the wrong norm
and the calibrated noise would no longer match). Under DP the forward pass may run in bf16, but the
per-sample gradients, their norms, the clipping and the noise are fp32
(:mod:`privacy.grad_samplers` upcasts every layer's activations and backprops).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Mapping

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = ("fp32", "bf16")


class DeviceError(ValueError):
    """A device or precision this machine cannot honour. One line: what, and how to fix it."""


def device_problem(spec: str) -> str | None:
    """Why ``spec`` is not a device setting (None when it is one), for the config loader."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.match(spec):
        return f"must be auto, cpu, cuda or cuda:N (got {spec!r})"
    return None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a setting; ``None`` and ``auto`` pick CUDA when it exists.

    Raises :class:`DeviceError` (one line) for a malformed setting, CUDA requested on a machine
    without CUDA, or a CUDA index this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip()
    problem = device_problem(spec)
    if problem:
        raise DeviceError(f"device: {problem}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device: {spec} was requested but this machine has no CUDA GPU "
                          f"(or torch {torch.__version__} was built without CUDA); "
                          f"use --device cpu or device: auto")
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device: {spec} was requested but this machine has {count} CUDA "
                          f"device(s) (cuda:0..cuda:{count - 1}); pick one of them")
    return device


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` itself when ``device`` can run it; raises :class:`DeviceError` otherwise."""
    if precision not in PRECISIONS:
        raise DeviceError(f"precision: must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise DeviceError(f"precision: bf16 is not supported by {name}; use precision: fp32")
    return precision


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo flags). Elsewhere bf16 is emulated and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision: bf16``; a no-op context for ``fp32``."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``batch`` (tensors, possibly nested in dicts, lists or tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def cpu_state_dict(state: Mapping[str, Any] | torch.nn.Module) -> dict[str, Any]:
    """A state dict (or a module's) with every tensor as a detached, contiguous CPU copy, nested
    dicts too (optimizer states): what may be saved or sent whatever device or memory layout
    computed it."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone(memory_format=torch.contiguous_format)
        if isinstance(value, Mapping):
            return {k: cpu(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cpu(v) for v in value]
        if isinstance(value, tuple):
            return tuple(cpu(v) for v in value)
        return value
    return {k: cpu(v) for k, v in state.items()}


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since :func:`reset_peak_memory`, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so a wall-clock time covers it); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

