"""A non-finite per-patient gradient cannot defeat clipping; non-finite weights never leave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from privacy import dp_trainer
from privacy.budget import SiteBudget
from privacy.calibration import SchedulePlan
from privacy.dp_trainer import (DPSettings, DPTrainer, NonFiniteWeights, backward_per_patient,
                                privatise, release, zero_non_finite_patients)
from privacy.outbox import outbox_path
from privacy.site_ledger import SiteLedger


class Rows(Dataset):
    """Scan i: ``{"x": (2,)}``; row 1 overflows float32 in the loss (an infinite gradient)."""

    def __init__(self, values: list[list[float]]):
        self.values = torch.tensor(values, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.values[i]}


def squared_output(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"]).squeeze(-1).pow(2)


def _step_with_one_bad_patient() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    batch = {"x": torch.tensor([[0.5, -0.2], [1e30, 1e30]])}
    settings = DPSettings(max_grad_norm=1.0, expected_batch_size=2, learning_rate=0.1)
    module, optimizer = privatise(model, settings, noise_multiplier=0.0)
    backward_per_patient(module, optimizer, squared_output, batch, torch.tensor([0, 1]), 2,
                         "hooks")
    rows = model.weight.grad_sample.detach().clone()
    optimizer.step()
    release(module, optimizer)
    return model, rows


def test_a_non_finite_patient_row_is_zeroed_before_clipping():
    model, rows = _step_with_one_bad_patient()
    assert torch.isfinite(rows).all() and rows[1].abs().sum() == 0 and rows[0].abs().sum() > 0
    assert torch.isfinite(model.weight).all()


def test_without_the_zeroing_the_whole_step_turns_nan(monkeypatch):
    # The attack the defence stops: Opacus' clip factor for an infinite norm is 0, 0 * inf = NaN.
    monkeypatch.setattr(dp_trainer, "zero_non_finite_patients", lambda params: 0)
    model, rows = _step_with_one_bad_patient()
    assert not torch.isfinite(rows).all() and not torch.isfinite(model.weight).all()


def test_zeroing_covers_every_parameter_of_the_patient():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    a.grad_sample = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0], [4.0, 5.0, 6.0]])
    b.grad_sample = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]],
                                  [[float("inf"), 0.0], [0.0, 0.0]]])
    assert zero_non_finite_patients([a, b]) == 2
    assert a.grad_sample[0].tolist() == [1.0, 2.0, 3.0]
    assert a.grad_sample[1:].abs().sum() == 0 and b.grad_sample[1:].abs().sum() == 0
    assert b.grad_sample[0].sum() == 4.0


def _trainer(path: Path, lr: float) -> DPTrainer:
    plan = SchedulePlan(target_epsilon=50.0, delta=1e-3, accountant="rdp", noise_multiplier=1.0,
                        sample_rate=0.5, num_patients=4, expected_batch_size=2, local_epochs=1,
                        steps_per_round=2, planned_rounds=3)
    budget = SiteBudget.open(path, plan, max_grad_norm=1.0)
    torch.manual_seed(1)
    scans = Rows([[0.5, 0.1], [0.2, -0.3], [-0.4, 0.6], [0.3, 0.3]])
    patients = {"a": [0], "b": [1], "c": [2], "d": [3]}
    return DPTrainer(nn.Linear(2, 1), squared_output, scans, patients, budget,
                     DPSettings(max_grad_norm=1.0, expected_batch_size=2,
                                max_physical_batch_size=4),
                     seed=3, optimizer_factory=lambda params: torch.optim.SGD(params, lr=lr))


def test_non_finite_weights_are_refused_before_the_commit_and_never_charged_twice(tmp_path):
    path = tmp_path / "ledger.jsonl"
    trainer = _trainer(path, lr=float("inf"))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteWeights, match="non-finite weights"):
        trainer.run_round(1)
    state = SiteLedger(path).state()
    assert state.rounds == [] and not outbox_path(path).exists()
    assert all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    # The same round with a sane optimiser trains and is charged exactly once.
    result = _trainer(path, lr=0.1).run_round(1)
    assert not result.resumed and [r.round for r in SiteLedger(path).state().rounds] == [1]
    assert all(torch.isfinite(v).all() for v in result.weights.values())
