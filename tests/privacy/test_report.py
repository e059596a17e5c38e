"""The officer's epsilon report: figures recomputed two ways, formats, plot and scope statement."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from privacy.accounting import INDEPENDENT_TOLERANCE
from privacy.budget import BudgetExhausted, SiteBudget
from privacy.calibration import SchedulePlan
from privacy.report import build_report, plot_png, render_html, render_json, render_markdown
from privacy.ledger import Ledger, LedgerError
from privacy.site_ledger import SiteLedger

HASH = "0" * 64


SCHEDULE = SchedulePlan(target_epsilon=3.5, delta=1e-3, accountant="rdp", noise_multiplier=1.3,
                        sample_rate=0.2, num_patients=40, expected_batch_size=8, local_epochs=1,
                        steps_per_round=5, planned_rounds=4)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", SCHEDULE, max_grad_norm=0.5)
    for number in (1, 2, 3):
        budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)
    return budget.path


def test_report_recomputes_every_round(ledger: Path):
    report = build_report(ledger)
    rounds = SiteLedger(ledger).state().rounds
    assert report.chain_intact and report.entries == 4
    assert [row.round for row in report.rows] == [1, 2, 3]
    for row, record in zip(report.rows, rounds):
        assert row.epsilon == record.epsilon == row.replayed_epsilon
        assert INDEPENDENT_TOLERANCE["rdp"].agrees(row.epsilon, row.independent_epsilon)
    assert report.all_agree
    assert sum(row.spend for row in report.rows) == pytest.approx(rounds[-1].epsilon)
    assert report.spent == rounds[-1].epsilon and report.cap == 3.5
    assert report.remaining == pytest.approx(3.5 - report.spent)
    # The report's look-ahead agrees with enforcement: that many more rounds fit, the next is
    # refused.
    assert report.rounds_remaining == 1  # 3 rounds: 2.88, a 4th: 3.30, a 5th: 3.68 > 3.5
    budget = SiteBudget(ledger)
    for number in range(4, 4 + report.rounds_remaining):
        budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)
    with pytest.raises(BudgetExhausted):
        budget.check(4 + report.rounds_remaining)
    assert report.independent_total_pld < report.independent_total_rdp  # PLD is tighter


def test_scope_statement_names_what_is_not_covered(ledger: Path):
    report = build_report(ledger)
    covered, not_covered = " ".join(report.covers), " ".join(report.not_covered)
    assert "weights this site sent" in covered and "patient" in covered
    assert "q = 0.2" in covered and "norm 0.5" in covered
    for phrase in ("Release-gate answers", "N = 40", "Hyper-parameter tuning",
                   "outside the DP-SGD"):
        assert phrase in not_covered


def test_formats_and_plot(ledger: Path):
    report = build_report(ledger)
    png = plot_png(report)
    assert png.startswith(b"\x89PNG")
    markdown = render_markdown(report, "report.epsilon.png")
    assert "| round 3 | 5 |" in markdown and "![epsilon per round](report.epsilon.png)" in markdown
    assert "delta" in markdown.lower() and "rdp" in markdown
    page = render_html(report, png)
    assert "data:image/png;base64," in page and "What it does not cover" in page
    data = json.loads(render_json(report))
    assert data["rows"][2]["epsilon"] == report.rows[2].epsilon and data["all_agree"] is True


def test_entries_that_are_not_privacy_events_are_listed_apart(ledger: Path):
    spent = build_report(ledger).spent
    Ledger(ledger).append("officer-note", {"text": "checked"})
    report = build_report(ledger)
    assert report.other_entries == {"officer-note": 1} and len(report.rows) == 3
    assert report.spent == spent
    assert "1 officer-note: not privacy events" in render_markdown(report)


def test_a_ledger_without_a_plan_is_not_reported(tmp_path: Path):
    consortium = Ledger(tmp_path / "consortium.jsonl")
    consortium.append("mirror", {"site": "site_0", "round": 1})
    with pytest.raises(LedgerError, match="holds no plan entry"):
        build_report(consortium.path)


def test_a_wrong_figure_with_a_valid_hash_is_flagged(ledger: Path):
    # A writer that records a wrong epsilon (bug or forgery) keeps the chain valid; the
    # recomputation catches it.
    site = SiteLedger(ledger)
    last = site.state().rounds[-1]
    site.append(dataclasses.replace(last, round=4, epsilon=last.epsilon + 0.05))
    report = build_report(ledger)
    assert report.chain_intact and not report.all_agree
    assert [row.agrees for row in report.rows] == [True, True, True, False]
