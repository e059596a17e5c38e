"""The PRV ledger accountant agrees with the independent PLD recheck within 1% (issue 14's bar)."""

from __future__ import annotations

import pytest

from privacy.accounting import INDEPENDENT_TOLERANCE, epsilon, independent_epsilon


@pytest.mark.parametrize("history", [
    [(8.0, 0.2, 5)],                      # epsilon ~0.2, where Opacus' fixed 0.01 padding is 5%
    [(4.0, 0.2, 15)],
    [(1.5, 0.1, 90)],
    [(3.0, 0.2, 10), (2.0, 0.2, 10)],     # a plan change mid-ledger
])
def test_prv_epsilon_is_within_one_percent_of_the_independent_pld(history):
    delta = 1e-5
    ours, independent = epsilon(history, delta, "prv"), independent_epsilon(history, delta, "pld")
    assert ours >= independent * (1 - 1e-3)  # an upper bound, up to the PLD's own discretisation
    assert abs(ours - independent) <= 0.01 * independent
    assert INDEPENDENT_TOLERANCE["prv"].agrees(ours, independent)
