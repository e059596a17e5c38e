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
