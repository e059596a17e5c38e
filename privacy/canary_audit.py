"""One-run privacy auditing of the site's DP-SGD: an empirical epsilon LOWER bound beside the
accountant's upper bound.

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). m canaries are drawn; each is included in the training set independently with
probability 1/2 (S_i = +1 included, -1 excluded). After ONE training run the auditor scores every
canary, guesses "included" for the k+ highest scores and "excluded" for the k- lowest (abstaining
on the rest), and counts v correct guesses out of r = k+ + k-. Their Theorem 5.2 / Corollary 5.4:
under (epsilon, delta)-DP, P[v correct] is bounded by a Binomial(r, e^eps / (1 + e^eps)) tail plus a
delta term; :func:`p_value_one_run` is the paper's Appendix D ``p_value_DP_audit`` and
:func:`epsilon_lower_bound` its ``get_eps_audit`` (the largest epsilon rejected at the confidence
level). Tested against the paper's printed values (App. D: m=1000, r=100, v=75, delta=1e-4 ->
0.673; Sec. 7: m=1e5, r=1510, v=1439, delta=1e-5 -> 2.675).

What is audited is the mechanism AS FEDSYNTH RUNS IT: :class:`privacy.dp_trainer.DPTrainer` (Opacus
Poisson sampling over patients, per-patient gradients, clipping to C, Gaussian noise sigma*C, the
step hook and the accountant restored from a ledger) with the site's sigma, q, C, clipping, steps
per round, rounds, accountant and delta. Canaries are white-box Dirac GRADIENT canaries, the
tightest honest choice (Nasr et al. 2023; Steinke et al. Sec. 7): the carrier model is linear,
``loss(x) = <w, x>``, so a patient's per-sample gradient is its input x. Canary i is a patient whose
input is ``2C * e_(i+1)``: its gradient is clipped to norm C and lies on its own coordinate, which
no other patient touches. The remaining patients (filling the audited set up to a multiple of the
site's N, so q = B/N is exactly the site's) have gradient ``2C * e_0``. A canary's score is minus
the total update of its coordinate (plain SGD, lr 1: the sum of the released noisy gradients, the
sufficient statistic; the site's Adam and EMA are post-processing of the same noisy gradients and
can only lower the bound). With privacy off, the audit trains with
:class:`privacy.nonprivate_trainer.NonPrivateTrainer`, fedsynth's non-private path.

The guess sizes are a fixed grid chosen before training; the bound reported is the best over the
grid with the confidence split over the grid (Bonferroni), so the maximum is honest.

Research use only: the audit writes a fresh ledger of its own in its output folder; it never reads
site scans and never writes to a site's ledger.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import Dataset

from privacy.accounting import epsilon as accountant_epsilon
from privacy.accounting import INDEPENDENT_METHOD, independent_epsilon
from privacy.budget import SiteBudget
from privacy.calibration import SchedulePlan, steps_per_epoch
from privacy.durable import atomic_write_bytes
from privacy.dp_trainer import DPSettings, DPTrainer
from privacy.nonprivate_trainer import NonPrivateSettings, NonPrivateTrainer
from privacy.site_ledger import PlanRecord, SiteLedger

CANARY_LEDGER = "canary_audit_ledger.jsonl"
SUMMARY_FILE = "canary_audit.json"
# Rows per forward pass: memory only (the carrier is tiny); it changes nothing in the mechanism.
_PHYSICAL_ROWS = 4096
# Guess sizes as fractions of m; each with k- = 0 and k- = k+.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5)


class CanaryAuditError(ValueError):
    """Audit inputs that cannot be used. One line: what, where, and the fix."""


def p_value_one_run(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP with m canaries (Steinke et al.
    2023, Corollary 5.4; App. D ``p_value_DP_audit``)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1 (got {eps}, {delta})")
    q = 1 / (1 + math.exp(-eps))  # the accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(beta, 1.0)
    if v == 0:
        return min(beta, 1.0)
    # The paper's loop, vectorised: alpha = max over i = 1..v of P[v > Binomial(r, q) >= v - i] / i
    # (np.cumsum adds in the loop's order).
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = max(0.0, float(np.max(below / np.arange(1, v + 1))))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct out of ``r`` guesses rejects at ``confidence``
    (App. D ``get_eps_audit``: bracket, then 30 bisection steps; the low end is returned)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    level = 1 - confidence
    low, high = 0.0, 1.0
    while p_value_one_run(m, r, v, high, delta) < level:
        high += 1
    for _ in range(30):
        middle = (low + high) / 2
        if p_value_one_run(m, r, v, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditedMechanism:
    """The site's DP-SGD as its plan runs it: sigma, q = B/N, steps per round x rounds, C, the
    accountant and delta. ``private=False`` audits fedsynth's non-private path (no noise, no
    clipping; ``learning_rate`` is its Adam step)."""

    noise_multiplier: float
    num_patients: int
    expected_batch_size: int
    local_epochs: int
    rounds: int
    accountant: str
    delta: float
    max_grad_norm: float
    clipping: str = "flat"
    target_epsilon: float = math.inf
    private: bool = True
    learning_rate: float = 1e-4

    @property
    def sample_rate(self) -> float:
        return self.expected_batch_size / self.num_patients

    @property
    def steps_per_round(self) -> int:
        return self.local_epochs * steps_per_epoch(self.sample_rate)

    @property
    def steps(self) -> int:
        return self.steps_per_round * self.rounds

    def epsilon(self) -> float:
        """The accountant's epsilon at ``delta`` after all audited steps (inf when not private)."""
        if not self.private:
            return math.inf
        return accountant_epsilon([(self.noise_multiplier, self.sample_rate, self.steps)],
                                  self.delta, self.accountant)

    def independent_epsilon(self) -> float:
        """The same epsilon by Google's dp_accounting (:mod:`privacy.accounting`)."""
        if not self.private:
            return math.inf
        return independent_epsilon([(self.noise_multiplier, self.sample_rate, self.steps)],
                                   self.delta, INDEPENDENT_METHOD[self.accountant])

    @classmethod
    def from_plan(cls, plan: PlanRecord, rounds: int) -> "AuditedMechanism":
        """The mechanism a site's ledger plan fixes, over ``rounds`` rounds."""
        return cls(noise_multiplier=plan.noise_multiplier, num_patients=plan.num_patients,
                   expected_batch_size=plan.expected_batch_size, local_epochs=plan.local_epochs,
                   rounds=int(rounds), accountant=plan.accountant, delta=plan.delta,
                   max_grad_norm=plan.max_grad_norm, clipping=plan.clipping,
                   target_epsilon=plan.target_epsilon)


class CarrierModel(nn.Module):
    """``loss(x) = <w, x>`` for x (R, dim): a row's gradient is its input. w starts at 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, dim) -> (R,)."""
        return self.linear(x).squeeze(-1)


class CanaryRows(Dataset):
    """Row j: ``{"x": scale * e_(coordinate[j])}`` (dim,), built on demand."""

    def __init__(self, coordinates: Sequence[int], dim: int, scale: float):
        self.coordinates, self.dim, self.scale = list(coordinates), dim, float(scale)

    def __len__(self) -> int:
        return len(self.coordinates)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = torch.zeros(self.dim)
        x[self.coordinates[index]] = self.scale
        return {"x": x}


def _carrier_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"])


@dataclass(frozen=True)
class GuessResult:
    """One guess set: k+ top scores guessed included, k- bottom scores guessed excluded."""

    k_plus: int
    k_minus: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class CanaryAudit:
    """The audit's figures (no site data: canaries are synthetic gradients)."""

    canaries: int
    included: int
    audited_patients: int
    audited_batch_size: int
    confidence: float
    seed: int
    mechanism: dict[str, Any]
    accountant_epsilon: float
    independent_epsilon: float
    epsilon_lower_bound: float
    best_guess: dict[str, int]
    guesses: list[GuessResult] = field(default_factory=list)
    ledger_head: str = ""

    @property
    def exceeds_accountant(self) -> bool:
        """True when the empirical lower bound is above the accountant's epsilon: an accounting
        or implementation bug (or a 1-in-20 chance at 95 % confidence)."""
        return self.epsilon_lower_bound > self.accountant_epsilon

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exceeds_accountant"] = self.exceeds_accountant
        for key in ("accountant_epsilon", "independent_epsilon"):
            if math.isinf(data[key]):
                data[key] = "inf"
        return data


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) guess sizes, fixed before training (:data:`GUESS_FRACTIONS` of m)."""
    grid: list[tuple[int, int]] = []
    for fraction in GUESS_FRACTIONS:
        k = max(1, int(round(fraction * m)))
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in grid:
                grid.append(pair)
    return grid


def score_guesses(scores: torch.Tensor, included: torch.Tensor, delta: float,
                  confidence: float = 0.95,
                  grid: Sequence[tuple[int, int]] | None = None) -> list[GuessResult]:
    """The bound of each guess set; ``scores`` (m,) higher = more likely included, ``included``
    (m,) bool. Each bound is at confidence ``1 - (1 - confidence) / len(grid)`` (Bonferroni)."""
    m = len(scores)
    grid = list(grid) if grid is not None else guess_grid(m)
    level = 1 - (1 - confidence) / len(grid)
    # Ties broken by a fixed permutation-free rule: stable sort on the score only.
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = included[order]
    results = []
    for k_plus, k_minus in grid:
        correct = int(ranked[:k_plus].sum())
        if k_minus:
            correct += int((~ranked[m - k_minus:]).sum())
        bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta, level)
        results.append(GuessResult(k_plus, k_minus, correct, bound))
    return results


def audited_population(mechanism: AuditedMechanism, canaries: int) -> tuple[int, int]:
    """(N', B'): k times the site's (N, B) with the smallest k such that N' >= m, so q' == q."""
    scale = max(1, math.ceil(canaries / mechanism.num_patients))
    patients, batch = scale * mechanism.num_patients, scale * mechanism.expected_batch_size
    if batch / patients != mechanism.sample_rate:
        raise CanaryAuditError(f"cannot keep q={mechanism.sample_rate:g} exactly with {canaries} "
                               f"canaries; choose another --canaries")
    return patients, batch


def run_canary_audit(mechanism: AuditedMechanism, out: Path, *, canaries: int = 1000,
                     seed: int = 0, confidence: float = 0.95) -> CanaryAudit:
    """Train once with m canaries (each in with probability 1/2) under ``mechanism``; return the
    epsilon lower bound beside the accountant's. Writes only ``out/canary_audit_ledger.jsonl``
    (and its outbox/head files), which must not exist yet."""
    if canaries < 2:
        raise CanaryAuditError(f"--canaries must be >= 2 (got {canaries})")
    out = Path(out)
    ledger = out / CANARY_LEDGER
    if ledger.exists():
        raise CanaryAuditError(f"{ledger}: exists; the canary audit needs a fresh research ledger "
                               f"- choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    included = torch.rand(canaries, generator=generator) < 0.5
    patients, batch = audited_population(mechanism, canaries)
    coordinates = [1 + i for i in torch.nonzero(included).flatten().tolist()]
    coordinates += [0] * (patients - len(coordinates))
    order = torch.randperm(patients, generator=generator).tolist()  # canaries not in one block
    scale = 2.0 * mechanism.max_grad_norm  # clipped to C under DP
    rows = CanaryRows([coordinates[j] for j in order], canaries + 1, scale)
    members = {f"audit-{j:06d}": [j] for j in range(patients)}
    model = CarrierModel(canaries + 1)
    start = model.linear.weight.detach().clone()
    if mechanism.private:
        head = _train_private(mechanism, model, rows, members, ledger, patients, batch, seed)
    else:
        head = _train_non_private(mechanism, model, rows, members, ledger, batch, seed)
    update = (model.linear.weight.detach() - start)[0]
    scores = -update[1:]
    guesses = score_guesses(scores, included, mechanism.delta, confidence)
    best = max(guesses, key=lambda g: g.epsilon_lower_bound)
    return CanaryAudit(
        canaries=canaries, included=int(included.sum()), audited_patients=patients,
        audited_batch_size=batch, confidence=confidence, seed=seed,
        mechanism={**asdict(mechanism), "sample_rate": mechanism.sample_rate,
                   "steps_per_round": mechanism.steps_per_round, "steps": mechanism.steps},
        accountant_epsilon=mechanism.epsilon(), independent_epsilon=mechanism.independent_epsilon(),
        epsilon_lower_bound=best.epsilon_lower_bound,
        best_guess={"k_plus": best.k_plus, "k_minus": best.k_minus, "correct": best.correct},
        guesses=guesses, ledger_head=head)


def _head(ledger: Path) -> str:
    entries = SiteLedger(ledger).ledger.entries()
    return entries[-1].hash if entries else ""


def _train_private(mechanism: AuditedMechanism, model: nn.Module, rows: Dataset,
                   members: dict[str, list[int]], ledger: Path, patients: int, batch: int,
                   seed: int) -> str:
    # The research ledger's cap: the site's, or (none given) exactly the audited schedule's.
    cap = mechanism.target_epsilon if math.isfinite(mechanism.target_epsilon) else 0.0
    plan = SchedulePlan(target_epsilon=max(cap, mechanism.epsilon()),
                        delta=mechanism.delta, accountant=mechanism.accountant,
                        noise_multiplier=mechanism.noise_multiplier,
                        sample_rate=batch / patients, num_patients=patients,
                        expected_batch_size=batch, local_epochs=mechanism.local_epochs,
                        steps_per_round=mechanism.steps_per_round,
                        planned_rounds=mechanism.rounds)
    budget = SiteBudget.open(ledger, plan, max_grad_norm=mechanism.max_grad_norm,
                             clipping=mechanism.clipping)
    settings = DPSettings(max_grad_norm=mechanism.max_grad_norm, clipping=mechanism.clipping,
                          expected_batch_size=batch, max_physical_batch_size=_PHYSICAL_ROWS,
                          learning_rate=1.0)
    trainer = DPTrainer(model, _carrier_loss, rows, members, budget, settings, seed=seed,
                        optimizer_factory=lambda params: torch.optim.SGD(params, lr=1.0))
    for round in range(1, mechanism.rounds + 1):
        trainer.run_round(round)
    return _head(ledger)


def _train_non_private(mechanism: AuditedMechanism, model: nn.Module, rows: Dataset,
                       members: dict[str, list[int]], ledger: Path, batch: int, seed: int) -> str:
    settings = NonPrivateSettings(batch_size=batch, local_epochs=mechanism.local_epochs,
                                  learning_rate=mechanism.learning_rate,
                                  max_physical_batch_size=_PHYSICAL_ROWS)
    trainer = NonPrivateTrainer(model, _carrier_loss, rows, members, ledger, settings, seed=seed)
    for round in range(1, mechanism.rounds + 1):
        trainer.run_round(round)
    return _head(ledger)


def write_canary_audit(audit: CanaryAudit, out: Path, site_id: str) -> Path:
    """``out/canary_audit.json`` (atomic): the audit's figures, tagged with the site's id."""
    path = Path(out) / SUMMARY_FILE
    text = json.dumps({"site_id": site_id, **audit.to_json()}, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())
    return path
