"""``fedsynth site-exec``: FAB pinning, the guard that keeps a FAB's modules from loading, and
one-line refusals. The real SuperNode runs are in tests/deployment/test_site_exec_deployment.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.site_exec import (FabFolderGuard, SiteExecError, WarmClientAppExecutor, WarmParent,
                              check_fab_hash)

APPROVED = "a" * 64
OTHER = "b" * 64


TEST_MODULES = ("fedsynth_fab_payload", "fedsynth_installed_module")


@pytest.fixture
def clean_imports():
    """Restore the import path and drop this file's throwaway modules (only those: unloading an
    extension module such as numpy's or grpc's and importing it again crashes the process)."""
    path, meta_path = list(sys.path), list(sys.meta_path)
    yield
    sys.path[:], sys.meta_path[:] = path, meta_path
    for name in TEST_MODULES:
        sys.modules.pop(name, None)


def _module(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nvalue = 1\n")


def test_the_guard_refuses_a_module_from_the_fab_folder_before_any_of_it_runs(tmp_path,
                                                                             clean_imports):
    apps = tmp_path / "flwr" / "apps"
    fab_dir = apps / "hostile.app.1.0.0.12345678"
    _module(fab_dir, "fedsynth_fab_payload", tmp_path / "fab_ran")
    _module(tmp_path / "installed", "fedsynth_installed_module", tmp_path / "installed_ran")
    sys.path[:0] = [str(fab_dir), str(tmp_path / "installed")]   # as Flower puts the FAB first
    sys.meta_path.insert(0, FabFolderGuard(apps))

    with pytest.raises(ImportError, match="would load from the FAB"):
        __import__("fedsynth_fab_payload")
    assert not (tmp_path / "fab_ran").exists()
    assert __import__("fedsynth_installed_module").value == 1   # outside the FAB folder: loads
    assert (tmp_path / "installed_ran").exists()


def test_the_guard_keeps_an_already_imported_package_even_when_the_fab_shadows_it(tmp_path,
                                                                                  clean_imports):
    apps = tmp_path / "apps"
    shadow = apps / "x.y.1.0.0.deadbeef" / "client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"open({str(tmp_path / 'shadow_ran')!r}, 'w')\n")
    (shadow / "client_app.py").write_text(f"open({str(tmp_path / 'shadow_ran')!r}, 'w')\n")
    import client.client_app as installed
    sys.path.insert(0, str(apps / "x.y.1.0.0.deadbeef"))
    sys.meta_path.insert(0, FabFolderGuard(apps))

    from flwr.supercore.object_ref import load_app   # what Flower's ClientApp loader calls
    app = load_app("client.client_app:app", ValueError, apps / "x.y.1.0.0.deadbeef")
    assert app is installed.app
    assert not (tmp_path / "shadow_ran").exists()


def test_fab_hashes_are_64_hex_digits():
    assert check_fab_hash(APPROVED.upper() + " ") == APPROVED
    for bad in ["", "abc", "g" * 64, APPROVED + "0"]:
        with pytest.raises(SiteExecError, match="not a FAB hash"):
            check_fab_hash(bad)


def _spec(fab_hash: str | None):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                         token="t0ken", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=7, fab_hash=fab_hash)


def test_a_task_of_an_unapproved_fab_is_refused_before_any_process_starts():
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResultStatus

    parent = WarmParent(warm=False)
    executor = WarmClientAppExecutor(frozenset({APPROVED}), parent)
    try:
        for fab in (OTHER, None):
            result = executor.launch(_spec(fab))
            assert result.status == LaunchResultStatus.FAILED
            assert "is not approved by this site" in result.message
        types, _ = executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP})
        assert types == {TaskType.CLIENT_APP}   # it never asks for ServerApp or other tasks
    finally:
        executor.close()
    assert not parent.alive()


def test_closing_does_not_wait_for_a_warm_up_that_is_still_running(monkeypatch):
    """Ctrl-C during the warm parent's imports: it is terminated after the grace period, not
    waited for (a warm-up stuck for any reason would otherwise hold the runner forever)."""
    import time

    import client.site_exec as site_exec

    monkeypatch.setattr(site_exec, "warm_up", lambda: time.sleep(600))
    parent = WarmParent(warm=True)
    started = time.monotonic()
    parent.close(grace_seconds=0.5)
    assert time.monotonic() - started < 30
    assert not parent.alive()


@pytest.mark.parametrize("arguments, expected", [
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure"], "--approve-fab / --approve-any-fab"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--approve-fab", "123"],
     "not a FAB hash"),
    (["--runtime-api-address", "127.0.0.1:9094", "--approve-any-fab"], "--insecure / --root-cert"),
    (["--runtime-api-address", "9094", "--insecure", "--approve-any-fab"], "not HOST:PORT"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--approve-any-fab",
      "--poll-seconds", "0"], "--poll-seconds 0.0: out of range; pass 0.01 to 60"),
])
def test_bad_settings_are_one_line_and_exit_2(arguments, expected):
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "site-exec", *arguments],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "; " in lines[0], done.stderr
