"""A site's spend, computed from its ledger in one place.

Every figure that states or enforces a site's epsilon calls :func:`site_spend`: the budget check
before a round (:mod:`privacy.budget`), the DP gate's charge (:mod:`privacy.dp_gate`), the train
reply's ``epsilon``/``epsilon-next`` and refusal figures (:mod:`client.site_runtime`), the gate
answer's figures (:mod:`client.gate`), ``fedsynth report`` (:mod:`privacy.report`) and the release
report (:mod:`server.release_report`).

The spend is, at the plan's ``delta``:

- DP-SGD: the ledger's ``round`` entries replayed into Opacus' accountant
  (:func:`privacy.accounting.epsilon`), an (eps_sgd, delta) guarantee;
- DP gate: the sum of the ``dp-gate`` charges (AboveThreshold, pure eps each);
- total: eps_sgd + sum of gate charges (basic composition of (eps_sgd, delta) with pure-eps
  mechanisms), and +infinity as soon as the ledger holds a ``non-private-round`` entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accounting import epsilon, history_of
from privacy.site_ledger import SiteLedgerState


@dataclass(frozen=True)
class SiteSpend:
    """A site's spend from its ledger. ``cap``/``delta`` are the cap in force (None when the
    ledger holds neither a plan nor a budget entry); ``accountant`` is the plan's ("" before the
    first plan)."""

    dp_sgd: float
    gate: float
    cap: float | None
    delta: float | None
    accountant: str
    rounds: int
    gate_queries: int
    non_private_rounds: int = 0

    @property
    def total(self) -> float:
        """DP-SGD + DP-gate epsilon (basic composition); +inf after a non-private round."""
        return math.inf if self.non_private_rounds else self.dp_sgd + self.gate

    @property
    def differentially_private(self) -> bool:
        return not self.non_private_rounds


def site_spend(state: SiteLedgerState, *, extra_steps: int = 0,
               extra_gate: float = 0.0) -> SiteSpend:
    """The spend of the ledger ``state``; with ``extra_steps`` (DP-SGD steps of the plan in force)
    and ``extra_gate`` (a gate charge), the spend as if they were already composed: what a check
    before a round or a gate query compares with the cap."""
    plan, first = state.plan, state.first_plan
    history = history_of(state.rounds)
    if extra_steps:
        if plan is None:
            raise ValueError("extra DP-SGD steps need a plan entry in the ledger")
        history = history + [(plan.noise_multiplier, plan.sample_rate, int(extra_steps))]
    if first is not None:
        delta, accountant = first.delta, first.accountant
    else:
        delta = state.cap_in_force[1] if state.cap_in_force else None
        accountant = ""
    dp_sgd = epsilon(history, delta, accountant) if history else 0.0
    gate = math.fsum([charge.epsilon for charge in state.gate_charges] + [float(extra_gate)])
    return SiteSpend(dp_sgd=dp_sgd, gate=gate, cap=state.cap, delta=delta, accountant=accountant,
                     rounds=len(state.rounds), gate_queries=len(state.gate_charges),
                     non_private_rounds=len(state.non_private))
