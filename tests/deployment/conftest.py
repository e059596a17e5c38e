"""Real Flower processes on loopback: a SuperLink, SuperNodes and `flwr run`, always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.deployment import (flwr_run_command, run_config_argument, superlink_command,
                                    supernode_command, write_flower_config)
from experiments.tiny_federation import TinyFederation, write_tiny_federation

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


class Processes:
    """Processes started by a test, each in its own process group (it and its children)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.env = env
        self.started: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        # A test run started in the background by a shell without job control inherits SIGINT
        # ignored, and an ignored signal stays ignored across exec: the processes would not see
        # a Ctrl-C. A handler (not SIG_IGN) here resets to the default in every child.
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   cwd=REPO, start_new_session=True)
        log.close()
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def run(self, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run to completion (own process group, killed on timeout)."""
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=self.env, cwd=REPO, start_new_session=True, text=True)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            raise AssertionError(f"{command[:3]} timed out after {timeout:g}s:\n{out[-3000:]}") from None
        return subprocess.CompletedProcess(command, process.returncode, out)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.started[name]
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for name in self.started:
            self.kill(name, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, process in self.started.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)   # stragglers of the group (SuperExec, apps)
            except (ProcessLookupError, PermissionError):
                pass
            if process.poll() is None:
                process.wait(timeout=10)


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, started through :mod:`experiments.deployment`."""

    def __init__(self, processes: Processes, flwr_home: Path):
        self.processes = processes
        self.flwr_home = flwr_home
        self.address = ""
        self.certificates = None

    def start_superlink(self, certificates=None) -> str:
        port = free_port()
        self.certificates = certificates
        self.processes.start("superlink", superlink_command(port, certificates, host="127.0.0.1"))
        wait_for_port(port)
        self.address = f"127.0.0.1:{port}"
        write_flower_config(self.flwr_home, self.address, None if certificates is None else certificates.ca)
        return self.address

    def start_supernode(self, name: str, site_yaml: Path, private_key: Path | None = None,
                        extra: list[str] | None = None):
        ca = None if self.certificates is None else self.certificates.ca
        command = supernode_command(self.address, site_yaml, free_port(), ca, private_key)
        return self.processes.start(name, command + (extra or []))

    def flwr(self, arguments: list[str], timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
        return self.processes.run(["flwr", *arguments], timeout)

    def run_app(self, config_path: Path, run_dir: Path, checkpoint: Path,
                timeout: float) -> subprocess.CompletedProcess:
        """`flwr run <repo> fedsynth --run-config ... --stream`, until the run ends."""
        run_config = run_config_argument(config_path, run_dir, checkpoint)
        return self.processes.run(flwr_run_command(REPO, run_config), timeout)


@pytest.fixture
def deployment(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = Processes(tmp_path / "logs", env)
    try:
        yield Deployment(processes, tmp_path / "flwr")
    finally:
        processes.stop_all()


@pytest.fixture(scope="session")
def deployment_cohort(tmp_path_factory) -> TinyFederation:
    """3 tiny sites and a random-init checkpoint, shared by the deployment tests."""
    return write_tiny_federation(tmp_path_factory.mktemp("deployment"), sites=3, patients=4)


@pytest.fixture
def new_federation(deployment_cohort, tmp_path):
    def build(**options) -> TinyFederation:
        options.setdefault("sites", 3)
        return write_tiny_federation(tmp_path / "federation", patients=4, cohort=deployment_cohort.cohort,
                                     checkpoint=deployment_cohort.checkpoint, **options)
    return build
