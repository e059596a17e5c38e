"""The one ServerApp: its run config picks the mode (federate | release); errors name run-config keys."""

from __future__ import annotations

import io
import json
import logging

import pytest
from flwr.app import Context, RecordDict

from server.release import ReleaseResult
from server.server_app import RunConfigError, _NoTraceback, app_path, make_server_app, run_mode


def run_config(fed, **extra) -> dict:
    return {"config-path": str(fed.config_path), "run-dir": str(fed.run_dir),
            "checkpoint": str(fed.checkpoint), "tracking": False, **extra}


def test_federate_then_release_through_the_same_app_and_grid(new_federation, make_grid, tmp_path):
    fed = new_federation(sites=2, rounds=1, min_sites=2, release={"chunk_size": 2})
    federated = run_mode(make_grid(fed), run_config(fed))
    assert federated.rounds_completed == 1
    out = tmp_path / "release"
    released = run_mode(make_grid(fed), {**run_config(fed, checkpoint=""), "mode": "release",
                                         "release-num": 2, "release-out": str(out)})
    assert isinstance(released, ReleaseResult) and released.requested == 2
    state = json.loads((out / "release_state.json").read_text())
    assert state["settings"]["model_sha256"]   # the federation's final checkpoint by default
    sent = sorted(r["query_id"] for r in state["rounds"])
    for site_id in fed.site_ids:
        log = fed.ledger(site_id).parent / "gate_log.jsonl"
        assert sorted(json.loads(line)["query_id"] for line in log.read_text().splitlines()) == sent


def test_run_config_errors_name_the_key_and_the_fix(new_federation, make_grid, tmp_path):
    fed = new_federation(sites=2, rounds=1)
    with pytest.raises(RunConfigError, match="'mode'"):
        run_mode(make_grid(fed), run_config(fed, mode="evaluate-everything"))
    with pytest.raises(RunConfigError, match="fedsynth pretrain"):
        run_mode(make_grid(fed), run_config(fed, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(RunConfigError, match="'config-path'"):
        run_mode(make_grid(fed), run_config(fed, **{"config-path": str(tmp_path / "none.yaml")}))
    with pytest.raises(RunConfigError, match="run config 'release-num'"):
        run_mode(make_grid(fed), run_config(fed, mode="release", **{"release-num": -1}))


def test_a_failing_server_app_logs_one_line_without_traceback(new_federation, make_grid):
    fed = new_federation(sites=2, rounds=1)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config=run_config(fed, mode="nonsense"))
    try:
        with pytest.raises(RunConfigError) as raised:
            make_server_app()(make_grid(fed), context)
        # What Flower's runner does with it:
        flwr_logger.error("ServerApp raised an exception", exc_info=raised.value)
    finally:
        flwr_logger.removeHandler(handler)
        for f in [f for f in flwr_logger.filters if isinstance(f, _NoTraceback)]:
            flwr_logger.removeFilter(f)
    text = stream.getvalue()
    assert "fedsynth: run config 'mode'" in text and "Traceback" not in text


def test_relative_paths_resolve_against_the_app_folder():
    from server.server_app import APP_DIR
    assert app_path("configs/demo.yaml") == APP_DIR / "configs" / "demo.yaml"
    assert (APP_DIR / "pyproject.toml").is_file()
