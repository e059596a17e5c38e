"""The DP gate (privacy.dp_gate): AboveThreshold, the ``dp-gate`` ledger entry, the total spend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privacy.accounting import epsilon as dp_sgd_epsilon
from privacy.budget import CapSetting
from privacy.dp_gate import (GATE_KIND, GateBudgetExhausted, above_threshold, charge_gate,
                             closeness, gate_charges)
from privacy.ledger import verify_ledger
from privacy.site_ledger import PlanRecord, RoundRecord, SiteLedger
from privacy.spend import site_spend

SIGMA, Q, STEPS, DELTA = 1.1, 0.25, 8, 1e-5


def write_trained_ledger(path: Path, cap: float, rounds: int = 2) -> float:
    """A site ledger with a plan and ``rounds`` DP-SGD rounds; returns the DP-SGD epsilon."""
    ledger = SiteLedger(path)
    stamp = dict(timestamp="2025-01-01T00:00:00Z", fedsynth_version="test")
    ledger.append(PlanRecord(target_epsilon=cap, delta=DELTA, accountant="rdp",
                             noise_multiplier=SIGMA, sample_rate=Q, num_patients=16,
                             expected_batch_size=4, local_epochs=1, steps_per_round=STEPS,
                             planned_rounds=3, planned_epsilon=1.0, max_grad_norm=1.0,
                             clipping="flat", **stamp))
    for r in range(1, rounds + 1):
        spent = dp_sgd_epsilon([(SIGMA, Q, STEPS * r)], DELTA, "rdp")
        ledger.append(RoundRecord(round=r, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS,
                                  accountant="rdp", delta=DELTA, epsilon=spent,
                                  target_epsilon=cap, num_patients=16,
                                  model_hash_before="0" * 64, model_hash_after="1" * 64, **stamp))
    return dp_sgd_epsilon([(SIGMA, Q, STEPS * rounds)], DELTA, "rdp")


def charge(path: Path, query_id: str, epsilon: float = 0.5, cap: float = 10.0):
    return charge_gate(path, query_id=query_id, epsilon=epsilon, num_candidates=4,
                       threshold_policy="fixed", candidates_sha256="ab" * 32,
                       own=CapSetting(cap, DELTA), consortium=None)


def test_closeness_is_one_for_copies_and_zero_beyond_the_threshold() -> None:
    np.testing.assert_allclose(closeness(np.array([0.0, 0.1, 0.2, 0.5]), 0.2), [1.0, 0.5, 0.0, 0.0])


def test_above_threshold_passes_far_candidates_and_halts_at_the_first_copy() -> None:
    rng = np.random.default_rng(0)
    # At a huge epsilon the noise vanishes: the exact rule, halting at the first crossing.
    answers = above_threshold(np.array([0.0, 0.2, 1.0, 0.0, 0.0]), 1e9, rng)
    assert answers.tolist() == [True, True, False, False, False]
    assert above_threshold(np.zeros(6), 1e9, rng).all()
    # At a moderate epsilon answers are noisy, but a copy fails far more often than a far one.
    copies = np.mean([not above_threshold(np.array([1.0]), 10.0, rng)[0] for _ in range(2000)])
    far = np.mean([not above_threshold(np.array([0.0]), 10.0, rng)[0] for _ in range(2000)])
    assert copies > 0.7 and far < 0.3
    with pytest.raises(ValueError):
        above_threshold(np.zeros(2), 0.0, rng)


def test_a_gate_charge_is_a_ledger_entry_and_counts_in_the_spend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    sgd = write_trained_ledger(path, cap=10.0)
    record = charge(path, "release-0001", 0.5)
    assert record.dp_sgd_epsilon == pytest.approx(sgd)
    assert record.total_epsilon == pytest.approx(sgd + 0.5)
    charge(path, "release-0002", 0.25)
    verified = verify_ledger(path)
    assert verified.ok
    assert [e.kind for e in verified.entries] == ["plan", "round", "round", GATE_KIND, GATE_KIND]
    assert [g.query_id for g in gate_charges(path)] == ["release-0001", "release-0002"]
    spend = site_spend(SiteLedger(path).state())
    assert spend.dp_sgd == pytest.approx(sgd) and spend.gate == pytest.approx(0.75)
    assert spend.total == pytest.approx(sgd + 0.75) and spend.cap == 10.0 and spend.delta == DELTA
    assert spend.rounds == 2 and spend.gate_queries == 2


def test_a_site_out_of_budget_refuses_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    cap = dp_sgd_epsilon([(SIGMA, Q, STEPS * 2)], DELTA, "rdp") + 0.3
    sgd = write_trained_ledger(path, cap=cap)
    charge(path, "q1", 0.25, cap=cap)              # fits: sgd + 0.25 <= cap
    before = path.read_bytes()
    with pytest.raises(GateBudgetExhausted, match="refused") as caught:
        charge(path, "q2", 0.25, cap=cap)          # sgd + 0.5 > cap
    assert caught.value.would_be == pytest.approx(sgd + 0.5)
    assert path.read_bytes() == before and len(gate_charges(path)) == 1


def test_a_site_that_never_trained_uses_its_configured_cap(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "ledger.jsonl"
    charge(path, "q1", 0.5, cap=0.6)
    assert site_spend(SiteLedger(path).state()).total == pytest.approx(0.5)
    with pytest.raises(GateBudgetExhausted):
        charge(path, "q2", 0.5, cap=0.6)
