"""One spend figure: enforcement, replies, the officer's report and the release report agree.

The issue's example: cap 10, one DP-SGD round, a DP-gate query at epsilon 2, another round.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from client.site_runtime import _spend as reply_figures
from privacy.accounting import epsilon
from privacy.budget import BudgetExhausted, CapSetting, SiteBudget
from privacy.calibration import SchedulePlan
from privacy.dp_gate import charge_gate
from privacy.report import build_report, render_markdown
from privacy.site_ledger import SiteLedger
from privacy.spend import site_spend

HASH = "0" * 64
# About 0.94 epsilon per round at delta 1e-3: two rounds ~1.88, as in the issue.
PLAN = SchedulePlan(target_epsilon=10.0, delta=1e-3, accountant="rdp", noise_multiplier=1.7,
                    sample_rate=0.2, num_patients=40, expected_batch_size=8, local_epochs=1,
                    steps_per_round=10, planned_rounds=10)


def _gate(path: Path, query_id: str, eps: float) -> None:
    charge_gate(path, query_id=query_id, epsilon=eps, num_candidates=4, threshold_policy="fixed",
                candidates_sha256=HASH, own=CapSetting(10.0, 1e-3), consortium=None)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", PLAN, max_grad_norm=1.0)
    budget.charge(1, model_hash_before=HASH, model_hash_after=HASH)
    _gate(budget.path, "release-0001", 2.0)
    budget.charge(2, model_hash_before=HASH, model_hash_after=HASH)
    return budget.path


def test_the_issue_example_has_one_spend_everywhere(example: Path) -> None:
    sgd = epsilon([(1.7, 0.2, 20)], 1e-3, "rdp")
    state = SiteLedger(example).state()
    spend = site_spend(state)
    assert spend.dp_sgd == sgd and spend.gate == 2.0 and spend.total == sgd + 2.0
    # Enforcement, the round entry, the report and the reply all state that one figure.
    assert SiteBudget(example).spent() == spend.total
    assert state.rounds[-1].epsilon == spend.total
    report = build_report(example)
    assert report.spent == spend.total and report.remaining == pytest.approx(10.0 - spend.total)
    assert (report.dp_sgd_spent, report.gate_spent, report.gate_queries) == (sgd, 2.0, 1)
    figures = reply_figures(SiteLedger(example))
    assert figures["epsilon"] == spend.total and figures["target_epsilon"] == 10.0
    assert figures["epsilon_next"] == site_spend(state, extra_steps=10).total
    assert figures["epsilon_next"] == pytest.approx(epsilon([(1.7, 0.2, 30)], 1e-3, "rdp") + 2.0)


def test_the_report_rows_add_up_and_every_row_agrees(example: Path) -> None:
    report = build_report(example)
    assert [row.kind for row in report.rows] == ["round", "dp-gate", "round"]
    assert report.all_agree, [row for row in report.rows if not row.agrees]
    assert math.fsum(row.spend for row in report.rows) == pytest.approx(report.spent, abs=1e-12)
    assert report.rows[1].spend == pytest.approx(2.0)
    assert report.rows[-1].replayed_epsilon == report.spent
    # The independent recheck (dp_accounting + the gate charges) agrees within 1%.
    for row in report.rows:
        assert abs(row.independent_epsilon - row.replayed_epsilon) <= 0.01 * row.replayed_epsilon
    assert abs(report.independent_total_rdp - report.spent) <= 0.01 * report.spent
    markdown = render_markdown(report)
    assert "DP gate release-0001 (epsilon 2)" in markdown and "DISAGREEMENT" not in markdown


def test_the_look_ahead_and_enforcement_count_the_gate(example: Path) -> None:
    report = build_report(example)
    budget = SiteBudget(example)
    for number in range(3, 3 + report.rounds_remaining):
        budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)
    with pytest.raises(BudgetExhausted) as refused:
        budget.check(3 + report.rounds_remaining)
    # The refusal's figures are the same spend, gate included.
    assert refused.value.spent == site_spend(budget.state()).total
    assert refused.value.spent > epsilon([(1.7, 0.2, 10 * (2 + report.rounds_remaining))],
                                         1e-3, "rdp") + 1.99


def test_a_gate_charge_recorded_with_a_wrong_total_is_flagged(example: Path) -> None:
    from privacy.site_ledger import GateChargeRecord
    import dataclasses

    ledger = SiteLedger(example)
    last = ledger.state().gate_charges[-1]
    ledger.append(dataclasses.replace(last, query_id="forged", epsilon=0.5,
                                      total_epsilon=last.total_epsilon))  # omits this charge
    report = build_report(example)
    assert report.rows[-1].kind == GateChargeRecord.kind and not report.rows[-1].agrees
    assert not report.all_agree
