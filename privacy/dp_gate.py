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
:func:`privacy.spend.site_spend` computes that total (the one spend figure every check and report
uses), and a site refuses a gate query that would take the total past its cap in force. The cap
comes from :func:`privacy.budget.resolve_cap`: the site's own config, else a cap already locked in
its ledger, else (simulation) the consortium default, locked at this first use. After a
``non-private-round`` entry the spend is infinite, so every DP gate query is refused.

Ledger entry kind ``dp-gate`` (:class:`GateChargeRecord`): written BEFORE the noisy answers exist
(write-ahead, under the ledger lock), so a crash can only over-count. The consortium mirrors each
charge (``site-gate`` entries of its ledger) with the site's ledger head, so ``fedsynth audit
reconcile`` catches a site ledger restored from before its gate charges.

What the epsilon does NOT cover: with ``threshold.policy: calibrated`` the threshold ``tau`` is
itself computed from the site's scans; the guarantee then holds for the answers given that
threshold, and only ``policy: fixed`` makes the gate's answers DP end to end.

Utility, measured (one candidate, many draws): P(fail | exact copy) vs P(fail | far candidate) is
0.55 vs 0.45 at epsilon 1, 0.82 vs 0.17 at epsilon 10, 0.99 vs 0.01 at epsilon 30.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import numpy as np

from privacy.budget import CapSetting, resolve_cap
from privacy.site_ledger import GateChargeRecord, SiteLedger, fedsynth_version, utc_timestamp
from privacy.spend import site_spend

log = logging.getLogger(__name__)

GATE_KIND = GateChargeRecord.kind
MECHANISM = "above-threshold"
# AboveThreshold's threshold on the closeness scale: half-way between "no scan within tau" (0) and
# "an exact copy" (1).
CLOSENESS_THRESHOLD = 0.5
SENSITIVITY = 1.0

__all__ = ["GATE_KIND", "GateChargeRecord", "GateBudgetExhausted", "charge_gate", "gate_charges",
           "closeness", "above_threshold", "noise_generator"]


class GateBudgetExhausted(ValueError):
    """A DP gate query refused because it would take the site past its cap."""

    def __init__(self, *, ledger: Path, spent: float, would_be: float, cap: float, delta: float):
        self.ledger, self.spent, self.would_be = Path(ledger), spent, would_be
        self.cap, self.delta = cap, delta
        super().__init__(f"{ledger}: DP gate query refused: epsilon would go from {spent:.4g} to "
                         f"{would_be:.4g}, above the site's cap {cap:g} (delta {delta:g}); the "
                         f"budget is spent - release without the DP gate or with a smaller "
                         f"release.dp_gate.epsilon")


def gate_charges(ledger_path: Path | str) -> list[GateChargeRecord]:
    """Every ``dp-gate`` entry of a site ledger (verified chain); [] for a missing ledger."""
    path = Path(ledger_path)
    return SiteLedger(path).state().gate_charges if path.exists() else []


def charge_gate(ledger_path: Path | str, *, query_id: str, epsilon: float, num_candidates: int,
                threshold_policy: str, candidates_sha256: str, own: CapSetting | None,
                consortium: CapSetting | None, where: str = "") -> GateChargeRecord:
    """Check the cap and append one ``dp-gate`` entry, durably, under the ledger lock.

    The cap is :func:`privacy.budget.resolve_cap` of ``own`` (the site's config) and
    ``consortium`` (the query's default; None in deployment). Raises
    :class:`GateBudgetExhausted` (no charge written) when the total would exceed it.
    """
    if not epsilon > 0:
        raise ValueError(f"a DP gate query needs epsilon > 0 (got {epsilon})")
    ledger = SiteLedger(ledger_path)
    with ledger.locked():
        cap = resolve_cap(ledger, own, consortium, where=where)
        state = ledger.state()
        spend, after = site_spend(state), site_spend(state, extra_gate=float(epsilon))
        if after.total > cap.target_epsilon:
            raise GateBudgetExhausted(ledger=ledger.path, spent=spend.total, would_be=after.total,
                                      cap=cap.target_epsilon,
                                      delta=spend.delta if spend.delta is not None else cap.delta)
        delta = spend.delta if spend.delta is not None else cap.delta
        record = GateChargeRecord(
            query_id=query_id, mechanism=MECHANISM, epsilon=float(epsilon),
            gate_epsilon=after.gate, dp_sgd_epsilon=after.dp_sgd, total_epsilon=after.total,
            delta=float(delta), target_epsilon=float(cap.target_epsilon),
            num_candidates=int(num_candidates), threshold_policy=threshold_policy,
            candidates_sha256=candidates_sha256, timestamp=utc_timestamp(),
            fedsynth_version=fedsynth_version())
        ledger.append(record)
    log.info("%s: DP gate query %s charged epsilon %g (total %.4g of %g)", ledger.path, query_id,
             epsilon, after.total, cap.target_epsilon)
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
