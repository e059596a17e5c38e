"""The hash-chained ledger: durable appends, typed site entries, every kind of tampering caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.ledger import (GENESIS_HASH, Ledger, LedgerError, LedgerIntegrityError,
                            canonical_bytes, entry_hash, verify_ledger)
from privacy.site_ledger import PlanRecord, RoundRecord, SiteLedger


def _round(number: int, epsilon: float) -> RoundRecord:
    return RoundRecord(round=number, noise_multiplier=1.25, sample_rate=0.2, steps=5,
                       accountant="rdp", delta=1e-5, epsilon=epsilon, target_epsilon=10.0,
                       num_patients=40,
                       model_hash_before="a" * 64, model_hash_after="b" * 64,
                       timestamp="2025-01-01T00:00:00Z", fedsynth_version="0.1.0")


PLAN = PlanRecord(target_epsilon=10.0, delta=1e-5, accountant="rdp", noise_multiplier=1.25,
                  sample_rate=0.2, num_patients=40, expected_batch_size=8, local_epochs=1,
                  steps_per_round=5, planned_rounds=3, planned_epsilon=9.99, max_grad_norm=1.0,
                  clipping="flat", timestamp="2025-01-01T00:00:00Z", fedsynth_version="0.1.0")


@pytest.fixture
def site_ledger(tmp_path: Path) -> Path:
    ledger = SiteLedger(tmp_path / "site" / "ledger.jsonl")
    ledger.append(PLAN)
    for number, value in ((1, 1.5), (2, 2.75), (3, 3.5)):
        ledger.append(_round(number, value))
    return ledger.path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_entries_are_chained_canonical_lines(site_ledger: Path):
    entries = Ledger(site_ledger).entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert [e.kind for e in entries] == ["plan", "round", "round", "round"]
    assert entries[0].prev_hash == GENESIS_HASH
    for previous, entry in zip(entries, entries[1:]):
        assert entry.prev_hash == previous.hash
    for raw, entry in zip(_lines(site_ledger), entries):
        assert raw == canonical_bytes(entry.to_json())
        assert entry.hash == entry_hash(entry.seq, entry.kind, entry.prev_hash, entry.payload)
    head = json.loads(site_ledger.with_name("ledger.jsonl.head").read_text())
    assert head == {"seq": 4, "hash": entries[-1].hash}


def test_typed_site_entries_round_trip(site_ledger: Path):
    state = SiteLedger(site_ledger).state()
    assert state.plan == PLAN
    assert state.rounds == [_round(1, 1.5), _round(2, 2.75), _round(3, 3.5)]


def test_edited_number_is_caught(site_ledger: Path):
    lines = _lines(site_ledger)
    assert b'"epsilon":2.75' in lines[2]
    lines[2] = lines[2].replace(b'"epsilon":2.75', b'"epsilon":1.75')
    _write(site_ledger, lines)
    problem = verify_ledger(site_ledger).problem
    assert (problem.line, problem.seq) == (3, 3)
    assert "does not match its hash" in problem.message


def test_deleted_line_is_caught(site_ledger: Path):
    lines = _lines(site_ledger)
    _write(site_ledger, lines[:1] + lines[2:])
    problem = verify_ledger(site_ledger).problem
    assert (problem.line, problem.seq) == (2, 3)
    assert "deleted, inserted or moved" in problem.message


def test_reordered_lines_are_caught(site_ledger: Path):
    lines = _lines(site_ledger)
    lines[1], lines[2] = lines[2], lines[1]
    _write(site_ledger, lines)
    problem = verify_ledger(site_ledger).problem
    assert problem.line == 2 and problem.seq == 3


def test_renumbered_moved_entry_is_caught(site_ledger: Path):
    # Moving an entry and fixing its seq still breaks its hash and the links around it.
    lines = [json.loads(raw) for raw in _lines(site_ledger)]
    lines[1], lines[2] = lines[2], lines[1]
    lines[1]["seq"], lines[2]["seq"] = 2, 3
    _write(site_ledger, [canonical_bytes(obj) for obj in lines])
    problem = verify_ledger(site_ledger).problem
    assert problem.line == 2
    assert "prev_hash" in problem.message or "hash" in problem.message


def test_cut_mid_line_is_caught(site_ledger: Path):
    data = site_ledger.read_bytes()
    site_ledger.write_bytes(data[:-20])
    result = verify_ledger(site_ledger)
    assert result.problem.line == 4 and "cut short" in result.problem.message
    assert len(result.entries) == 3


def test_whole_entries_cut_from_the_end_are_caught(site_ledger: Path):
    lines = _lines(site_ledger)
    _write(site_ledger, lines[:-1])
    problem = verify_ledger(site_ledger).problem
    assert (problem.line, problem.seq) == (4, 4)
    assert "head record names seq 4" in problem.message


def test_deleted_ledger_is_caught_by_its_head(site_ledger: Path):
    site_ledger.unlink()
    result = Ledger(site_ledger).verify()
    assert not result.ok and result.problem.seq == 1


def test_head_lagging_one_append_behind_is_not_an_error(site_ledger: Path):
    # A crash between the fsync'd append and the head update leaves the head one entry behind.
    entries = Ledger(site_ledger).entries()
    head = site_ledger.with_name("ledger.jsonl.head")
    head.write_bytes(canonical_bytes({"seq": 3, "hash": entries[2].hash}))
    assert verify_ledger(site_ledger).ok


def test_append_refuses_a_broken_ledger_and_never_repairs_it(site_ledger: Path):
    lines = _lines(site_ledger)
    lines[1] = lines[1].replace(b'"steps":5', b'"steps":4')
    _write(site_ledger, lines)
    before = site_ledger.read_bytes()
    with pytest.raises(LedgerIntegrityError, match="line 2 \\(seq 2\\)"):
        SiteLedger(site_ledger).append(_round(4, 4.0))
    assert site_ledger.read_bytes() == before


def test_payload_must_be_finite_json(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(LedgerError, match="not plain finite JSON"):
        ledger.append("round", {"epsilon": float("nan")})
    assert not ledger.path.exists()


def test_consortium_kinds_use_the_same_format(tmp_path: Path):
    ledger = Ledger(tmp_path / "consortium.jsonl")
    ledger.append("mirror", {"site": "site_0", "round": 1, "epsilon": 1.5})
    ledger.append("aggregate", {"round": 1, "model_hash": "c" * 64})
    assert verify_ledger(ledger.path).ok
    state = SiteLedger(ledger.path).state()  # not a site ledger: no plan, nothing to account
    assert state.plan is None and state.rounds == []
    assert [entry.kind for entry in state.other] == ["mirror", "aggregate"]


def test_lock_is_reentrant(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with ledger.locked():
        with ledger.locked():
            ledger.append("x", {"a": 1})
        ledger.append("x", {"a": 2})
    assert [e.payload["a"] for e in ledger.entries()] == [1, 2]


def _audit_verify(path: Path, capsys) -> tuple[int, str]:
    from experiments.cli import main

    code = main(["audit", "verify", "--ledger", str(path)])
    return code, capsys.readouterr().out


def test_a_deleted_head_record_is_a_failure_not_intact(site_ledger: Path, capsys):
    site_ledger.with_name("ledger.jsonl.head").unlink()
    problem = verify_ledger(site_ledger).problem
    assert problem is not None and "head record ledger.jsonl.head is missing" in problem.message
    code, out = _audit_verify(site_ledger, capsys)
    assert code == 1 and "BROKEN" in out and "intact," not in out


def test_a_cut_tail_with_its_head_deleted_is_caught(site_ledger: Path, capsys):
    _write(site_ledger, _lines(site_ledger)[:-1])
    site_ledger.with_name("ledger.jsonl.head").unlink()
    code, out = _audit_verify(site_ledger, capsys)
    assert code == 1 and "missing" in out


def test_an_empty_ledger_file_is_not_intact(tmp_path: Path, capsys):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"")
    assert not verify_ledger(path).ok
    code, out = _audit_verify(path, capsys)
    assert code == 1 and "empty" in out
    with pytest.raises(LedgerIntegrityError):
        Ledger(path).append("plan", {"x": 1})


def test_the_head_record_exists_before_the_first_entry(tmp_path: Path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    head = tmp_path / "ledger.jsonl.head"
    seen = []
    real_open = __import__("os").open

    def spy(path, *args, **kwargs):
        if str(path) == str(ledger.path):
            seen.append(json.loads(head.read_text()))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("privacy.ledger.os.open", spy)
    ledger.append("plan", {"x": 1})
    assert seen[0] == {"seq": 0, "hash": GENESIS_HASH}
    assert verify_ledger(ledger.path).ok
