"""Run every benchmark in this folder and write BENCHMARKS.md with the machine it ran on."""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import json
import logging
import pkgutil
import time
from pathlib import Path
from typing import Any

from experiments.benchmarks._host import OtherLoad, machine

log = logging.getLogger(__name__)

_NOT_BENCHMARKS = {"run_all", "__main__"}
SHARED_ABOVE = 0.05  # other processes' share of the machine's CPU above which the report says so


def benchmark_names() -> list[str]:
    """Every module of this package that exposes ``run(quick)``, in name order."""
    import experiments.benchmarks as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_BENCHMARKS or info.name.startswith("_"):
            continue
        names.append(info.name)
    return sorted(names)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, default=str)[:200] + "`"
    return " ".join(str(value).split()).replace("|", "\\|")  # one table cell


def _flatten(result: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(result, dict):
        rows = []
        for key, value in result.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, result)]


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """A list of records as one markdown table, nested records flattened into columns."""
    flat = [dict(_flatten(row)) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |"
              for row in flat]
    return lines


def _shared_note(share: float | None, cores: Any) -> list[str]:
    if share is None or share < SHARED_ABOVE:
        return []
    return [f"**Shared machine:** other processes used {share:.0%} of the {cores} cores' CPU time "
            "during this run. The ratios are measured side by side and hold; absolute times and "
            "rates are slower than on an idle machine.", ""]


def render(results: dict[str, Any], host: dict[str, Any], quick: bool,
           seconds: dict[str, float] | None = None, other_load: float | None = None) -> str:
    """The report: machine, then per benchmark its one-line ``summary``, its measures as a table
    and each list of records (e.g. one per configuration) as a table of its own."""
    seconds = seconds or {}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = f" in {sum(seconds.values()) / 60:.1f} min" if seconds else ""
    lines = ["# fedsynth benchmarks", "",
             f"Measured {stamp} with `fedsynth benchmark{' --quick' if quick else ''}`{total}. "
             "Every figure is a ratio or a rate measured side by side in one run; "
             "absolute times depend on the machine below.", ""]
    lines += _shared_note(other_load, host.get("cores"))
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in host.items()]
    if other_load is not None:
        lines.append(f"| other processes' CPU share during the run | {other_load:.0%} |")
    for name, result in results.items():
        took = f" ({seconds[name]:.0f} s)" if name in seconds else ""
        lines += ["", f"## {name}{took}", ""]
        if isinstance(result, dict) and "error" in result and len(result) == 1:
            lines.append(f"Failed: {result['error']}")
            continue
        result = dict(result) if isinstance(result, dict) else {"result": result}
        if isinstance(result.get("summary"), str):
            lines += [result.pop("summary"), ""]
        tables = {key: result.pop(key) for key in list(result) if _is_rows(result[key])}
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in _flatten(result)]
        for key, rows in tables.items():
            lines += ["", f"**{key}**", ""] + _rows_table(rows)
    return "\n".join(lines) + "\n"


def run_all(out: Path, quick: bool = False, only: list[str] | None = None,
            device: str | None = None) -> dict[str, Any]:
    """Run the benchmarks (all, or ``only``) and write ``out``; returns the results.

    ``device`` goes to the benchmarks whose ``run`` takes one (the others measure the CPU).
    """
    import torch

    names = benchmark_names()
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    host, threads = machine(), torch.get_num_threads()
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with OtherLoad() as load:
        for name in (only or names):
            log.info("benchmark %s ...", name)
            start = time.perf_counter()
            try:
                module = importlib.import_module(f"experiments.benchmarks.{name}")
                takes_device = "device" in inspect.signature(module.run).parameters
                results[name] = module.run(quick=quick, **({"device": device}
                                                           if takes_device else {}))
            except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others
                log.exception("benchmark %s failed", name)
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            finally:
                torch.set_num_threads(threads)  # a benchmark sets its own; the next starts afresh
            seconds[name] = time.perf_counter() - start
            log.info("benchmark %s done in %.1f s", name, seconds[name])
    out.write_text(render(results, host, quick, seconds, load.share))
    return results
