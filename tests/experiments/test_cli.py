"""The ``fedsynth`` entry point: help for every command, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import cli

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert commands, "no subcommands registered"
    for name in commands:
        assert name in out


def test_every_command_has_its_own_help(capsys):
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage: fedsynth" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: fedsynth" in capsys.readouterr().out


def test_unknown_command_exits_2():
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_config_error_is_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"privacy": {"target_epsilon": -1}}))
    result = run_cli("config", "check", str(bad), "--no-path-check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "privacy.target_epsilon: must be > 0 (got -1)" in lines[0]


def test_config_check_ok_and_show(tmp_path, capsys):
    assert cli.main(["config", "check", str(REPO / "configs" / "default.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli.main(["config", "show", str(REPO / "configs" / "demo.yaml"),
                     "--no-path-check"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["federation"]["sites"][2]["budget"]["target_epsilon"] == 5.0
    assert shown["privacy"]["accountant"] == "rdp"


def test_missing_data_path_exits_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"public_dir": "nowhere"}}))
    result = run_cli("config", "check", str(config))
    assert result.returncode == 2
    assert "data.public_dir: path does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_registered_user_error_exists_and_prints_as_one_line():
    """Each USER_ERRORS entry names a real exception class (a typo would silently turn that
    error back into a traceback); a halted federation (e.g. every site's budget spent) is one."""
    import importlib

    from experiments.cli import USER_ERRORS, is_user_error
    from server.federation import FederationHalted

    for module, name in USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and is_user_error(cls.__new__(cls))
    assert is_user_error(FederationHalted("no site trained"))
    assert not is_user_error(RuntimeError("a bug"))
