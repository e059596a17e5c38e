"""``fedsynth benchmark``: every benchmark module is found and its results rendered."""

from __future__ import annotations

import importlib

import pytest

from experiments import cli
from experiments.benchmarks.run_all import benchmark_names, machine, render


def test_every_benchmark_module_is_found_and_runnable():
    names = benchmark_names()
    assert {"dp_step", "latent_vs_pixel", "federation_overhead", "gate_throughput"} <= set(names)
    for name in names:
        module = importlib.import_module(f"experiments.benchmarks.{name}")
        assert callable(module.run), name


def test_report_names_the_machine_and_every_measure():
    text = render({"demo_bench": {"ratio": 2.5, "sizes": {"small": 1.0}},
                   "broken": {"error": "RuntimeError: boom"}}, machine(), quick=True)
    assert "| cores |" in text and "| torch |" in text
    assert "## demo_bench" in text and "| ratio | 2.5 |" in text and "| sizes.small | 1 |" in text
    assert "Failed: RuntimeError: boom" in text


def test_unknown_benchmark_is_refused(tmp_path, capsys):
    assert cli.main(["benchmark", "--only", "no_such_bench", "--out", str(tmp_path / "B.md")]) == 2
    assert "unknown benchmark(s) no_such_bench" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_report_gives_the_summary_the_shared_machine_and_record_lists_as_tables():
    result = {"summary": "DP costs 1.4x the non-DP step.", "batch": 8,
              "results": [{"mode": "hooks", "check": {"correct": True}, "ratio": 1.4},
                          {"mode": "ew", "error": "RuntimeError: a | b\nsecond line"}]}
    text = render({"dp": result}, machine(), quick=False, seconds={"dp": 12.0}, other_load=0.3)
    assert "## dp (12 s)\n\nDP costs 1.4x the non-DP step.\n" in text
    assert "| batch | 8 |" in text
    assert "| mode | check.correct | ratio | error |" in text
    assert "| hooks | True | 1.4 |  |" in text
    assert "| ew |  |  | RuntimeError: a \\| b second line |" in text
    assert "other processes used 30%" in text
    assert "Shared machine" not in render({"dp": result}, machine(), quick=False, other_load=0.01)


def test_other_processes_exclude_this_process_and_its_children():
    import os
    import subprocess
    import sys

    from experiments.benchmarks._host import _others, _processes

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        others = _others(_processes())
        assert os.getpid() not in others and child.pid not in others
        assert 1 in others  # init is not ours
    finally:
        child.kill()
        child.wait()
