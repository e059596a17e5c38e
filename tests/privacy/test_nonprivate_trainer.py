"""The opt-in non-private baseline at the privacy layer: the trainer, its ledger entry, what the
budget, the DP gate, the report and the audit make of a ledger that holds one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from experiments.cli import main
from privacy.budget import BudgetExhausted, NonPrivateHistory, SiteBudget
from privacy.calibration import SchedulePlan
from privacy.site_ledger import SiteLedger as _SiteLedger
from privacy.spend import site_spend
from privacy.ledger import verify_ledger
from privacy.nonprivate_trainer import NonPrivateSettings, NonPrivateTrainer
from privacy.outbox import weights_hash
from privacy.protocol import ACCOUNTING_KEYS, STATUS_KEYS, ProtocolViolation, check_reply
from privacy.report import build_report, plot_png, render_json, render_markdown
from privacy.site_ledger import NonPrivateRoundRecord, SiteLedger

HASH = "0" * 64
# Patient -> scan indices: uneven, so a batch of patients is not a batch of scans.
PATIENTS = {"p0": [0, 1], "p1": [2], "p2": [3, 4, 5], "p3": [6], "p4": [7]}
SCHEDULE = SchedulePlan(target_epsilon=5.0, delta=1e-3, accountant="rdp", noise_multiplier=1.3,
                        sample_rate=0.2, num_patients=5, expected_batch_size=1, local_epochs=1,
                        steps_per_round=5, planned_rounds=4)


class Scans(Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 3, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index]}


class Toy(nn.Module):
    """``class_embedding`` is what ``trainable: attention_conditioning`` selects in a generic model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 3)
        self.class_embedding = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_embedding(torch.tanh(self.body(x)))


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((model(batch["x"]) - 1.0) ** 2).squeeze(1)


def trainer(model: nn.Module, ledger: Path, **settings) -> NonPrivateTrainer:
    options = dict(batch_size=2, local_epochs=2, learning_rate=0.05, max_physical_batch_size=3)
    return NonPrivateTrainer(model, row_losses, Scans(), PATIENTS, ledger,
                             NonPrivateSettings(**options | settings), seed=0)


def test_round_trains_commits_before_returning_and_is_resent_not_recorded_twice(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    model = Toy()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer(model, ledger).run_round(1)
    assert not result.resumed and weights_hash(result.weights) != weights_hash(start)
    [record] = SiteLedger(ledger).state().non_private
    # 2 epochs over 5 patients in batches of 2: 3 steps each.
    assert (record.round, record.num_patients, record.steps) == (1, 5, 6)
    assert record.model_hash_before == weights_hash(start)
    assert record.model_hash_after == weights_hash(result.weights) == weights_hash(model.state_dict())
    assert verify_ledger(ledger).ok

    model.load_state_dict(start)  # the same round asked again from the same starting weights
    again = trainer(model, ledger).run_round(1)
    assert again.resumed and weights_hash(again.weights) == record.model_hash_after
    assert len(SiteLedger(ledger).state().non_private) == 1


def test_trainable_subset_and_ema(tmp_path):
    model = Toy()
    body = model.body.weight.detach().clone()
    head = model.class_embedding.weight.detach().clone()
    result = trainer(model, tmp_path / "ledger.jsonl", trainable="attention_conditioning",
                     ema_decay=0.5).run_round(1)
    assert torch.equal(result.weights["body.weight"], body)       # frozen: not trained
    assert not torch.equal(result.weights["class_embedding.weight"], head)
    assert all(p.requires_grad for p in model.parameters())      # flags restored


def test_a_failed_round_records_nothing_and_restores_the_model(tmp_path):
    model = Toy()
    start = weights_hash(model.state_dict())

    def broken(model: nn.Module, batch) -> torch.Tensor:
        return row_losses(model, batch).sum()  # reduced over the batch: refused

    bad = NonPrivateTrainer(model, broken, Scans(), PATIENTS, tmp_path / "ledger.jsonl",
                            NonPrivateSettings(batch_size=2))
    with pytest.raises(ValueError, match="one loss per row"):
        bad.run_round(1)
    assert weights_hash(model.state_dict()) == start
    assert not (tmp_path / "ledger.jsonl").exists()


def _non_private_round(ledger: Path, number: int = 3) -> None:
    SiteLedger(ledger).append(NonPrivateRoundRecord(
        round=number, num_patients=5, batch_size=1, local_epochs=1, steps=5, learning_rate=1e-4,
        model_hash_before=HASH, model_hash_after=HASH, timestamp="2025-01-01T00:00:00Z",
        fedsynth_version="test"))


def test_a_dp_round_after_a_non_private_one_is_refused(tmp_path):
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", SCHEDULE, max_grad_norm=1.0)
    budget.charge(1, model_hash_before=HASH, model_hash_after=HASH)
    _non_private_round(budget.path, 2)
    assert budget.spent() == math.inf
    with pytest.raises(NonPrivateHistory) as refused:
        budget.check(3)
    assert isinstance(refused.value, BudgetExhausted)
    message = str(refused.value)
    assert "\n" not in message and "non-private" in message and "round 2" in message
    with pytest.raises(NonPrivateHistory):
        budget.charge(3, model_hash_before=HASH, model_hash_after=HASH)
    spend = site_spend(_SiteLedger(budget.path).state())
    assert spend.total == math.inf and spend.non_private_rounds == 1


def test_report_says_not_dp_and_keeps_the_independent_check_to_the_dp_rounds(tmp_path):
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", SCHEDULE, max_grad_norm=1.0)
    budget.charge(1, model_hash_before=HASH, model_hash_after=HASH)
    _non_private_round(budget.path, 2)
    report = build_report(budget.path)
    assert not report.differentially_private and report.non_private_rounds == 1
    assert report.spent == math.inf and report.remaining == 0 and report.rounds_remaining == 0
    assert [row.round for row in report.rows] == [1] and report.all_agree
    text = render_markdown(report)
    assert "NOT DIFFERENTIALLY PRIVATE" in text and "epsilon = infinity" in text
    assert "does NOT cover the non-private rounds" in text
    assert " ".join(report.covers).startswith("Nothing.")
    assert render_json(report) and plot_png(report).startswith(b"\x89PNG")


def test_report_of_a_ledger_with_only_non_private_rounds(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    _non_private_round(ledger, 1)
    _non_private_round(ledger, 2)
    report = build_report(ledger)
    assert not report.differentially_private and report.non_private_rounds == 2
    assert report.spent == math.inf and report.rows == []
    text = render_markdown(report)
    assert "infinite (epsilon = infinity): not differentially private" in text
    assert "Independent total" not in text and "| 2 | 5 | 5 |" in text
    assert plot_png(report).startswith(b"\x89PNG")


def test_audit_verify_and_report_cli_accept_the_entry(tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    _non_private_round(ledger, 1)
    assert main(["audit", "verify", "--ledger", str(ledger)]) == 0
    assert "intact, 1 entries (1 non-private-round)" in capsys.readouterr().out
    assert main(["report", "--ledger", str(ledger)]) == 0
    captured = capsys.readouterr()
    assert "NOT differentially private" in captured.err and "Spent" in captured.out


def test_replies_may_say_infinite_epsilon_and_nothing_else_infinite():
    site = {key: "" for key in STATUS_KEYS} | {"status": "refused"}
    metrics = {key: 1 for key in ACCOUNTING_KEYS}
    infinite = {"epsilon": math.inf, "epsilon-next": math.inf, "target-epsilon": math.inf}
    check_reply({"accounting": ("metrics", metrics | infinite), "site": ("config", site)})
    for bad in ({"epsilon": math.nan}, {"epsilon": -math.inf}, {"steps": math.inf},
                {"delta": math.inf}):
        with pytest.raises(ProtocolViolation, match=next(iter(bad))):
            check_reply({"accounting": ("metrics", metrics | bad), "site": ("config", site)})
