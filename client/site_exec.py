"""A hospital's own SuperExec: warm ClientApp processes that run only the code the site installed,
and only for the app versions (FAB hashes) the site approved.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message. That process
imports Python, torch, MONAI, Opacus and Flower before fedsynth's handler runs: 3-16 s per site
and round (BENCHMARKS.md, ``federation_overhead``), and it imports the ClientApp from the FAB that
the SuperLink shipped, so the site runs whatever code the consortium's server named.

With ``flower-supernode --isolation process`` the site starts the task runner itself. This module
is that runner (``fedsynth site-exec``). It keeps Flower's protocol and its one-process-per-message
isolation, and changes two things:

* **Warm start.** A *warm parent* forked before anything else has imported the libraries and the
  site's installed fedsynth once. Every task is a ``fork()`` of it that calls Flower's own
  :func:`flwr.supernode.runtime.run_clientapp.run_clientapp`: a fresh process per message, without
  the imports. The warm parent never computes, so no thread pool exists when it forks.
* **Approved code only.** A task whose FAB hash is not in the site's approved list is refused
  before any process starts (one ERROR line; the server sees the site as silent for that round).
  In a task's process, Flower unpacks the FAB as usual, but nothing in it is imported: a
  meta-path guard refuses any module that would load from Flower's app folder
  (``$FLWR_HOME/apps``), and the ClientApp reference ``client.client_app:app`` resolves to the
  module already imported from the site's installation. Runtime dependency installation is off
  (it would run the FAB's build hooks). So the code that touches the scans is the fedsynth the
  site installed and reviewed, whatever the SuperLink sends.

Random state: every task process reseeds Python's, NumPy's and torch's default generators from
the OS (a fork copies them); DP noise never used them (``privacy.dp_trainer`` seeds its own
generator from :mod:`secrets`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What the warm parent imports once: the libraries a round needs and every top-level fedsynth
# package (a top-level name not yet imported would otherwise be looked up on sys.path, where
# Flower puts the FAB's folder first).
WARM_IMPORTS = ("torch", "torch._dynamo", "numpy", "monai", "opacus", "nibabel",
                "flwr.supernode.runtime.run_clientapp", "configs", "models", "privacy", "client",
                "client.client_app", "client.gate", "server")
DEFAULT_POLL_SECONDS = 0.1
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


class SiteExecError(ValueError):
    """The launcher's own settings are wrong (one line with the fix)."""


def check_fab_hash(value: str) -> str:
    """A FAB hash as ``flwr build`` / ``flwr ls`` print it: 64 lower-case hex digits."""
    text = value.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise SiteExecError(f"--approve-fab {value!r}: not a FAB hash; pass the 64-hex-digit "
                            f"SHA-256 that `flwr ls --run-id N --format json` shows as fab-hash, "
                            f"or `sha256sum app.fab`")
    return text


class FabFolderGuard(importlib.abc.MetaPathFinder):
    """Refuses any top-level import that would be loaded from ``apps_root`` (Flower's unpacked
    FABs). Submodules follow their package's own ``__path__``, so an installed package's
    submodules still load from the installation."""

    def __init__(self, apps_root: Path):
        self.apps_root = Path(apps_root).resolve()

    def _inside(self, location: str | None) -> bool:
        if not location:
            return False
        try:
            Path(location).resolve().relative_to(self.apps_root)
            return True
        except ValueError:
            return False

    def find_spec(self, name, path, target=None):
        if path is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is None:
            return None
        locations = [spec.origin, *(spec.submodule_search_locations or [])]
        if any(self._inside(location) for location in locations):
            raise ImportError(f"fedsynth site-exec: module {name!r} would load from the FAB in "
                              f"{self.apps_root}; this site runs only its installed code")
        return None


def warm_up() -> None:
    """Import everything a round needs, once, in the warm parent (no computation)."""
    for module in WARM_IMPORTS:
        importlib.import_module(module)


@dataclass(frozen=True)
class TaskLaunch:
    """What a task process needs: Flower's ``flwr-clientapp`` arguments."""

    runtime_api_address: str
    token: str
    insecure: bool
    root_certificates_path: str | None
    parent_pid: int | None
    task_id: int


def _reseed() -> None:
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch.seed()


def run_task(launch: TaskLaunch) -> int:
    """In a freshly forked task process: run Flower's ClientApp runtime with the guard in place.
    Returns the process's exit code (Flower ends it with ``sys.exit``)."""
    from flwr.common.constant import APP_DIR
    from flwr.supercore.utils import get_flwr_home
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _reseed()
    sys.meta_path.insert(0, FabFolderGuard(get_flwr_home() / APP_DIR))
    sys.argv = ["flwr-clientapp", "--runtime-api-address", launch.runtime_api_address]
    try:
        run_clientapp(
            runtime_api_address=launch.runtime_api_address, token=launch.token,
            insecure=launch.insecure,
            certificates=validate_and_resolve_root_certificates(launch.root_certificates_path,
                                                                launch.insecure),
            parent_pid=launch.parent_pid, runtime_dependency_install=False)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _warm_parent_loop(requests: int) -> None:
    """The warm parent: read one JSON launch per line from ``requests``; fork a task for each."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # tasks are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the launcher decides when we stop
    with os.fdopen(requests, "r", encoding="utf-8") as lines:
        for line in lines:                           # EOF: the launcher is gone
            launch = TaskLaunch(**json.loads(line))
            if os.fork() == 0:
                code = 1
                try:
                    code = run_task(launch)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)


class WarmParent:
    """A forked warm parent and the pipe the launcher sends it tasks on."""

    def __init__(self, warm: bool = True):
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # the warm parent
            os.close(write_end)
            code = 0
            try:
                if warm:
                    warm_up()
                _warm_parent_loop(read_end)
            except BaseException:   # noqa: BLE001 - a warm parent must never return to the caller
                logging.getLogger(__name__).exception("site-exec warm parent failed")
                code = 1
            finally:
                os._exit(code)
        os.close(read_end)
        self._pipe = os.fdopen(write_end, "w", encoding="utf-8", buffering=1)

    def launch(self, launch: TaskLaunch) -> None:
        self._pipe.write(json.dumps(launch.__dict__) + "\n")

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self, grace_seconds: float = 5.0) -> None:
        """End of input: the warm parent exits at EOF. One still busy after ``grace_seconds``
        (mid warm-up, which a Ctrl-C must not wait for) is terminated, then killed. Tasks it
        forked earlier are their own processes and finish on their own."""
        try:
            self._pipe.close()
        except OSError:
            pass
        for ending in (None, signal.SIGTERM, signal.SIGKILL):
            if ending is not None:
                try:
                    os.kill(self.pid, ending)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_seconds
            while time.monotonic() < deadline:
                try:
                    pid, _ = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == self.pid:
                    return
                time.sleep(0.05)


class WarmClientAppExecutor:
    """Flower's SuperExec ``Executor`` protocol for ClientApp tasks: approved FABs only, each task
    forked from the warm parent."""

    def __init__(self, approved_fabs: frozenset[str] | None, warm_parent: WarmParent):
        self.approved_fabs = approved_fabs   # None: any FAB (a local trial; logged at start)
        self.warm_parent = warm_parent

    def get_eligible_capacity(self, supported_task_types, *, insecure=False,
                              root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        del insecure, root_certificates_path
        return {TaskType.CLIENT_APP} & set(supported_task_types), set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False,
                          root_certificates_path=None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedsynth site-exec runs ClientApp tasks only, not "
                                       f"{spec.task_type}")
        if self.approved_fabs is not None and (spec.fab_hash or "") not in self.approved_fabs:
            message = (f"task {spec.task_id}: FAB {spec.fab_hash or '(no hash)'} is not approved "
                       f"by this site (approved: {', '.join(sorted(self.approved_fabs))}); "
                       f"refused before any process started")
            log.error("%s", message)
            return LaunchResult.failed(message)
        if not self.warm_parent.alive():
            return LaunchResult.failed("the site-exec warm parent has exited; restart "
                                       "fedsynth site-exec")
        self.warm_parent.launch(TaskLaunch(
            runtime_api_address=spec.runtime_api_address, token=spec.token,
            insecure=spec.insecure, root_certificates_path=spec.root_certificates_path,
            parent_pid=spec.parent_pid, task_id=spec.task_id))
        log.info("task %d (FAB %s): ClientApp process forked from the warm parent",
                 spec.task_id, (spec.fab_hash or "?")[:12])
        return LaunchResult.accepted()

    def close(self) -> None:
        self.warm_parent.close()

    def reconcile(self) -> None:
        """Nothing to maintain: the kernel reaps finished task processes."""


def _retry_invoker():
    """Flower's ``RetryInvoker``, retrying only transport errors (a SuperNode restarting).

    Flower's own HTTP invoker answers a 401 (a missing or different SuperExec secret) by sending
    its process SIGINT, which would end this runner as if someone had pressed Ctrl-C; here an HTTP
    error status reaches :func:`serve`, which names the fix."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def backoff(state) -> None:
        log.warning("site-exec: the SuperNode's Runtime API is unreachable (%s); retrying",
                    state.exception)

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=10.0),
                        recoverable_exceptions=(httpx.TransportError,), max_tries=None,
                        max_time=None, on_backoff=backoff)


def serve(runtime_api_address: str, *, approved_fabs: frozenset[str] | None, insecure: bool,
          root_certificates_path: str | None = None, auth_secret: bytes | None = None,
          poll_seconds: float = DEFAULT_POLL_SECONDS, warm: bool = True) -> None:
    """Fork the warm parent, then ask the SuperNode's Runtime API for ClientApp tasks every
    ``poll_seconds`` and launch each one, until interrupted (Flower's SuperExec loop, with
    :class:`WarmClientAppExecutor` as its executor)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)   # not a line per request
    warm_parent = WarmParent(warm=warm)   # first: fork before any thread or connection exists
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import (RuntimeVersionHttpInterceptor,
                                             SuperExecAuthHttpInterceptor)
    import httpx
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    executor = WarmClientAppExecutor(approved_fabs, warm_parent)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=auth_secret, protected_methods=frozenset(
                {ACQUIRE_TASK})))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=interceptors, retry_invoker=_retry_invoker())
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates_path,
                            runtime_dependency_install=False, executor=executor)
    if approved_fabs is None:
        log.warning("site-exec: no --approve-fab given; every FAB's tasks run (still only with "
                    "this site's installed code)")
    else:
        log.info("site-exec: approved FAB(s) %s", ", ".join(sorted(approved_fabs)))
    log.info("site-exec: asking %s for ClientApp tasks every %.2f s", runtime_api_address,
             poll_seconds)
    try:
        while True:
            if not warm_parent.alive():
                raise SiteExecError("the warm parent exited (see the lines above); restart "
                                    "fedsynth site-exec")
            types, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            try:
                answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=types,
                                                               agentapp_fab_hashes=fab_hashes))
            except httpx.HTTPStatusError as err:
                raise SiteExecError(_refusal_line(runtime_api_address,
                                                  err.response.status_code)) from None
            if answer.HasField("task") and answer.token:
                plugin.launch_task(token=answer.token, task=answer.task)
            time.sleep(poll_seconds)
    finally:
        client.close()
        executor.close()


def _refusal_line(address: str, status: int) -> str:
    if status == 401:
        return (f"{address}: the SuperNode refused this runner (HTTP 401: its SuperExec secret is "
                f"missing or different); pass --superexec-auth-secret-file with the file the "
                f"SuperNode was started with")
    return (f"{address}: the SuperNode answered HTTP {status} to a task request; check that it "
            f"runs with --isolation process and that the address is its --port")
