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
