"""Run every benchmark in this folder and write BENCHMARKS.md with the machine it ran on."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import os
import platform
import pkgutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_NOT_BENCHMARKS = {"run_all", "__main__"}


def benchmark_names() -> list[str]:
    """Every module of this package that exposes ``run(quick)``, in name order."""
    import experiments.benchmarks as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_BENCHMARKS or info.name.startswith("_"):
            continue
        names.append(info.name)
    return sorted(names)


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, default=str)[:200] + "`"
    return str(value)


def _flatten(result: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(result, dict):
        rows = []
        for key, value in result.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, result)]


def render(results: dict[str, Any], host: dict[str, Any], quick: bool) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# fedsynth benchmarks", "",
             f"Measured {stamp} with `fedsynth benchmark{' --quick' if quick else ''}`. "
             "Every figure is a ratio or a rate measured side by side in one run; "
             "absolute times depend on the machine below.", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in host.items()]
    for name, result in results.items():
        lines += ["", f"## {name}", ""]
        if isinstance(result, dict) and "error" in result and len(result) == 1:
            lines.append(f"Failed: {result['error']}")
            continue
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in _flatten(result)]
    return "\n".join(lines) + "\n"


def run_all(out: Path, quick: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks (all, or ``only``) and write ``out``; returns the results."""
    names = benchmark_names()
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    results: dict[str, Any] = {}
    for name in (only or names):
        log.info("benchmark %s ...", name)
        start = time.perf_counter()
        module = importlib.import_module(f"experiments.benchmarks.{name}")
        try:
            results[name] = module.run(quick=quick)
        except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others
            log.exception("benchmark %s failed", name)
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        log.info("benchmark %s done in %.1f s", name, time.perf_counter() - start)
    out.write_text(render(results, machine(), quick))
    return results
