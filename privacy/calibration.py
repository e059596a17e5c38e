"""Noise calibration: the one sigma that fits a site's budget over the planned schedule.

Sampling is Poisson over patients with rate ``q = B / N`` (B the expected batch size in patients, N
the site's number of patients). An epoch is ``int(1 / q)`` steps, the length of Opacus'
``UniformWithReplacementSampler``; a round is ``local_epochs`` epochs. Sigma comes from
``opacus.accountants.utils.get_noise_multiplier`` for the total planned steps, so the planned
schedule ends at most at the target epsilon (within the search tolerance below it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from privacy.accounting import check_mechanism, epsilon

# get_noise_multiplier's bisection stops this far below the target (it never ends above it).
EPSILON_SEARCH_TOLERANCE = 0.01


class CalibrationError(ValueError):
    """A budget or schedule no noise level can satisfy. One line naming the value and the fix."""


@dataclass(frozen=True)
class SchedulePlan:
    """One site's calibrated schedule (its accounting inputs are public: N, q, sigma, steps)."""

    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    num_patients: int
    expected_batch_size: int
    local_epochs: int
    steps_per_round: int
    planned_rounds: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.planned_rounds

    def epsilon_after(self, rounds: int) -> float:
        """Cumulative epsilon after ``rounds`` rounds of this schedule (fresh ledger)."""
        return epsilon([(self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds)],
                       self.delta, self.accountant)

    def epsilon_curve(self) -> list[float]:
        """Cumulative epsilon after each planned round, 1..planned_rounds."""
        return [self.epsilon_after(r) for r in range(1, self.planned_rounds + 1)]


@functools.lru_cache(maxsize=128)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    # A bisection of ~15 accountant evaluations; sites with the same budget and size share it.
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                sample_rate=sample_rate, steps=steps, accountant=accountant,
                                epsilon_tolerance=EPSILON_SEARCH_TOLERANCE)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps of one epoch under Poisson sampling at ``sample_rate`` (Opacus' sampler length)."""
    return int(1 / sample_rate)


def sampling(num_patients: int, expected_batch_size: int, where: str = "") -> float:
    """``q = B / N``, checked. ``where`` prefixes the error (e.g. the site id)."""
    prefix = f"{where}: " if where else ""
    if num_patients < 1:
        raise CalibrationError(f"{prefix}the site has no patients; check its manifest")
    if not 1 <= expected_batch_size <= num_patients:
        raise CalibrationError(f"{prefix}privacy.expected_batch_size={expected_batch_size} must be "
                               f"between 1 and the number of patients N={num_patients}; lower it")
    return expected_batch_size / num_patients


# The delta policy: delta >= 1/N is always refused (publishing one random patient's scans in full
# would satisfy it); above 1/(LARGE_DELTA_FACTOR * N) only with the site's own override.
LARGE_DELTA_FACTOR = 10
LARGE_DELTA_KEY = "budget.allow_large_delta"


def check_delta(delta: float, num_patients: int, where: str = "",
                allow_large_delta: bool = False) -> None:
    """The delta policy. Refuse ``delta >= 1/N`` always (such a delta allows a mechanism that
    publishes one random patient's scans), and ``delta > 1/(10 N)`` unless the site's own config
    sets ``budget.allow_large_delta: true``."""
    prefix = f"{where}: " if where else ""
    suggestion = f"{min(1e-5, 0.1 / num_patients):.0e}"
    if not 0 < delta < 1 / num_patients:
        raise CalibrationError(f"{prefix}delta={delta:g} must be below 1/N = 1/{num_patients} = "
                               f"{1 / num_patients:.3g} (N patients); set the site budget's delta "
                               f"smaller, e.g. {suggestion}")
    limit = 1 / (LARGE_DELTA_FACTOR * num_patients)
    if delta > limit and not allow_large_delta:
        raise CalibrationError(f"{prefix}delta={delta:g} is above 1/(10N) = {limit:.3g} "
                               f"(N={num_patients} patients); set the site budget's delta to "
                               f"{suggestion} or below, or set {LARGE_DELTA_KEY}: true in the "
                               f"site's own config to accept it")


def calibrate(*, target_epsilon: float, delta: float, num_patients: int, expected_batch_size: int,
              rounds: int, local_epochs: int, accountant: str = "rdp",
              where: str = "", allow_large_delta: bool = False) -> SchedulePlan:
    """Sigma for ``(target_epsilon, delta)`` over ``rounds`` x ``local_epochs`` epochs, q = B/N."""
    check_mechanism(accountant)
    prefix = f"{where}: " if where else ""
    if target_epsilon <= 0:
        raise CalibrationError(f"{prefix}target_epsilon must be > 0 (got {target_epsilon:g})")
    if rounds < 1 or local_epochs < 1:
        raise CalibrationError(f"{prefix}rounds and local_epochs must be >= 1 "
                               f"(got {rounds}, {local_epochs})")
    q = sampling(num_patients, expected_batch_size, where)
    check_delta(delta, num_patients, where, allow_large_delta)
    per_round = local_epochs * steps_per_epoch(q)
    try:
        sigma = _noise_multiplier(float(target_epsilon), float(delta), q, per_round * rounds,
                                  accountant)
    except ValueError:
        raise CalibrationError(f"{prefix}target_epsilon={target_epsilon:g} is too small for "
                               f"{rounds * per_round} steps at q={q:.3g} (sigma would exceed 1e6); "
                               f"raise the budget or plan fewer rounds") from None
    return SchedulePlan(target_epsilon=float(target_epsilon), delta=float(delta),
                        accountant=accountant, noise_multiplier=float(sigma), sample_rate=q,
                        num_patients=int(num_patients),
                        expected_batch_size=int(expected_batch_size),
                        local_epochs=int(local_epochs), steps_per_round=per_round,
                        planned_rounds=int(rounds))
