"""The site's budget: its plan in the ledger, the spend replayed from it, and the cap enforced.

Rules (the site is the authority on its own budget):

- The spend is the ledger's round entries, replayed into an accountant. Nothing else holds it, so no
  restart, new process or new config can reset it.
- Before a round, epsilon is computed as if the round's steps were already composed; if that would
  exceed the cap, :class:`BudgetExhausted` is raised and nothing is trained.
- The first plan fixes the mechanism: sigma, the sampling rate q = B/N, the accountant and delta. A
  later config that changes any of these is refused with :class:`PlanMismatch`: sigma was calibrated
  for that sampling, and a changed delta or accountant would silently change what "epsilon" means.
- A site may change its cap (``target_epsilon``), the planned number of rounds, the local epochs or
  the clipping norm: a new ``plan`` entry records the change and the spend carries over. Sigma stays
  the first plan's, so a raised cap allows more rounds at the same noise, a lowered one stops
  earlier. A plan entry never states a planned epsilon above its cap: more rounds than the cap
  allows at that sigma are cut to those that fit, and when none fits nothing is written (the
  round's check refuses, the ledger unchanged).
- A ``non-private-round`` entry (a site that opted in to non-private training) makes the spend
  infinite for good: every later DP-SGD round is refused with :class:`NonPrivateHistory`.
- The spend is :func:`privacy.spend.site_spend`: DP-SGD rounds plus DP-gate charges, the one figure
  every check, reply and report uses.
- The cap comes only from the site (:func:`resolve_cap`): its own config, or - in simulation, for a
  site config without a budget - the consortium default, locked into the ledger (a ``budget``
  entry) at first use. A locked default is never raised by what the server sends later; only the
  site's own config can change the cap.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from dataclasses import dataclass, replace

from privacy.accounting import epsilon
from privacy.calibration import SchedulePlan, calibrate, sampling, steps_per_epoch
from privacy.site_ledger import (CONSORTIUM_DEFAULT, SITE_CONFIG, BudgetRecord, PlanRecord,
                                 RoundRecord, SiteLedger, SiteLedgerState, fedsynth_version,
                                 utc_timestamp)
from privacy.spend import site_spend

log = logging.getLogger(__name__)


class BudgetExhausted(ValueError):
    """A round refused because it would take the site past its cap. Names the spend and the cap."""

    def __init__(self, *, ledger: Path, round: int, spent: float, would_be: float, cap: float,
                 delta: float):
        self.ledger, self.round, self.spent, self.would_be, self.cap, self.delta = (
            Path(ledger), round, spent, would_be, cap, delta)
        super().__init__(f"{ledger}: round {round} refused: epsilon would go from {spent:.4g} to "
                         f"{would_be:.4g}, above the site's cap {cap:g} (delta {delta:g}); the "
                         f"budget is spent - only the site's own privacy policy can raise its "
                         f"target_epsilon")


class NonPrivateHistory(BudgetExhausted):
    """A DP-SGD round refused because the site's ledger records non-private releases: its epsilon is
    infinite, so no DP guarantee can be given for this data any more."""

    def __init__(self, *, ledger: Path, round: int, non_private_rounds: list[int], cap: float,
                 delta: float):
        self.ledger, self.round, self.spent, self.would_be, self.cap, self.delta = (
            Path(ledger), round, math.inf, math.inf, cap, delta)
        self.non_private_rounds = list(non_private_rounds)
        rounds = ", ".join(str(r) for r in non_private_rounds)
        ValueError.__init__(self, f"{ledger}: DP round {round} refused: this site released "
                                  f"non-private weights (round {rounds}), so its epsilon is "
                                  f"infinite and no DP guarantee is possible for this data; train "
                                  f"DP rounds on data whose ledger has no non-private round")


def check_private_history(ledger: Path, round: int, state: SiteLedgerState, *,
                          cap: float = math.inf, delta: float = 0.0) -> None:
    """Raise :class:`NonPrivateHistory` when ``state`` holds any non-private round."""
    if state.non_private:
        raise NonPrivateHistory(ledger=ledger, round=round, cap=cap, delta=delta,
                                non_private_rounds=[r.round for r in state.non_private])


class PlanMismatch(ValueError):
    """This run's mechanism differs from the one the site's ledger fixed. One line: what, and the
    fix."""


def _plan_record(plan: SchedulePlan, *, noise_multiplier: float, max_grad_norm: float,
                 clipping: str) -> PlanRecord:
    planned = epsilon([(noise_multiplier, plan.sample_rate, plan.total_steps)], plan.delta,
                      plan.accountant)
    return PlanRecord(target_epsilon=plan.target_epsilon, delta=plan.delta,
                      accountant=plan.accountant, noise_multiplier=noise_multiplier,
                      sample_rate=plan.sample_rate,
                      num_patients=plan.num_patients, expected_batch_size=plan.expected_batch_size,
                      local_epochs=plan.local_epochs, steps_per_round=plan.steps_per_round,
                      planned_rounds=plan.planned_rounds, planned_epsilon=planned,
                      max_grad_norm=float(max_grad_norm), clipping=clipping,
                      timestamp=utc_timestamp(), fedsynth_version=fedsynth_version())


def _mismatch(ledger: Path, stored: PlanRecord, plan: SchedulePlan) -> str | None:
    if plan.accountant != stored.accountant:
        return (f"{ledger}: the site's plan uses the {stored.accountant} accountant, this run asks "
                f"for {plan.accountant}; set privacy.accountant: {stored.accountant}")
    if plan.delta != stored.delta:
        return (f"{ledger}: the site's plan accounts at delta={stored.delta:g}, this run asks for "
                f"delta={plan.delta:g}; restore the site budget's delta")
    if plan.sample_rate != stored.sample_rate:
        return (f"{ledger}: the site's plan samples q={stored.sample_rate:.4g} "
                f"({stored.expected_batch_size} of {stored.num_patients} patients), this run gives "
                f"q={plan.sample_rate:.4g} ({plan.expected_batch_size} of {plan.num_patients}); "
                f"sigma was calibrated for the first - restore privacy.expected_batch_size and the "
                f"patient list (a changed cohort needs the privacy officer's decision)")
    return None


def _within_cap(ledger: Path, plan: SchedulePlan, noise_multiplier: float) -> SchedulePlan | None:
    """``plan`` at the stored sigma, its rounds cut to those whose planned epsilon stays within
    the cap (a plan entry never states a planned epsilon above its cap); None when not one fits.

    A resumed run that asks for more rounds than the first plan was calibrated for (or a lowered
    cap) would otherwise record a plan it cannot honour before its rounds are refused."""
    at_sigma = replace(plan, noise_multiplier=noise_multiplier)
    if at_sigma.epsilon_after(plan.planned_rounds) <= plan.target_epsilon:
        return plan
    low, high = 0, plan.planned_rounds   # epsilon grows with the rounds: bisect the last that fits
    while low < high:
        middle = (low + high + 1) // 2
        if at_sigma.epsilon_after(middle) <= plan.target_epsilon:
            low = middle
        else:
            high = middle - 1
    log.warning("%s: %d planned rounds at the stored sigma %.4g would reach epsilon %.4g, above "
                "the site's cap %g; planning %d", ledger, plan.planned_rounds, noise_multiplier,
                at_sigma.epsilon_after(plan.planned_rounds), plan.target_epsilon, low)
    return replace(plan, planned_rounds=low) if low else None


class NoSiteBudget(ValueError):
    """A site that must set its own budget (deployment) but does not. One line naming the key."""

    def __init__(self, where: str = ""):
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}budget.target_epsilon is not set in the site config; a site "
                         f"sets its own cap - add 'budget: {{target_epsilon: ..., delta: ...}}' to "
                         f"its site config")


@dataclass(frozen=True)
class CapSetting:
    """A cap as a config states it: ``target_epsilon`` at ``delta``."""

    target_epsilon: float
    delta: float


def resolve_cap(ledger: SiteLedger, own: CapSetting | None, consortium: CapSetting | None, *,
                where: str = "") -> CapSetting:
    """The cap in force for this site, recorded in its ledger (a ``budget`` entry when it changes).

    - ``own`` (the site's own config) wins, and may raise or lower the cap;
    - else a cap already locked in the ledger (a ``budget`` or ``plan`` entry) stays, whatever
      ``consortium`` (the server's default) says now;
    - else ``consortium`` is locked into the ledger (simulation: a site config without a budget);
    - else (deployment: the server's default is never taken) :class:`NoSiteBudget`.
    """
    prefix = f"{where}: " if where else ""
    with ledger.locked():
        state = ledger.state()
        locked = state.cap_in_force
        if own is not None:
            # A fresh ledger records the site's cap in its first plan or gate charge; a change
            # of a cap already in force is recorded here.
            if locked is not None and locked != (own.target_epsilon, own.delta):
                ledger.append(BudgetRecord(float(own.target_epsilon), float(own.delta), SITE_CONFIG,
                                           utc_timestamp(), fedsynth_version()))
            return own
        if locked is not None:
            if consortium is not None and (consortium.target_epsilon, consortium.delta) != locked:
                log.warning("%sthe server's default budget (epsilon %g, delta %g) is ignored: the "
                            "ledger holds the cap %g at delta %g; only the site's own config "
                            "(budget.target_epsilon) changes it", prefix,
                            consortium.target_epsilon, consortium.delta, *locked)
            return CapSetting(*locked)
        if consortium is None:
            raise NoSiteBudget(where)
        ledger.append(BudgetRecord(float(consortium.target_epsilon), float(consortium.delta),
                                   CONSORTIUM_DEFAULT, utc_timestamp(), fedsynth_version()))
        log.warning("%sthe site config sets no budget: the consortium default epsilon %g at delta "
                    "%g is now locked into %s; the server cannot raise it later", prefix,
                    consortium.target_epsilon, consortium.delta, ledger.path)
        return consortium


class SiteBudget:
    """A site's plan and spend, read from (and committed to) its ledger."""

    def __init__(self, ledger: SiteLedger | Path | str):
        self.ledger = ledger if isinstance(ledger, SiteLedger) else SiteLedger(ledger)

    @classmethod
    def open(cls, ledger: SiteLedger | Path | str, plan: SchedulePlan, *, max_grad_norm: float,
             clipping: str = "flat") -> "SiteBudget":
        """The site's budget under ``plan`` (from this run's config and data).

        Writes the first plan entry on a fresh ledger; refuses a changed mechanism
        (:class:`PlanMismatch`); appends a plan entry when the cap, schedule or clipping changed,
        its rounds cut to those whose planned epsilon at the stored sigma is within the cap.
        """
        budget = cls(ledger)
        with budget.ledger.locked():
            state = budget.ledger.state()
            stored = state.first_plan
            if stored is None:
                budget.ledger.append(_plan_record(plan, noise_multiplier=plan.noise_multiplier,
                                                  max_grad_norm=max_grad_norm, clipping=clipping))
                log.info("%s: planned sigma=%.4g for q=%.4g, %d steps per round, %d rounds "
                         "(epsilon <= %g at delta %g)", budget.ledger.path, plan.noise_multiplier,
                         plan.sample_rate, plan.steps_per_round, plan.planned_rounds,
                         plan.target_epsilon, plan.delta)
                return budget
            problem = _mismatch(budget.ledger.path, stored, plan)
            if problem:
                raise PlanMismatch(problem)
            current = state.plan
            plan = _within_cap(budget.ledger.path, plan, stored.noise_multiplier)
            if plan is None:
                return budget   # no round fits: nothing is written, the round's check refuses
            changed = (plan.target_epsilon, plan.planned_rounds, plan.local_epochs,
                       plan.steps_per_round, float(max_grad_norm), clipping) != (
                current.target_epsilon, current.planned_rounds, current.local_epochs,
                current.steps_per_round, current.max_grad_norm, current.clipping)
            if changed:
                budget.ledger.append(_plan_record(plan, noise_multiplier=stored.noise_multiplier,
                                                  max_grad_norm=max_grad_norm, clipping=clipping))
                log.info("%s: plan updated (cap %g -> %g, %d rounds of %d steps); sigma stays %.4g "
                         "and the spend carries over", budget.ledger.path, current.target_epsilon,
                         plan.target_epsilon, plan.planned_rounds, plan.steps_per_round,
                         stored.noise_multiplier)
        return budget

    @property
    def path(self) -> Path:
        return self.ledger.path

    def locked(self):
        """Hold the ledger lock from the check to the commit of a round."""
        return self.ledger.locked()

    def state(self) -> SiteLedgerState:
        return self.ledger.state()

    def plan(self, state: SiteLedgerState | None = None) -> PlanRecord:
        state = state or self.state()
        if state.plan is None:
            raise PlanMismatch(f"{self.path}: has no plan entry; open the budget with a plan first")
        return state.plan

    def spent(self, state: SiteLedgerState | None = None) -> float:
        """Cumulative epsilon of the ledger (:func:`privacy.spend.site_spend`): the DP-SGD rounds
        replayed plus the DP-gate charges; infinite after a non-private round."""
        state = state or self.state()
        self.plan(state)
        return site_spend(state).total

    def check(self, round: int, steps: int | None = None,
              state: SiteLedgerState | None = None) -> float:
        """Epsilon after one more round of ``steps`` (default: the plan's); raises
        :class:`BudgetExhausted` if that would exceed the cap in force (:class:`NonPrivateHistory`
        after a non-private round)."""
        state = state or self.state()
        plan = self.plan(state)
        cap = state.cap
        check_private_history(self.path, round, state, cap=cap, delta=plan.delta)
        steps = plan.steps_per_round if steps is None else steps
        would_be = site_spend(state, extra_steps=steps).total
        if would_be > cap:
            raise BudgetExhausted(ledger=self.path, round=round, spent=site_spend(state).total,
                                  would_be=would_be, cap=cap, delta=plan.delta)
        return would_be

    def charge(self, round: int, *, model_hash_before: str, model_hash_after: str,
               steps: int | None = None) -> RoundRecord:
        """Commit one round (durably) after re-checking the cap under the ledger lock."""
        with self.locked():
            state = self.state()
            plan = self.plan(state)
            steps = plan.steps_per_round if steps is None else steps
            epsilon_after = self.check(round, steps, state)
            record = RoundRecord(
                round=int(round), noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate, steps=int(steps), accountant=plan.accountant,
                delta=plan.delta, epsilon=epsilon_after, target_epsilon=state.cap,
                num_patients=plan.num_patients, model_hash_before=model_hash_before,
                model_hash_after=model_hash_after, timestamp=utc_timestamp(),
                fedsynth_version=fedsynth_version())
            self.ledger.append(record)
        log.info("%s: round %d committed, epsilon %.4g of %g", self.path, round, epsilon_after,
                 record.target_epsilon)
        return record


def open_site_budget(ledger: SiteLedger | Path | str, *, target_epsilon: float, delta: float,
                     num_patients: int, expected_batch_size: int, rounds: int, local_epochs: int,
                     accountant: str, max_grad_norm: float, clipping: str = "flat",
                     where: str = "", allow_large_delta: bool = False) -> SiteBudget:
    """The site's budget for this run's settings: calibrates sigma on a fresh ledger, otherwise
    checks the settings against the stored plan (sigma is the stored one, not recalibrated)."""
    site_ledger = ledger if isinstance(ledger, SiteLedger) else SiteLedger(ledger)
    stored = site_ledger.state().first_plan
    if stored is None:
        plan = calibrate(target_epsilon=target_epsilon, delta=delta, num_patients=num_patients,
                         expected_batch_size=expected_batch_size, rounds=rounds,
                         local_epochs=local_epochs, accountant=accountant, where=where,
                         allow_large_delta=allow_large_delta)
    else:
        q = sampling(num_patients, expected_batch_size, where)
        plan = SchedulePlan(target_epsilon=float(target_epsilon), delta=float(delta),
                            accountant=accountant, noise_multiplier=stored.noise_multiplier,
                            sample_rate=q, num_patients=int(num_patients),
                            expected_batch_size=int(expected_batch_size),
                            local_epochs=int(local_epochs),
                            steps_per_round=int(local_epochs) * steps_per_epoch(q),
                            planned_rounds=int(rounds))
    return SiteBudget.open(site_ledger, plan, max_grad_norm=max_grad_norm, clipping=clipping)
