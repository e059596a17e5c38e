"""The optional DP release gate: a noisy-threshold (AboveThreshold / sparse vector) test whose
epsilon is charged to the site's own ledger.

Without it, a site's pass/fail answers are an exact function of its private scans and are not
covered by any epsilon. With ``release.dp_gate.enabled`` each gate query is answered by
AboveThreshold (Dwork & Roth, *The Algorithmic Foundations of DP*, Algorithm 1), which is
``epsilon``-DP for the whole sequence of answers of that query:

- query ``i`` is the candidate's *closeness* ``c_i = clip(1 - d_i / tau, 0, 1)`` (``d_i`` its
  nearest-scan distance, ``tau`` the site's threshold). ``c_i`` lies in [0, 1], so adding or
  removing one patient changes it by at most 1: sensitivity 1 at the patient level;
- draw ``rho ~ Lap(2 / epsilon)`` once; for each candidate in order draw
  ``nu_i ~ Lap(4 / epsilon)``; the first ``i`` with ``c_i + nu_i >= T + rho`` (``T`` = 1/2,
  half-way between "no scan within tau" and "an exact copy") FAILS, and the test halts;
- the candidates after the halt fail too, without looking at the data (so their answers cost
  nothing); the server may send them again in a new query, charged again.

Accounting. A gate query is pure ``epsilon``-DP; a site's DP-SGD rounds are
``(eps_sgd, delta)``-DP. Basic composition gives ``(eps_sgd + sum of gate epsilons, delta)``:
:func:`site_spend` reports that total, and a site refuses a gate query that would take the total
past its cap (the latest ``plan`` entry's ``target_epsilon``, else the site's configured budget).
After a ``non-private-round`` entry the DP-SGD spend is infinite, so every DP gate query is refused.

Ledger entry kind ``dp-gate`` (:class:`GateChargeRecord`): written BEFORE the noisy answers exist
(write-ahead, under the ledger lock), so a crash can only over-count. Entries are read here
directly from the hash-chained :class:`~privacy.ledger.Ledger` (kind by kind), so this module
works whatever the typed site-ledger reader accepts.

What the epsilon does NOT cover: with ``threshold.policy: calibrated`` the threshold ``tau`` is
itself computed from the site's scans; the guarantee then holds for the answers given that
threshold, and only ``policy: fixed`` makes the gate's answers DP end to end.

Utility, measured (one candidate, many draws): P(fail | exact copy) vs P(fail | far candidate) is
0.55 vs 0.45 at epsilon 1, 0.82 vs 0.17 at epsilon 10, 0.99 vs 0.01 at epsilon 30.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from privacy.accounting import epsilon as dp_sgd_epsilon, history_of
from privacy.ledger import Ledger, LedgerEntry, LedgerError
from privacy.site_ledger import (NonPrivateRoundRecord, PlanRecord, RoundRecord, _Record,
                                 fedsynth_version, utc_timestamp)

log = logging.getLogger(__name__)

GATE_KIND = "dp-gate"
MECHANISM = "above-threshold"
# AboveThreshold's threshold on the closeness scale: half-way between "no scan within tau" (0) and
# "an exact copy" (1).
CLOSENESS_THRESHOLD = 0.5
SENSITIVITY = 1.0


class GateBudgetExhausted(ValueError):
    """A DP gate query refused because it would take the site past its cap."""

    def __init__(self, *, ledger: Path, spent: float, would_be: float, cap: float, delta: float):
        self.ledger, self.spent, self.would_be = Path(ledger), spent, would_be
        self.cap, self.delta = cap, delta
        super().__init__(f"{ledger}: DP gate query refused: epsilon would go from {spent:.4g} to "
                         f"{would_be:.4g}, above the site's cap {cap:g} (delta {delta:g}); the "
                         f"budget is spent - release without the DP gate or with a smaller "
                         f"release.dp_gate.epsilon")


@dataclass(frozen=True)
class GateChargeRecord(_Record):
    """One DP gate query charged to the site: its ``epsilon`` and the spends after it.

    ``gate_epsilon`` is the sum of every gate charge so far (this one included);
    ``total_epsilon`` = DP-SGD epsilon at ``delta`` + ``gate_epsilon`` (basic composition).
    """

    kind: ClassVar[str] = GATE_KIND
    query_id: str
    mechanism: str
    epsilon: float
    gate_epsilon: float
    dp_sgd_epsilon: float
    total_epsilon: float
    delta: float
    target_epsilon: float
    num_candidates: int
    threshold_policy: str
    candidates_sha256: str
    timestamp: str
    fedsynth_version: str


@dataclass(frozen=True)
class SiteSpend:
    """A site's spend from its ledger: DP-SGD (replayed rounds) + DP gate charges, and its cap."""

    dp_sgd: float
    gate: float
    delta: float
    cap: float
    accountant: str
    rounds: int
    gate_queries: int
    non_private_rounds: int = 0   # > 0: non-private weights were released, dp_sgd is infinite

    @property
    def total(self) -> float:
        return self.dp_sgd + self.gate


_KINDS: dict[str, type[_Record]] = {record.kind: record for record in (
    PlanRecord, RoundRecord, NonPrivateRoundRecord, GateChargeRecord)}


def _typed(entries: list[LedgerEntry], path: Path) -> dict[str, list]:
    """The typed records of a site ledger by kind (every kind of :data:`_KINDS`, maybe empty)."""
    typed: dict[str, list] = {kind: [] for kind in _KINDS}
    for entry in entries:
        record_type = _KINDS.get(entry.kind)
        if record_type is None:
            raise LedgerError(f"{path}: seq {entry.seq} has kind {entry.kind!r}, which a site "
                              f"ledger does not hold (expected {', '.join(_KINDS)})")
        typed[entry.kind].append(record_type.from_entry(entry, path))
    return typed


def gate_charges(ledger_path: Path | str) -> list[GateChargeRecord]:
    """Every ``dp-gate`` entry of a site ledger (verified chain); [] for a missing ledger."""
    path = Path(ledger_path)
    return _typed(Ledger(path).entries(), path)[GATE_KIND] if path.exists() else []


def site_spend(ledger_path: Path | str, *, default_cap: float, default_delta: float) -> SiteSpend:
    """The site's total spend from its ledger (verified chain).

    Cap and delta come from the latest plan entry; a site that never trained (no plan) uses
    ``default_cap``/``default_delta`` (its configured budget).
    """
    path = Path(ledger_path)
    typed = _typed(Ledger(path).entries() if path.exists() else [], path)
    plans, rounds, gates = typed[PlanRecord.kind], typed[RoundRecord.kind], typed[GATE_KIND]
    plan = plans[-1] if plans else None
    delta = plan.delta if plan else float(default_delta)
    accountant = plan.accountant if plan else "rdp"
    sgd = dp_sgd_epsilon(history_of(rounds), delta, accountant) if rounds else 0.0
    if typed[NonPrivateRoundRecord.kind]:
        sgd = math.inf  # the site released non-private weights: no finite epsilon
    return SiteSpend(dp_sgd=sgd, gate=float(sum(g.epsilon for g in gates)), delta=delta,
                     cap=plan.target_epsilon if plan else float(default_cap),
                     accountant=accountant, rounds=len(rounds), gate_queries=len(gates),
                     non_private_rounds=len(typed[NonPrivateRoundRecord.kind]))


def charge_gate(ledger_path: Path | str, *, query_id: str, epsilon: float, num_candidates: int,
                threshold_policy: str, candidates_sha256: str, default_cap: float,
                default_delta: float) -> GateChargeRecord:
    """Check the cap and append one ``dp-gate`` entry, durably, under the ledger lock.

    Raises :class:`GateBudgetExhausted` (nothing written) when the total would exceed the cap.
    """
    if not epsilon > 0:
        raise ValueError(f"a DP gate query needs epsilon > 0 (got {epsilon})")
    ledger = Ledger(ledger_path)
    with ledger.locked():
        spend = site_spend(ledger.path, default_cap=default_cap, default_delta=default_delta)
        would_be = spend.total + epsilon
        if would_be > spend.cap:
            raise GateBudgetExhausted(ledger=ledger.path, spent=spend.total, would_be=would_be,
                                      cap=spend.cap, delta=spend.delta)
        record = GateChargeRecord(
            query_id=query_id, mechanism=MECHANISM, epsilon=float(epsilon),
            gate_epsilon=spend.gate + float(epsilon), dp_sgd_epsilon=spend.dp_sgd,
            total_epsilon=would_be, delta=spend.delta, target_epsilon=spend.cap,
            num_candidates=int(num_candidates), threshold_policy=threshold_policy,
            candidates_sha256=candidates_sha256, timestamp=utc_timestamp(),
            fedsynth_version=fedsynth_version())
        ledger.append(record.kind, record.to_payload())
    log.info("%s: DP gate query %s charged epsilon %g (total %.4g of %g)", ledger.path, query_id,
             epsilon, would_be, spend.cap)
    return record


def closeness(distances: np.ndarray, threshold: float) -> np.ndarray:
    """``clip(1 - d / tau, 0, 1)``: 1 for an exact copy, 0 at or beyond the threshold. (N,)."""
    distances = np.asarray(distances, dtype=np.float64)
    if threshold <= 0:
        return (distances <= 0).astype(np.float64)
    return np.clip(1.0 - distances / float(threshold), 0.0, 1.0)


def noise_generator() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG, fresh for every query."""
    return np.random.default_rng(secrets.randbits(128))


def above_threshold(values: np.ndarray, epsilon: float, rng: np.random.Generator, *,
                    threshold: float = CLOSENESS_THRESHOLD,
                    sensitivity: float = SENSITIVITY) -> np.ndarray:
    """AboveThreshold (Dwork & Roth, Algorithm 1) on ``values`` (N,): bool (N,).

    True where the query stays BELOW the noisy threshold (the candidate passes); False from the
    first noisy crossing on (it and every later candidate fail). ``epsilon``-DP for queries of the
    given sensitivity.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (got {epsilon})")
    values = np.asarray(values, dtype=np.float64)
    passes = np.zeros(values.shape[0], dtype=bool)
    noisy_threshold = threshold + rng.laplace(0.0, 2.0 * sensitivity / epsilon)
    for i, value in enumerate(values):
        if value + rng.laplace(0.0, 4.0 * sensitivity / epsilon) >= noisy_threshold:
            return passes  # halt: this one and the rest fail
        passes[i] = True
    return passes
