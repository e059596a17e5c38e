"""`fedsynth federate` end to end on Flower's simulation engine (Ray): 3 tiny sites x 2 rounds."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from experiments.cli import main
from privacy.site_ledger import read_site_ledger
from server.consortium_ledger import read_consortium_ledger
from server.federation import federation_dir
from server.reconcile import reconcile
from server.tracking import default_tracking_uri


def _artifacts(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder or None):
        paths |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


@pytest.mark.slow
def test_simulation_three_sites_two_rounds(new_federation, capsys):
    fed = new_federation(rounds=2, min_sites=2)
    code = main(["federate", "--config", str(fed.config_path), "--out", str(fed.run_dir),
                 "--checkpoint", str(fed.checkpoint)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 2: trained site_0, site_1, site_2" in out and "all 2 rounds done" in out

    ledger_path = federation_dir(fed.run_dir) / "consortium_ledger.jsonl"
    view = read_consortium_ledger(ledger_path)
    assert view.completed_rounds() == [1, 2]
    for site_id in fed.site_ids:
        assert [r.round for r in read_site_ledger(fed.ledger(site_id)).rounds] == [1, 2]
        report = reconcile(fed.ledger(site_id), ledger_path)
        assert report.ok and report.site_id == site_id and report.reports == 2, report.lines()

    client = MlflowClient(default_tracking_uri(fed.run_dir))
    experiment = client.get_experiment_by_name("fedsynth-tiny")
    [run] = client.search_runs([experiment.experiment_id], "tags.stage = 'federation'")
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["privacy.expected_batch_size"] == "4"
    for name in ["epsilon/site_0", "epsilon/site_1", "epsilon/site_2", "val/diffusion_loss",
                 "val/mmd", "round/wall_seconds", "round/bytes_sent", "round/bytes_received",
                 "round/sites"]:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    epsilons = sorted(m.value for m in client.get_metric_history(run.info.run_id, "epsilon/site_0"))
    assert 0 < epsilons[0] < epsilons[1] <= 10.0
    assert {m.value for m in client.get_metric_history(run.info.run_id, "round/sites")} == {3.0}
    artifacts = _artifacts(client, run.info.run_id)
    assert {"ledger/consortium_ledger.jsonl", "checkpoint/checkpoint.pt", "config/config.yaml",
            "privacy/epsilon_by_site.json", "privacy/sites/site_0.md",
            "previews/round_0002.png"} <= artifacts
