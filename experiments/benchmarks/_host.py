"""The machine a benchmark run measured on, and how much of it other processes used meanwhile.

:func:`machine` is taken before the benchmarks start (they change torch's thread count).
:class:`OtherLoad` samples ``/proc`` every few seconds and adds up the CPU time of every process
that is not this process or one of its descendants (Ray actors, Flower SuperNodes and ClientApps
started by a benchmark count as this run's). Processes that start and end between two samples are
missed, so the share is a lower bound. Linux only; elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    threads = f"{torch.get_num_threads()} by default (each benchmark reports its own)"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": threads, "gpu": gpu}


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process readable in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        processes[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return processes


def _others(processes: dict[int, tuple[int, float]]) -> dict[int, float]:
    """CPU seconds of the processes outside this process' tree."""
    mine, children = {os.getpid()}, {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    stack = [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            mine.add(child)
            stack.append(child)
    return {pid: cpu for pid, (_, cpu) in processes.items() if pid not in mine}


class OtherLoad:
    """``with OtherLoad() as load: ...``; then ``load.share``: the fraction of the machine's CPU
    (all cores) that other processes used during the block, or None where /proc is unavailable."""

    def __init__(self, interval: float = 2.0):
        self.interval, self.share = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._cpu_seconds = 0.0

    def _watch(self) -> None:
        previous = _others(_processes())
        while not self._stop.wait(self.interval):
            current = _others(_processes())
            self._cpu_seconds += sum(max(0.0, cpu - previous[pid])
                                     for pid, cpu in current.items() if pid in previous)
            previous = current

    def __enter__(self) -> "OtherLoad":
        self._started = time.monotonic()
        if Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            wall = time.monotonic() - self._started
            self.share = self._cpu_seconds / (wall * (os.cpu_count() or 1))
