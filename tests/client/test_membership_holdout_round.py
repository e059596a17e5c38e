"""The membership holdout through a real site round (ClientApp) and ``fedsynth audit membership``
on the result: held-out patients never train, the split is in the ledger, only aggregates leave."""

from __future__ import annotations

import json

import yaml

from client.membership_audit import HOLDOUT_KIND, held_out_ids, recorded_holdout
from experiments.cli import main
from privacy.ledger import Ledger
from privacy.protocol import RefusalReason
from privacy.site_ledger import SiteLedger, read_site_ledger
from tests.client.test_client_app import ask, fed, one_thread, shared, status  # noqa: F401


def _set_holdout(fed, fraction: float) -> dict:
    site_yaml = fed.site_yaml("site_0")
    site_yaml.write_text(yaml.safe_dump(yaml.safe_load(site_yaml.read_text())
                                        | {"membership_holdout": fraction}))
    return {"site-config": str(site_yaml)}


def test_held_out_patients_never_train_and_the_audit_reports_aggregates(fed, tmp_path, capsys):
    node = _set_holdout(fed, 0.25)
    reply = ask(fed, 1, node_config=node, privacy={"expected_batch_size": 2})
    assert status(reply)["status"] == "ok"
    assert dict(reply.content["accounting"])["num-patients"] == 3       # 4 patients, 1 held out
    ledger = fed.ledger("site_0")
    kinds = [e.kind for e in Ledger(ledger).entries()]
    assert kinds[:3] == [HOLDOUT_KIND, "plan", "round"]                  # fixed before the plan
    state = read_site_ledger(ledger)
    assert state.plan.num_patients == 3 and state.plan.sample_rate == \
        state.plan.expected_batch_size / 3

    out = tmp_path / "membership"
    assert main(["audit", "membership", "--site-config", node["site-config"], "--checkpoint",
                 str(fed.checkpoint), "--out", str(out)]) == 0
    result = json.loads((out / "membership_audit.json").read_text())
    assert (result["members"], result["nonmembers"]) == (3, 1)
    assert set(result["attacks"]) == {"loss", "step_error"}
    for figures in result["attacks"].values():
        assert 0 <= figures["auc"]["value"] <= 1
        low, high = figures["auc"]["ci95"]
        assert low <= figures["auc"]["value"] <= high
    record = recorded_holdout(SiteLedger(ledger))
    text = (out / "membership_audit.json").read_text()
    patients = sorted({row.split(",")[0] for row in
                       (fed.cohort / "site_0" / "manifest.csv").read_text().splitlines()[1:]})
    assert len(held_out_ids(patients, 0.25, record.salt)) == 1
    assert not any(pid in text for pid in patients)                      # no patient id leaves
    assert "AUC" in capsys.readouterr().out

    # The split is fixed: a changed fraction is refused, nothing is trained or charged.
    entries = len(Ledger(ledger).entries())
    refused = ask(fed, 2, node_config=_set_holdout(fed, 0.5), privacy={"expected_batch_size": 2})
    assert status(refused)["reason"] == RefusalReason.PLAN_MISMATCH.value
    assert len(Ledger(ledger).entries()) == entries


def test_audit_needs_a_recorded_holdout(fed, tmp_path, capsys):
    assert main(["audit", "membership", "--site-config", str(fed.site_yaml("site_0")),
                 "--checkpoint", str(fed.checkpoint), "--out", str(tmp_path / "m")]) == 2
    assert "records no membership holdout" in capsys.readouterr().err


def test_canary_audit_calibrates_a_site_without_a_plan(fed, tmp_path, capsys):
    """No plan in the site's ledger yet: the mechanism is calibrated from the config and the site's
    own budget, over its TRAINING patients (the holdout excluded)."""
    from configs import load_config
    from privacy.calibration import calibrate

    raw = yaml.safe_load(fed.config_path.read_text())
    raw["federation"]["sites"][0]["membership_holdout"] = 0.25           # 3 training patients
    raw["privacy"]["expected_batch_size"] = 2
    fed.config_path.write_text(yaml.safe_dump(raw))
    config = load_config(fed.config_path)
    site = next(s for s in config.federation.sites if s.site_id == "site_0")
    out = tmp_path / "canaries"
    assert main(["audit", "canaries", "--config", str(fed.config_path), "--site", "site_0",
                 "--canaries", "100", "--out", str(out)]) == 0
    result = json.loads((out / "canary_audit.json").read_text())
    budget = config.site_budget(site)
    expected = calibrate(target_epsilon=budget.target_epsilon, delta=budget.delta,
                         num_patients=3, expected_batch_size=config.privacy.expected_batch_size,
                         rounds=config.federation.rounds,
                         local_epochs=config.federation.local_epochs,
                         accountant=config.privacy.accountant)
    assert result["mechanism"]["num_patients"] == 3
    assert result["mechanism"]["noise_multiplier"] == expected.noise_multiplier
    assert result["epsilon_lower_bound"] <= result["accountant_epsilon"] <= budget.target_epsilon
    assert not fed.ledger("site_0").exists()                             # the site's: untouched
