"""`audit reconcile`: a site's ledger against the consortium's mirror of it."""

from __future__ import annotations

import pytest

from privacy.ledger import Ledger
from server.federation import federation_dir, run_federation
from server.reconcile import DIVERGENCE, ROLLBACK, ReconcileError, reconcile


@pytest.fixture
def finished(new_federation, make_grid, make_settings):
    """A 2-site, 2-round federation that ran to the end."""
    fed = new_federation(sites=2, rounds=2, min_sites=2)
    run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    return fed, federation_dir(fed.run_dir) / "consortium_ledger.jsonl"


def rewrite(source, target, keep: int, edit=None):
    """A self-consistent ledger (chain and head record) of the first ``keep`` entries of ``source``,
    optionally with ``edit(entry) -> payload`` applied: what a restored or forged copy looks like."""
    ledger = Ledger(target)
    for entry in Ledger(source).entries()[:keep]:
        ledger.append(entry.kind, edit(entry) if edit else entry.payload)
    return target


def test_matching_ledgers_reconcile(finished):
    fed, consortium = finished
    for site_id in fed.site_ids:
        report = reconcile(fed.ledger(site_id), consortium)
        assert report.ok and report.site_id == site_id and report.reports == 2
        assert "consistent" in report.lines()[0]


def test_cutting_the_newest_entries_is_a_rollback(finished, tmp_path):
    fed, consortium = finished
    source = fed.ledger("site_0")
    restored = rewrite(source, tmp_path / "restored.jsonl", keep=2)   # plan + round 1, head rewritten
    assert Ledger(restored).verify().ok                                 # the site's own check passes
    report = reconcile(restored, consortium, site_id="site_0")
    assert not report.ok and [f.kind for f in report.findings] == [ROLLBACK]
    assert "seq 3" in report.findings[0].message and "round 2" in report.findings[0].message
    # A plain cut (head record left behind) is a rollback too.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:-1]))
    (tmp_path / "cut.jsonl.head").write_bytes(source.with_name(source.name + ".head").read_bytes())
    report = reconcile(cut, consortium, site_id="site_0")
    assert ROLLBACK in {f.kind for f in report.findings}


def test_a_rewritten_ledger_diverges(finished, tmp_path):
    fed, consortium = finished

    def lower_spend(entry):
        if entry.kind == "round" and entry.payload["round"] == 2:
            return {**entry.payload, "epsilon": entry.payload["epsilon"] / 2}
        return entry.payload
    forged = rewrite(fed.ledger("site_1"), tmp_path / "forged.jsonl", keep=3, edit=lower_spend)
    report = reconcile(forged, consortium)
    assert report.site_id == "site_1"      # identified by the entries the consortium saw
    assert [f.kind for f in report.findings] == [DIVERGENCE]
    assert "seq 3" in report.findings[0].message


def test_rounds_the_consortium_never_saw_are_noted(finished, tmp_path):
    fed, consortium = finished
    longer = rewrite(fed.ledger("site_0"), tmp_path / "longer.jsonl", keep=3)
    last = Ledger(fed.ledger("site_0")).entries()[-1]
    Ledger(longer).append("round", {**last.payload, "round": 3})
    report = reconcile(longer, consortium, site_id="site_0")
    assert report.ok and "not mirrored" in report.notes[0]


def test_an_unknown_site_must_be_named(finished, tmp_path):
    fed, consortium = finished
    empty = tmp_path / "other.jsonl"
    Ledger(empty).append("plan", {"x": 1})
    with pytest.raises(ReconcileError, match="--site"):
        reconcile(empty, consortium)


def test_the_officer_clears_an_alarm_only_once_the_ledger_reconciles(finished, tmp_path):
    from privacy.rollback_guard import (AlarmNotResolved, alarm_path, check_expected_head,
                                        pending_alarm)
    from privacy.rollback_guard import LedgerRollback
    from server.reconcile import clear_rollback_alarm

    fed, consortium = finished
    ledger = fed.ledger("site_0")
    newest = Ledger(ledger).entries()
    restored = rewrite(ledger, tmp_path / "restored.jsonl", keep=2)
    with pytest.raises(LedgerRollback):
        check_expected_head(restored, Ledger(restored).entries(), newest[-1].seq, newest[-1].hash, 3)
    assert alarm_path(restored).exists()
    with pytest.raises(AlarmNotResolved, match="restore it"):
        clear_rollback_alarm(restored, reconcile(restored, consortium, "site_0"), "Dr. Officer")
    for entry in newest[2:]:                       # the trusted copy's remaining entries
        Ledger(restored).append(entry.kind, entry.payload)
    report = reconcile(restored, consortium, "site_0")
    archived = clear_rollback_alarm(restored, report, "Dr. Officer")
    assert pending_alarm(restored) is None and "Dr. Officer" in archived.read_text()


def test_audit_reconcile_command(finished, tmp_path, capsys):
    from experiments.cli import main

    fed, consortium = finished
    arguments = ["audit", "reconcile", "--consortium-ledger", str(consortium), "--site-ledger"]
    assert main([*arguments, str(fed.ledger("site_1"))]) == 0
    assert "site site_1: consistent" in capsys.readouterr().out
    restored = rewrite(fed.ledger("site_0"), tmp_path / "restored.jsonl", keep=2)
    assert main([*arguments, str(restored), "--site", "site_0"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "ROLLBACK: the consortium saw site ledger entry seq 3" in out
    assert main([*arguments, str(restored), "--site", "site_0", "--clear-alarm",
                 "--officer", "Dr. Officer"]) == 2
    assert "restore it from a trusted copy" in capsys.readouterr().err


# --- DP-gate charges ------------------------------------------------------------------------

@pytest.fixture
def gated(tmp_path):
    """A site ledger (plan, one DP-SGD round, two DP-gate charges) and a consortium ledger that
    mirrored the round and both gate answers, as the server does."""
    from privacy.budget import CapSetting, SiteBudget
    from privacy.calibration import SchedulePlan
    from privacy.dp_gate import charge_gate
    from privacy.gate import GateAnswer, GateStatus
    from privacy.protocol import ReplyStatus, TrainReply
    from server.consortium_ledger import ConsortiumLedger

    plan = SchedulePlan(target_epsilon=10.0, delta=1e-3, accountant="rdp", noise_multiplier=1.5,
                        sample_rate=0.2, num_patients=40, expected_batch_size=8, local_epochs=1,
                        steps_per_round=5, planned_rounds=3)
    budget = SiteBudget.open(tmp_path / "site.jsonl", plan, max_grad_norm=1.0)
    record = budget.charge(1, model_hash_before="0" * 64, model_hash_after="1" * 64)
    consortium = ConsortiumLedger(tmp_path / "consortium.jsonl")
    head = Ledger(budget.path).entries()[-1]
    consortium.record_site(1, 7, TrainReply(status=ReplyStatus.OK, site_id="site_0", round=1,
                                            epsilon=record.epsilon, target_epsilon=10.0,
                                            ledger_seq=head.seq, ledger_head=head.hash))
    for query_id in ("rel-0001", "rel-0002"):
        charge = charge_gate(budget.path, query_id=query_id, epsilon=1.0, num_candidates=4,
                             threshold_policy="fixed", candidates_sha256="ab" * 32,
                             own=CapSetting(10.0, 1e-3), consortium=None)
        head = Ledger(budget.path).entries()[-1]
        consortium.record_gate(7, GateAnswer(
            status=GateStatus.OK, site_id="site_0", query_id=query_id, num_candidates=4,
            num_passed=3, epsilon_charged=1.0, epsilon_gate=charge.gate_epsilon,
            epsilon_total=charge.total_epsilon, target_epsilon=10.0, delta=1e-3,
            ledger_seq=head.seq, ledger_head=head.hash))
    return budget.path, consortium.path


def test_mirrored_gate_charges_reconcile(gated):
    site, consortium = gated
    report = reconcile(site, consortium)
    assert report.ok and report.site_id == "site_0" and report.reports == 3


def test_a_ledger_restored_from_before_its_gate_charges_is_a_rollback(gated, tmp_path, capsys):
    from experiments.cli import main

    site, consortium = gated
    restored = rewrite(site, tmp_path / "restored.jsonl", keep=2)      # plan + round only
    assert Ledger(restored).verify().ok
    report = reconcile(restored, consortium, site_id="site_0")
    assert [f.kind for f in report.findings] == [ROLLBACK, ROLLBACK]
    assert "gate query rel-0001" in report.findings[0].message
    code = main(["audit", "reconcile", "--site-ledger", str(restored), "--consortium-ledger",
                 str(consortium), "--site", "site_0"])
    assert code == 1 and "ROLLBACK" in capsys.readouterr().out


def test_a_rewritten_gate_charge_diverges(gated, tmp_path):
    site, consortium = gated

    def cheaper(entry):
        if entry.kind == "dp-gate" and entry.payload["query_id"] == "rel-0002":
            return {**entry.payload, "epsilon": 0.1, "total_epsilon": entry.payload["total_epsilon"]
                    - 0.9}
        return entry.payload
    forged = rewrite(site, tmp_path / "forged.jsonl", keep=4, edit=cheaper)
    report = reconcile(forged, consortium, site_id="site_0")
    assert [f.kind for f in report.findings] == [DIVERGENCE]
    assert "rel-0002" in report.findings[0].message


def test_a_gate_charge_the_consortium_never_saw_is_noted(gated, tmp_path):
    from privacy.budget import CapSetting
    from privacy.dp_gate import charge_gate

    site, consortium = gated
    charge_gate(site, query_id="rel-0003", epsilon=0.5, num_candidates=4,
                threshold_policy="fixed", candidates_sha256="ab" * 32,
                own=CapSetting(10.0, 1e-3), consortium=None)
    report = reconcile(site, consortium)
    assert report.ok and "not mirrored" in report.notes[0] and "DP-gate" in report.notes[0]


def test_the_next_gate_query_carries_the_head_of_the_mirrored_answers(gated):
    from server.consortium_ledger import read_consortium_ledger

    site, consortium = gated
    head = Ledger(site).entries()[-1]
    assert read_consortium_ledger(consortium).expected_heads() == {"site_0": (head.seq, head.hash)}
