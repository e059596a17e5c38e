"""One-run canary auditing (privacy.canary_audit, ``fedsynth audit canaries``).

The bars: the empirical lower bound never exceeds the accountant's epsilon with DP on (several
seeds), is far above the DP setting's epsilon with DP off, and exceeds the accountant's epsilon when
the noise the optimizer adds is smaller than the accounted one (an accounting bug is caught)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml

from experiments.cli import main
from privacy.budget import SiteBudget
from privacy.calibration import calibrate
from privacy.canary_audit import (CANARY_LEDGER, AuditedMechanism, CanaryAuditError,
                                  epsilon_lower_bound, p_value_one_run, run_canary_audit)
from privacy.site_ledger import read_site_ledger

DELTA = 1e-5
CANARIES = 1000


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def dp_mechanism(target_epsilon: float = 1.0) -> AuditedMechanism:
    plan = calibrate(target_epsilon=target_epsilon, delta=DELTA, num_patients=40,
                     expected_batch_size=8, rounds=3, local_epochs=1)
    return AuditedMechanism(plan.noise_multiplier, 40, 8, 1, 3, "rdp", DELTA, 1.0,
                            target_epsilon=target_epsilon)


def test_bound_reproduces_the_papers_figures() -> None:
    # Steinke, Nasr, Jagielski 2023 (arXiv:2305.08846): App. D and Sec. 7 printed values.
    assert epsilon_lower_bound(1000, 100, 75, 1e-4) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100_000, 1510, 1439, 1e-5) == pytest.approx(2.6758, abs=1e-3)
    assert p_value_one_run(100, 100, 75, math.log(3), 0) == pytest.approx(0.553, abs=1e-3)
    # All guesses right means more evidence than 3/4 right.
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) > epsilon_lower_bound(1000, 100, 75, 1e-5)


def _paper_p_value(m, r, v, eps, delta):
    """App. D's ``p_value_DP_audit`` as printed (a plain loop), to check the vectorised one."""
    from scipy import stats

    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha = total = 0
    for i in range(1, v + 1):
        total = total + stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


@pytest.mark.parametrize("m, r, v, eps, delta", [(1000, 100, 75, 0.7, 1e-4),
                                                 (1000, 400, 300, 1.3, 1e-5),
                                                 (200, 20, 20, 3.0, 1e-3), (50, 10, 1, 0.1, 0.0)])
def test_p_value_is_the_papers_loop(m, r, v, eps, delta) -> None:
    assert p_value_one_run(m, r, v, eps, delta) == pytest.approx(
        _paper_p_value(m, r, v, eps, delta), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_bound_never_exceeds_the_accountant(seed, tmp_path) -> None:
    mechanism = dp_mechanism()
    audit = run_canary_audit(mechanism, tmp_path, canaries=CANARIES, seed=seed)
    print(f"seed {seed}: lower bound {audit.epsilon_lower_bound:.3f} <= accountant "
          f"{audit.accountant_epsilon:.3f}")
    assert 0 <= audit.epsilon_lower_bound <= audit.accountant_epsilon <= 1.0
    assert not audit.exceeds_accountant
    assert audit.independent_epsilon == pytest.approx(audit.accountant_epsilon, rel=0.02)
    # The research ledger holds the audited run: the same mechanism, charged through DPTrainer.
    state = read_site_ledger(tmp_path / CANARY_LEDGER)
    assert [r.round for r in state.rounds] == [1, 2, 3]
    assert state.rounds[-1].epsilon == pytest.approx(audit.accountant_epsilon, rel=1e-9)
    assert state.plan.noise_multiplier == mechanism.noise_multiplier
    assert state.plan.sample_rate == mechanism.sample_rate


def test_without_dp_the_bound_is_far_above_the_dp_epsilon(tmp_path) -> None:
    dp = dp_mechanism()
    off = AuditedMechanism(0.0, 40, 8, 1, 3, "rdp", DELTA, 1.0, private=False)
    audit = run_canary_audit(off, tmp_path, canaries=CANARIES, seed=0)
    print(f"no DP: lower bound {audit.epsilon_lower_bound:.3f} vs the DP setting's "
          f"{dp.epsilon():.3f}")
    assert audit.epsilon_lower_bound > 3 * dp.epsilon()
    assert math.isinf(audit.accountant_epsilon) and not audit.exceeds_accountant


def test_less_noise_than_accounted_is_caught(tmp_path, monkeypatch) -> None:
    import opacus.optimizers.optimizer as dp_optimizer

    real = dp_optimizer._generate_noise
    monkeypatch.setattr(dp_optimizer, "_generate_noise",
                        lambda std, reference, **kw: real(std / 10, reference, **kw))
    audit = run_canary_audit(dp_mechanism(), tmp_path, canaries=CANARIES, seed=0)
    print(f"noise / 10: lower bound {audit.epsilon_lower_bound:.3f} > accountant "
          f"{audit.accountant_epsilon:.3f}")
    assert audit.exceeds_accountant


def test_needs_a_fresh_research_ledger(tmp_path) -> None:
    (tmp_path / CANARY_LEDGER).write_text("")
    with pytest.raises(CanaryAuditError, match="fresh research ledger"):
        run_canary_audit(dp_mechanism(), tmp_path, canaries=10)


def test_cli_audits_the_sites_plan_and_never_writes_its_ledger(tmp_path, capsys) -> None:
    data = tmp_path / "site"
    data.mkdir()
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site_id": "site_a", "data_dir": str(data)}))
    ledger = data / ".fedsynth" / "ledger.jsonl"
    ledger.parent.mkdir()
    SiteBudget.open(ledger, calibrate(target_epsilon=2.0, delta=DELTA, num_patients=40,
                                      expected_batch_size=8, rounds=2, local_epochs=1),
                    max_grad_norm=1.0)
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    assert main(["audit", "canaries", "--site-config", str(site_yaml), "--canaries", "200",
                 "--out", str(data / "audit")]) == 2                  # inside the site: refused
    assert "outside" in capsys.readouterr().err
    out = tmp_path / "audit"
    assert main(["audit", "canaries", "--site-config", str(site_yaml), "--canaries", "200",
                 "--out", str(out)]) == 0
    result = json.loads((out / "canary_audit.json").read_text())
    plan = read_site_ledger(ledger).plan
    assert result["mechanism"]["noise_multiplier"] == plan.noise_multiplier
    assert result["mechanism"]["steps"] == 2 * plan.steps_per_round
    assert result["epsilon_lower_bound"] <= result["accountant_epsilon"] <= 2.0
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before
    assert "empirical epsilon >=" in capsys.readouterr().out
