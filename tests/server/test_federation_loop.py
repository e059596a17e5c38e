"""The server's round loop over real ClientApps (in-process grid): budgets, failures, crash and resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from flwr.app import Error, Message

from client.site_runtime import TrainInstruction, run_site_round
from configs import load_config
from experiments.loopback import LoopbackGrid
from models.checkpoint import load_checkpoint
from privacy.outbox import weights_hash
from privacy.protocol import ReplyStatus
from privacy.site_ledger import read_site_ledger
from server import federation as federation_module
from server.consortium_ledger import RESUME, SITE_FAILURE, read_consortium_ledger
from server.federation import (FederationError, FederationHalted, federation_dir, round_config_for,
                               run_federation)
from server.reconcile import reconcile
from server.round_checkpoint import load_state
from server.strategy import BudgetAwareFedAvg
from flwr.app import ArrayRecord


def site_rounds(fed, site_id: str) -> list[int]:
    path = fed.ledger(site_id)
    return [r.round for r in read_site_ledger(path).rounds] if path.exists() else []


def consortium(fed):
    return read_consortium_ledger(federation_dir(fed.run_dir) / "consortium_ledger.jsonl")


def test_three_sites_two_rounds_leave_matching_ledgers(new_federation, make_grid, make_settings):
    fed = new_federation(rounds=2, min_sites=2)
    result = run_federation(make_grid(fed), make_settings(fed, tracking=False))
    assert result.rounds_completed == 2 and result.stop_reason == "all 2 rounds done"
    assert [s.participants for s in result.rounds] == [fed.site_ids, fed.site_ids]
    view = consortium(fed)
    assert view.completed_rounds() == [1, 2]
    for site_id in fed.site_ids:
        assert site_rounds(fed, site_id) == [1, 2]
        report = reconcile(fed.ledger(site_id), view_path(fed))
        assert report.ok, report.lines()
        assert report.site_id == site_id and report.reports == 2
    assert load_state(federation_dir(fed.run_dir)).round == 2
    final = load_checkpoint(result.final_checkpoint)
    start = load_checkpoint(fed.checkpoint)
    assert weights_hash(final.denoiser_state) != weights_hash(start.denoiser_state)
    assert weights_hash(final.autoencoder_state) == weights_hash(start.autoencoder_state)  # frozen
    assert all("val/diffusion_loss" in s.metrics and "val/mmd" in s.metrics for s in result.rounds)


def view_path(fed):
    return federation_dir(fed.run_dir) / "consortium_ledger.jsonl"


def spend_one_earlier_round(fed, site_id: str, planned_rounds: int, server_round: int) -> None:
    """The site took part in an earlier study under a plan of ``planned_rounds`` rounds."""
    config = load_config(fed.config_path)
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation,
                                                                        rounds=planned_rounds))
    base = load_checkpoint(fed.checkpoint)
    strategy = BudgetAwareFedAvg(1, ArrayRecord(torch_state_dict=base.autoencoder_state))
    round_config = round_config_for(config, base, strategy, server_round, base.denoiser_state,
                                    weights_hash(base.autoencoder_state))
    site = next(s for s in config.federation.sites if s.site_id == site_id)
    outcome = run_site_round(site, TrainInstruction(round_config, base.denoiser_state,
                                                    base.autoencoder_state))
    assert outcome.reply.status is ReplyStatus.OK


def test_a_spent_site_is_excluded_and_the_run_carries_on(new_federation, make_grid, make_settings):
    fed = new_federation(rounds=3, min_sites=2)
    # site_2 arrives with most of its budget spent in an earlier study (1 of 2 planned rounds).
    spend_one_earlier_round(fed, "site_2", planned_rounds=2, server_round=100)
    result = run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    assert result.rounds_completed == 3
    assert [s.participants for s in result.rounds] == [fed.site_ids, ["site_0", "site_1"],
                                                       ["site_0", "site_1"]]
    # It trained once more (the last round its cap allows), then the server stopped asking it.
    assert site_rounds(fed, "site_2") == [100, 1]
    assert [r.round for r in consortium(fed).site_reports("site_2")] == [1]
    standing = json.loads((federation_dir(fed.run_dir) / "epsilon_by_site.json").read_text())
    assert "cap" in standing["sites"]["site_2"]["excluded"]
    assert standing["sites"]["site_2"]["epsilon"] <= 10.0
    for site_id in ("site_0", "site_1"):
        assert site_rounds(fed, site_id) == [1, 2, 3]


def test_every_site_spent_ends_the_run_early(new_federation, make_grid, make_settings):
    fed = new_federation(rounds=2, min_sites=1)
    first = run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    assert first.rounds_completed == 2
    # Extending the run: every site's plan was calibrated for 2 rounds at its cap.
    config = yaml.safe_load(fed.config_path.read_text())
    config["federation"]["rounds"] = 4
    fed.config_path.write_text(yaml.safe_dump(config))
    again = run_federation(make_grid(fed), make_settings(fed, resume=True, evaluate=False, tracking=False))
    assert again.rounds_completed == 2 and "can still train" in again.stop_reason
    assert consortium(fed).completed_rounds() == [1, 2]
    assert all(site_rounds(fed, s) == [1, 2] for s in fed.site_ids)


class FailingGrid(LoopbackGrid):
    """Node of ``partition-id`` 2 errs from round ``from_round`` on (a crashed SuperNode)."""

    from_round = 2

    def deliver(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        server_round = int(message.content["config"]["server-round"])
        if context.node_config["partition-id"] == 2 and server_round >= self.from_round:
            return Message(Error(code=0, reason="Error: Node Unavailable"), reply_to=message)
        return super().deliver(message)


def test_a_failing_site_is_logged_and_the_round_goes_on(new_federation, make_grid, make_settings):
    fed = new_federation(rounds=2, min_sites=2)
    result = run_federation(make_grid(fed, FailingGrid), make_settings(fed, evaluate=False, tracking=False))
    assert result.rounds_completed == 2
    assert result.rounds[1].participants == ["site_0", "site_1"]
    assert result.rounds[1].failed == ["site_2"]
    failures = consortium(fed).effective(SITE_FAILURE)
    assert [(f.payload["round"], f.payload["site_id"]) for f in failures] == [(2, "site_2")]
    assert site_rounds(fed, "site_2") == [1]


def test_below_the_minimum_the_round_fails_cleanly_and_resumes_without_double_counting(
        new_federation, make_grid, make_settings):
    fed = new_federation(rounds=2, min_sites=3)
    with pytest.raises(FederationHalted, match="round 2: 2 site"):
        run_federation(make_grid(fed, FailingGrid), make_settings(fed, evaluate=False, tracking=False))
    assert load_state(federation_dir(fed.run_dir)).round == 1
    # site_0 and site_1 committed round 2 before the round failed; the global model stays at round 1.
    assert site_rounds(fed, "site_0") == [1, 2]
    result = run_federation(make_grid(fed), make_settings(fed, resume=True, evaluate=False, tracking=False))
    assert result.rounds_completed == 2
    for site_id in fed.site_ids:
        assert site_rounds(fed, site_id) == [1, 2]       # resent, not charged again
        assert reconcile(fed.ledger(site_id), view_path(fed)).ok
    resent = [r for r in consortium(fed).site_reports() if r.round == 2 and r.status == "ok"]
    assert len(resent) == 5   # 2 from the failed attempt + 3 in the rerun
    assert consortium(fed).completed_rounds() == [1, 2]


class SimulatedCrash(RuntimeError):
    pass


class CrashAfterSitesCommit(LoopbackGrid):
    """The server dies in round 2 after the sites trained and committed, before it saw the replies."""

    def push_messages(self, messages):
        messages = list(messages)
        self.round = int(messages[0].content["config"]["server-round"])
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        if self.round == 2:
            raise SimulatedCrash("server killed")
        return super().pull_messages(message_ids)


def _crash_after_ledger_append(monkeypatch):
    original = federation_module.save_round

    def crashing(folder, server_round, *args, **kwargs):
        if server_round == 2:
            raise SimulatedCrash("server killed")
        return original(folder, server_round, *args, **kwargs)
    monkeypatch.setattr(federation_module, "save_round", crashing)
    return lambda: monkeypatch.setattr(federation_module, "save_round", original)


@pytest.mark.parametrize("moment", ["after-sites-commit", "after-ledger-append"])
def test_server_crash_and_resume_counts_every_round_once(moment, new_federation, make_grid,
                                                        make_settings, monkeypatch):
    fed = new_federation(rounds=3, min_sites=2)
    if moment == "after-sites-commit":
        grid, restore = make_grid(fed, CrashAfterSitesCommit), lambda: None
    else:
        grid, restore = make_grid(fed), _crash_after_ledger_append(monkeypatch)
    with pytest.raises(SimulatedCrash):
        run_federation(grid, make_settings(fed, evaluate=False))
    restore()
    assert load_state(federation_dir(fed.run_dir)).round == 1
    with pytest.raises(FederationError, match="--resume"):
        run_federation(make_grid(fed), make_settings(fed, evaluate=False))
    result = run_federation(make_grid(fed), make_settings(fed, resume=True, evaluate=False))
    assert result.rounds_completed == 3
    view = consortium(fed)
    assert view.completed_rounds() == [1, 2, 3]
    assert bool(view.effective(RESUME)) == (moment == "after-ledger-append")
    for site_id in fed.site_ids:
        assert site_rounds(fed, site_id) == [1, 2, 3]   # none twice, none lost
        assert reconcile(fed.ledger(site_id), view_path(fed)).ok
    # The MLflow run of the federation is continued, not restarted.
    from mlflow import MlflowClient
    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.run_id, "round/sites")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_resume_refuses_a_changed_privacy_setting(new_federation, make_grid, make_settings):
    fed = new_federation(rounds=1, min_sites=1)
    run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    config = yaml.safe_load(fed.config_path.read_text())
    config["privacy"]["max_grad_norm"] = 2.0
    fed.config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(FederationError, match="privacy.max_grad_norm"):
        run_federation(make_grid(fed), make_settings(fed, resume=True, evaluate=False, tracking=False))
