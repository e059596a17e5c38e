"""Membership inference at a site (client.membership_audit): the holdout recorded in the ledger,
the attacks on an overfit model, and the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.membership_audit import (HOLDOUT_KIND, MembershipAuditError, apply_holdout,
                                     attack_metrics, held_out_ids, membership_attacks,
                                     recorded_holdout, roc_auc, tpr_at_fpr)
from client.site_runtime import EncodedScans
from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     UNetConfig)
from models.diffusion import build_scheduler, diffusion_loss
from models.latent_unet import build_latent_unet
from privacy.ledger import verify_ledger
from privacy.site_ledger import SiteLedger


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_metrics_on_known_scores() -> None:
    members, nonmembers = np.array([3.0, 4.0, 5.0, 0.5]), np.array([0.0, 1.0, 2.0, 0.5])
    assert roc_auc(members, nonmembers) == pytest.approx((4 + 4 + 4 + 1.5) / 16)
    assert roc_auc(nonmembers, members) == pytest.approx(1 - roc_auc(members, nonmembers))
    # FPR 0 allowed -> threshold at the highest non-member (2.0): 3 of 4 members above it.
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75
    metrics = attack_metrics(members, nonmembers, bootstrap=200)
    low, high = metrics["auc"]["ci95"]
    assert low <= metrics["auc"]["value"] <= high


def test_holdout_is_recorded_once_and_fixed(tmp_path) -> None:
    patients = {f"P{i}": [i] for i in range(20)}
    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    assert apply_holdout(ledger, 0.0, patients) == patients          # off: nothing recorded
    assert recorded_holdout(ledger) is None
    train = apply_holdout(ledger, 0.25, patients)
    record = recorded_holdout(ledger)
    assert record is not None and record.num_held_out == 5 and len(train) == 15
    assert set(train).isdisjoint(held_out_ids(list(patients), 0.25, record.salt))
    assert apply_holdout(ledger, 0.25, patients) == train             # reused, not redrawn
    assert [e.kind for e in SiteLedger(ledger.path).ledger.entries()] == [HOLDOUT_KIND]
    assert verify_ledger(ledger.path).ok
    with pytest.raises(MembershipAuditError, match="membership_holdout=0.25"):
        apply_holdout(ledger, 0.5, patients)                           # changed fraction refused
    with pytest.raises(MembershipAuditError, match="patients changed"):
        apply_holdout(ledger, 0.25, {**patients, "P99": [99]})


def test_holdout_after_the_first_round_is_refused(tmp_path) -> None:
    from privacy.budget import SiteBudget
    from privacy.calibration import calibrate

    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    SiteBudget.open(ledger, calibrate(target_epsilon=5.0, delta=1e-4, num_patients=8,
                                      expected_batch_size=2, rounds=1, local_epochs=1),
                    max_grad_norm=1.0)
    with pytest.raises(MembershipAuditError, match="before training"):
        apply_holdout(ledger, 0.25, {f"P{i}": [i] for i in range(8)})


def _tiny_model() -> ModelConfig:
    return ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, False], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(dropout=0.0),
        diffusion=DiffusionConfig(train_timesteps=100))


def test_attacks_separate_an_overfit_model_and_not_shuffled_labels() -> None:
    torch.manual_seed(0)
    model_cfg = _tiny_model()
    patients = {f"P{i:02d}": [i] for i in range(24)}
    scans = EncodedScans(torch.randn(24, 2, 4, 4, 4), torch.full((24, 4, 4, 4, 4), 0.25),
                         torch.zeros(24, 0))
    members = {p: r for p, r in list(patients.items())[:12]}
    nonmembers = {p: r for p, r in list(patients.items())[12:]}
    denoiser = build_latent_unet(model_cfg, 4, 0)
    scheduler = build_scheduler(model_cfg)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    rows = torch.tensor([r[0] for r in members.values()])
    generator = torch.Generator().manual_seed(1)
    denoiser.train()
    for _ in range(300):  # overfit the 12 members, no DP
        optimizer.zero_grad()
        diffusion_loss(denoiser, scheduler, scans.latents[rows], scans.labels[rows],
                       generator=generator).mean().backward()
        optimizer.step()
    attacks = membership_attacks(denoiser, scheduler, scans, members, nonmembers,
                                 has_attributes=False)
    for name in ("loss", "step_error"):
        assert attacks[name]["auc"]["value"] > 0.8, (name, attacks[name])
        assert attacks[name]["auc"]["ci95"][0] > 0.5, (name, attacks[name])
    # Wired backwards (members called non-members), the same scores give AUC < 0.5.
    swapped = membership_attacks(denoiser, scheduler, scans, nonmembers, members,
                                 has_attributes=False)
    assert swapped["loss"]["auc"]["value"] < 0.2
    json.dumps(attacks)  # aggregate figures only, JSON-ready
