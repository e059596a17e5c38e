"""Calibration, accounting replay and budget enforcement (no training: the budget logic alone)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.accounting import (INDEPENDENT_TOLERANCE, epsilon, history_of, independent_epsilon,
                                replay_accountant)
from privacy.budget import (BudgetExhausted, CapSetting, PlanMismatch, SiteBudget,
                            open_site_budget)
from privacy import budget as budget_module
from privacy import calibration
from privacy.calibration import CalibrationError, SchedulePlan, calibrate
from privacy.site_ledger import SiteLedger

HASH = "0" * 64


def _plan(sigma: float = 1.2, patients: int = 20, batch: int = 4, steps: int = 5, rounds: int = 4,
          cap: float = 5.0, delta: float = 1e-3, accountant: str = "rdp") -> SchedulePlan:
    return SchedulePlan(target_epsilon=cap, delta=delta, accountant=accountant,
                        noise_multiplier=sigma, sample_rate=batch / patients,
                        num_patients=patients, expected_batch_size=batch, local_epochs=1,
                        steps_per_round=steps, planned_rounds=rounds)


def _charge(budget: SiteBudget, number: int):
    return budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)


def test_calibration_uses_opacus_for_the_whole_schedule(monkeypatch):
    calls = []

    def spy(**kwargs):
        calls.append(kwargs)
        return get_noise_multiplier(**kwargs)

    monkeypatch.setattr(calibration, "get_noise_multiplier", spy)
    calibration._noise_multiplier.cache_clear()
    plan = calibrate(target_epsilon=4.0, delta=1e-3, num_patients=40, expected_batch_size=8,
                     rounds=3, local_epochs=2)
    assert plan.sample_rate == 8 / 40 and plan.steps_per_round == 2 * 5
    assert calls == [dict(target_epsilon=4.0, target_delta=1e-3, sample_rate=0.2, steps=30,
                          accountant="rdp", epsilon_tolerance=0.01)]
    curve = plan.epsilon_curve()
    assert curve == sorted(curve) and 4.0 - 0.01 <= curve[-1] <= 4.0


@pytest.mark.parametrize("delta", [1 / 40, 0.1])
def test_delta_at_least_one_over_n_is_refused(delta):
    with pytest.raises(CalibrationError, match=r"must be below 1/N = 1/40") as caught:
        calibrate(target_epsilon=4.0, delta=delta, num_patients=40, expected_batch_size=8, rounds=3,
                  local_epochs=1)
    assert "\n" not in str(caught.value)


def test_batch_larger_than_cohort_is_refused():
    with pytest.raises(CalibrationError, match="expected_batch_size=12"):
        calibrate(target_epsilon=4.0, delta=1e-5, num_patients=10, expected_batch_size=12, rounds=1,
                  local_epochs=1)


def test_ledger_replay_equals_opacus_stepping_and_the_independent_accountant(tmp_path: Path):
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", _plan(cap=50.0), max_grad_norm=1.0)
    stepped = RDPAccountant()
    for number in range(1, 4):
        _charge(budget, number)
        for _ in range(5):  # what Opacus' optimizer hook does on every step
            stepped.step(noise_multiplier=1.2, sample_rate=0.2)
    rounds = budget.state().rounds
    replayed = replay_accountant(rounds, "rdp", create_accountant("rdp"))
    assert replayed.history == stepped.history == [(1.2, 0.2, 15)]
    assert replayed.get_epsilon(1e-3) == stepped.get_epsilon(1e-3) == rounds[-1].epsilon
    independent = independent_epsilon(history_of(rounds), 1e-3, "rdp")
    assert INDEPENDENT_TOLERANCE["rdp"].agrees(rounds[-1].epsilon, independent)


def test_prv_ledger_agrees_with_independent_pld():
    history = [(1.1, 0.2, 40)]
    assert INDEPENDENT_TOLERANCE["prv"].agrees(epsilon(history, 1e-5, "prv"),
                                               independent_epsilon(history, 1e-5, "pld"))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sigma=st.floats(0.6, 4.0), patients=st.integers(5, 60), batch_fraction=st.floats(0.05, 0.5),
       steps=st.integers(1, 6), cap=st.floats(0.2, 12.0), attempts=st.integers(1, 8),
       delta_exponent=st.integers(2, 6))
def test_no_sequence_of_rounds_ends_above_the_cap(sigma, patients, batch_fraction, steps, cap,
                                                  attempts, delta_exponent):
    batch = max(1, int(batch_fraction * patients))
    delta = min(10.0 ** -delta_exponent, 0.5 / patients)
    plan = _plan(sigma=sigma, patients=patients, batch=batch, steps=steps, rounds=attempts, cap=cap,
                 delta=delta)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.jsonl"
        budget = SiteBudget.open(path, plan, max_grad_norm=1.0)
        refused_at = None
        for number in range(1, attempts + 1):
            step = (sigma, plan.sample_rate, steps)
            would_be = epsilon(history_of(budget.state().rounds) + [step], delta, "rdp")
            before = path.read_bytes()
            try:
                record = _charge(budget, number)
            except BudgetExhausted as refusal:
                refused_at = number
                assert would_be > cap and refusal.would_be == would_be and refusal.cap == cap
                assert path.read_bytes() == before  # nothing committed
                break
            assert would_be <= cap and record.epsilon == would_be
        # A fresh process (new objects) sees the same spend, and never above the cap.
        spent = SiteBudget(path).spent()
        assert spent <= cap
        if refused_at is not None:
            with pytest.raises(BudgetExhausted):
                _charge(SiteBudget(path), refused_at)


def test_restart_and_new_config_do_not_reset_the_spend(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    budget = SiteBudget.open(path, _plan(cap=3.0, rounds=10), max_grad_norm=1.0)
    spent = []
    with pytest.raises(BudgetExhausted) as refusal:
        for number in range(1, 100):
            spent.append(_charge(budget, number).epsilon)
    assert "above the site's cap 3" in str(refusal.value)
    # New process, new config with a planned schedule restarted at round 1: the spend is still
    # there.
    reopened = SiteBudget.open(path, _plan(cap=3.0, rounds=2), max_grad_norm=1.0)
    assert reopened.spent() == spent[-1]
    with pytest.raises(BudgetExhausted):
        _charge(reopened, 1)
    # The site raises its own cap: the spend carries over, a plan entry records the change.
    raised = SiteBudget.open(path, _plan(cap=6.0, rounds=10), max_grad_norm=1.0)
    record = _charge(raised, len(spent) + 1)
    assert record.epsilon > spent[-1] and record.target_epsilon == 6.0
    state = raised.state()
    # (The fixed sigma of _plan fits 9 of the 10 rounds under cap 6: the entry plans those.)
    assert [(p.target_epsilon, p.planned_rounds) for p in state.plans] == [
        (3.0, 10), (3.0, 2), (6.0, 9)]
    assert state.plans[2].planned_epsilon <= 6.0
    assert state.plans[1].noise_multiplier == state.plans[0].noise_multiplier


@pytest.mark.parametrize("change, match", [
    (dict(batch=5), "samples q=0.2"),
    (dict(patients=25), "samples q=0.2"),
    (dict(delta=1e-4), "delta=0.001"),
    (dict(accountant="prv"), "rdp accountant"),
])
def test_changed_mechanism_is_refused(tmp_path: Path, change, match):
    path = tmp_path / "ledger.jsonl"
    SiteBudget.open(path, _plan(), max_grad_norm=1.0)
    with pytest.raises(PlanMismatch, match=match):
        SiteBudget.open(path, _plan(**change), max_grad_norm=1.0)
    assert len(SiteLedger(path).state().plans) == 1


def test_new_calibration_keeps_the_first_sigma(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    SiteBudget.open(path, _plan(sigma=1.2), max_grad_norm=1.0)
    budget = SiteBudget.open(path, _plan(sigma=0.7, cap=8.0), max_grad_norm=0.5)
    record = _charge(budget, 1)
    assert record.noise_multiplier == 1.2
    assert budget.plan().max_grad_norm == 0.5


def test_open_site_budget_calibrates_once(tmp_path: Path, monkeypatch):
    plans = []

    def spy(**kwargs):
        plans.append(calibrate(**kwargs))
        return plans[-1]

    monkeypatch.setattr(budget_module, "calibrate", spy)
    settings = dict(delta=1e-3, num_patients=20, expected_batch_size=4, rounds=3, local_epochs=1,
                    accountant="rdp", max_grad_norm=1.0)
    first = open_site_budget(tmp_path / "ledger.jsonl", target_epsilon=4.0, **settings)
    sigma = plans[0].noise_multiplier
    assert first.plan().noise_multiplier == sigma
    again = open_site_budget(tmp_path / "ledger.jsonl", target_epsilon=6.0, **settings)
    assert again.plan().noise_multiplier == sigma and again.plan().target_epsilon == 6.0
    with pytest.raises(PlanMismatch, match="q=0.2"):
        open_site_budget(tmp_path / "ledger.jsonl", target_epsilon=6.0,
                         **{**settings, "num_patients": 25})
    assert len(plans) == 1  # later runs reuse the stored sigma


def test_dp_gate_charges_count_against_the_training_cap(tmp_path: Path):
    """A site that answered DP-gate queries trains only while DP-SGD + gate epsilon fit the cap."""
    from privacy.dp_gate import charge_gate

    path = tmp_path / "ledger.jsonl"
    budget = SiteBudget.open(path, _plan(cap=5.0, rounds=10), max_grad_norm=1.0)
    _charge(budget, 1)
    sgd_only = budget.spent()
    charge_gate(path, query_id="q1", epsilon=1.5, num_candidates=4, threshold_policy="fixed",
                candidates_sha256=HASH, own=CapSetting(5.0, 1e-3), consortium=None)
    assert budget.spent() == pytest.approx(sgd_only + 1.5)
    next_round = budget.check(2) - (sgd_only + 1.5)  # the DP-SGD cost of one more round
    gate = 5.0 - budget.spent() - next_round / 2     # leaves room for half a round only
    charge_gate(path, query_id="q2", epsilon=gate, num_candidates=4, threshold_policy="fixed",
                candidates_sha256=HASH, own=CapSetting(5.0, 1e-3), consortium=None)
    with pytest.raises(BudgetExhausted):
        budget.check(2)


def test_delta_above_a_tenth_of_one_over_n_is_refused_unless_the_site_allows_it():
    settings = dict(target_epsilon=4.0, num_patients=40, expected_batch_size=8, rounds=3,
                    local_epochs=1)
    with pytest.raises(CalibrationError, match=r"above 1/\(10N\) = 0.0025"):
        calibrate(delta=0.99 / 40, **settings)    # the 0.99/N: refused by default
    with pytest.raises(CalibrationError, match=r"budget.allow_large_delta: true") as refused:
        calibrate(delta=1 / 300, **settings)                # above 1/(10N) = 1/400
    assert "\n" not in str(refused.value) and "1/(10N)" in str(refused.value)
    assert calibrate(delta=1 / 300, allow_large_delta=True, **settings).delta == 1 / 300
    assert calibrate(delta=1 / 400, **settings).delta == 1 / 400       # the limit itself is fine
    with pytest.raises(CalibrationError, match="must be below 1/N"):
        calibrate(delta=1 / 40, allow_large_delta=True, **settings)


def test_budget_plan_states_the_delta_policy_in_one_line(tmp_path: Path, capsys):
    import yaml

    from experiments.cli import main

    config = tmp_path / "config.yaml"
    site = {"site_id": "a", "data_dir": str(tmp_path), "budget": {"target_epsilon": 4.0,
                                                                   "delta": 1 / 300}}
    config.write_text(yaml.safe_dump({"federation": {"rounds": 2, "sites": [site]},
                                      "privacy": {"expected_batch_size": 8}}))
    assert main(["budget", "plan", "--config", str(config), "--patients", "40"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget.allow_large_delta" in err
    site["budget"]["allow_large_delta"] = True
    config.write_text(yaml.safe_dump({"federation": {"rounds": 2, "sites": [site]},
                                      "privacy": {"expected_batch_size": 8}}))
    assert main(["budget", "plan", "--config", str(config), "--patients", "40"]) == 0
    out = capsys.readouterr().out
    assert "note: delta 0.00333333 is above 1/(10N)" in out


def test_config_check_states_the_delta_policy_in_one_line(tmp_path: Path, capsys):
    import yaml

    from experiments.cli import main

    rows = "".join(f"P{i},img{i}.nii.gz,lab{i}.nii.gz\n" for i in range(40))
    (tmp_path / "manifest.csv").write_text("patient_id,image,label\n" + rows)
    site = {"site_id": "a", "data_dir": str(tmp_path),
            "budget": {"target_epsilon": 4.0, "delta": 1 / 300}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"federation": {"sites": [site]}}))
    assert main(["config", "check", str(config), "--no-path-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site a: delta=0.00333333 is above 1/(10N)" in err
    site["budget"]["allow_large_delta"] = True
    config.write_text(yaml.safe_dump({"federation": {"sites": [site]}}))
    assert main(["config", "check", str(config), "--no-path-check"]) == 0


def test_more_rounds_than_the_cap_allows_never_write_a_plan_above_the_cap(tmp_path: Path):
    """A resumed run asking for more rounds: the plan entry is cut to the rounds that fit, and a
    site whose budget is spent refuses with its ledger byte for byte unchanged."""
    path = tmp_path / "ledger.jsonl"
    first = calibrate(target_epsilon=3.0, delta=1e-3, num_patients=20, expected_batch_size=4,
                      rounds=2, local_epochs=1, accountant="rdp")
    budget = SiteBudget.open(path, first, max_grad_norm=1.0)
    _charge(budget, 1)
    _charge(budget, 2)
    spent = path.read_bytes()
    # The resumed config plans 4 rounds (calibration for it would pick a larger sigma; the
    # stored one stays): 4 rounds at the stored sigma exceed the cap, and not one more fits.
    more = calibrate(target_epsilon=3.0, delta=1e-3, num_patients=20, expected_batch_size=4,
                     rounds=4, local_epochs=1, accountant="rdp")
    reopened = SiteBudget.open(path, more, max_grad_norm=1.0)
    with pytest.raises(BudgetExhausted):
        _charge(reopened, 3)
    assert path.read_bytes() == spent
    # A raised cap that fits 3 of the 4 planned rounds: the plan entry says 3, within the cap.
    raised_cap = first.epsilon_after(3) + 1e-6
    raised = SiteBudget.open(path, dataclasses.replace(more, target_epsilon=raised_cap),
                             max_grad_norm=1.0)
    _charge(raised, 3)
    with pytest.raises(BudgetExhausted):
        _charge(raised, 4)
    plans = raised.state().plans
    assert [p.planned_rounds for p in plans] == [2, 3]
    assert all(p.planned_epsilon <= p.target_epsilon for p in plans)
