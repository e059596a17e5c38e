"""The non-private baseline through the server: only sites that opted in train, they are never
excluded for their (infinite) epsilon, every release is in their ledgers, and DP stays enforced."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from mlflow import MlflowClient

from experiments.cli import main
from experiments.tiny_federation import TinyFederation
from models.checkpoint import load_checkpoint
from privacy.ledger import verify_ledger
from privacy.outbox import weights_hash
from privacy.report import build_report
from privacy.site_ledger import read_site_ledger
from server.consortium_ledger import read_consortium_ledger
from server.federation import federation_dir, run_federation
from server.reconcile import reconcile
from server.round_checkpoint import load_state
from server.tracking import default_tracking_uri


def configure(fed: TinyFederation, *, enabled: bool, opted_in: set[str],
              run_dir=None, **federation) -> TinyFederation:
    """Rewrite the federation's config: privacy on or off, the sites that allow non-private rounds."""
    data = yaml.safe_load(fed.config_path.read_text())
    data["privacy"]["enabled"] = enabled
    data["federation"].update(federation)
    for entry in data["federation"]["sites"]:
        entry["allow_non_private"] = entry["site_id"] in opted_in
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
        fed = dataclasses.replace(fed, run_dir=run_dir)
    fed.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return fed


def consortium_path(fed: TinyFederation):
    return federation_dir(fed.run_dir) / "consortium_ledger.jsonl"


def test_only_opted_in_sites_train_without_dp_and_dp_is_refused_after(
        new_federation, make_grid, make_settings, tmp_path):
    fed = configure(new_federation(rounds=2, min_sites=2), enabled=False,
                    opted_in={"site_0", "site_1"})
    result = run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    assert result.rounds_completed == 2, result.stop_reason
    assert [s.participants for s in result.rounds] == [["site_0", "site_1"]] * 2
    assert "privacy-disabled" in result.rounds[0].declined["site_2"]
    final = load_checkpoint(result.final_checkpoint)
    assert weights_hash(final.denoiser_state) != \
        weights_hash(load_checkpoint(fed.checkpoint).denoiser_state)

    standings = load_state(federation_dir(fed.run_dir)).standings
    for site_id in ("site_0", "site_1"):
        state = read_site_ledger(fed.ledger(site_id))
        assert [r.round for r in state.non_private] == [1, 2] and not state.rounds
        assert verify_ledger(fed.ledger(site_id)).ok
        report = reconcile(fed.ledger(site_id), consortium_path(fed))
        assert report.ok and report.reports == 2, report.lines()
        assert standings[site_id]["epsilon"] == math.inf and standings[site_id]["not_private"]
        assert standings[site_id]["excluded"] == ""
        privacy_report = build_report(fed.ledger(site_id))
        assert not privacy_report.differentially_private and privacy_report.spent == math.inf
    assert standings["site_2"]["excluded"] == "refused: privacy-disabled"
    assert not fed.ledger("site_2").exists()
    view = read_consortium_ledger(consortium_path(fed))
    assert view.latest_epsilon()["site_0"] == math.inf
    epsilon_by_site = json.loads((federation_dir(fed.run_dir) / "epsilon_by_site.json").read_text())
    assert epsilon_by_site["sites"]["site_1"]["epsilon"] == math.inf

    # A DP federation on the same site ledgers: the non-private sites refuse (infinite spend) and
    # are excluded; the DP site trains under its cap.
    dp = configure(fed, enabled=True, opted_in={"site_0", "site_1"}, run_dir=tmp_path / "dp_run",
                   rounds=1, min_sites=1)
    result = run_federation(make_grid(dp), make_settings(dp, evaluate=False, tracking=False))
    assert result.rounds_completed == 1 and result.rounds[0].participants == ["site_2"]
    assert set(result.rounds[0].declined) == {"site_0", "site_1"}
    assert all("budget-exhausted" in why for why in result.rounds[0].declined.values())
    for site_id in ("site_0", "site_1"):
        assert not read_site_ledger(dp.ledger(site_id)).rounds
    assert [r.round for r in read_site_ledger(dp.ledger("site_2")).rounds] == [1]


@pytest.mark.slow
def test_simulation_without_privacy_every_site_opted_in(new_federation, capsys):
    fed = configure(new_federation(rounds=2, min_sites=3), enabled=False,
                    opted_in={"site_0", "site_1", "site_2"})
    code = main(["federate", "--config", str(fed.config_path), "--out", str(fed.run_dir),
                 "--checkpoint", str(fed.checkpoint)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 2: trained site_0, site_1, site_2" in out and "all 2 rounds done" in out
    folder = federation_dir(fed.run_dir)
    final = load_checkpoint(folder / "checkpoint.pt")
    assert weights_hash(final.denoiser_state) != \
        weights_hash(load_checkpoint(fed.checkpoint).denoiser_state)
    assert read_consortium_ledger(consortium_path(fed)).completed_rounds() == [1, 2]
    for site_id in fed.site_ids:
        assert [r.round for r in read_site_ledger(fed.ledger(site_id)).non_private] == [1, 2]
        assert verify_ledger(fed.ledger(site_id)).ok
        assert reconcile(fed.ledger(site_id), consortium_path(fed)).ok
        report = (folder / "reports" / f"{site_id}.md").read_text()
        assert "NOT DIFFERENTIALLY PRIVATE" in report and "epsilon = infinity" in report
    client = MlflowClient(default_tracking_uri(fed.run_dir))
    experiment = client.get_experiment_by_name("fedsynth-tiny")
    [run] = client.search_runs([experiment.experiment_id], "tags.stage = 'federation'")
    assert run.data.params["privacy.enabled"] == "False"
    assert {m.value for m in client.get_metric_history(run.info.run_id, "round/sites")} == {3.0}
