"""DP-SGD at the patient level on a tiny MONAI 3D diffusion UNet: per-sample gradients, per-patient
clipping, noise scale, multiplicity/subset/EMA accounting, write-ahead commit and crash safety."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from opacus.grad_sample import GradSampleModule
from scipy import stats
from torch import nn

from privacy.accounting import replay_accountant
from privacy.budget import BudgetExhausted, SiteBudget
from privacy.calibration import SchedulePlan
from privacy.dp_trainer import (DPSettings, DPSetupError, DPTrainer, backward_per_patient,
                                expand_patients, privatise, release)
from privacy.grad_samplers import active_conv3d_grad_sampler, use_conv3d_grad_sampler
from privacy.outbox import weights_hash
from privacy.site_ledger import SiteLedger
from privacy.trainable import trainable_parameter_names

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: one thread is several times faster than two contending ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0) -> DiffusionModelUNet:
    """A tiny 3D diffusion UNet with every weight perturbed: MONAI zero-initialises the output and
    attention projections, which would leave every other layer without a gradient."""
    torch.manual_seed(seed)
    model = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=[8, 8],
                               attention_levels=[False, True], num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def scan_items(count: int, seed: int = 0) -> list[dict]:
    """Latents (1, 8^3), a map channel, and each scan's own fixed noise and timestep (deterministic
    loss: splitting a batch differently gives the same per-row losses)."""
    generator = torch.Generator().manual_seed(seed)
    return [{"latent": torch.randn(1, 8, 8, 8, generator=generator),
             "map": torch.rand(1, 8, 8, 8, generator=generator),
             "noise": torch.randn(1, 8, 8, 8, generator=generator),
             "t": torch.randint(0, 1000, (), generator=generator)} for _ in range(count)]


def noise_mse(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-row noise-prediction MSE (R,)."""
    noisy = 0.8 * batch["latent"] + 0.6 * batch["noise"]
    prediction = model(torch.cat([noisy, batch["map"]], dim=1), timesteps=batch["t"])
    return (prediction - batch["noise"]).pow(2).flatten(1).mean(dim=1)


def random_noise_mse(model: nn.Module, batch: dict) -> torch.Tensor:
    """Like diffusion_loss: fresh noise and timesteps per row (noise multiplicity draws differ)."""
    noise = torch.randn_like(batch["latent"])
    timesteps = torch.randint(0, 1000, (noise.shape[0],))
    prediction = model(torch.cat([0.8 * batch["latent"] + 0.6 * noise, batch["map"]], dim=1),
                       timesteps=timesteps)
    return (prediction - noise).pow(2).flatten(1).mean(dim=1)


def stack(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


# 7 patients over 10 scans: p0 has 3 scans, p1 has 2.
PATIENTS = {"p0": [0, 7, 8], "p1": [1, 9], "p2": [2], "p3": [3], "p4": [4], "p5": [5], "p6": [6]}


def plan(sigma: float = 1.0, cap: float = 50.0, batch: int = 3, patients: int = 7,
         rounds: int = 3) -> SchedulePlan:
    q = batch / patients
    return SchedulePlan(target_epsilon=cap, delta=1e-3, accountant="rdp", noise_multiplier=sigma,
                        sample_rate=q, num_patients=patients, expected_batch_size=batch,
                        local_epochs=1, steps_per_round=int(1 / q), planned_rounds=rounds)


def per_row_reference(model: nn.Module, batch: dict) -> list[list[torch.Tensor]]:
    rows = []
    for i in range(len(batch["t"])):
        model.zero_grad()
        noise_mse(model, {k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return rows


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode, conv", [("hooks", "grouped"), ("hooks", "unfold"),
                                        ("functorch", "grouped")])
def test_per_sample_gradients_match_autograd(mode, conv):
    model, batch = tiny_unet(), stack(scan_items(3))
    reference = per_row_reference(model, batch)
    assert all(g.abs().sum() > 0 for g in reference[0])  # every layer has a gradient to compare
    settings = DPSettings(grad_sample_mode=mode, conv_grad_sampler=conv)
    module, optimizer = privatise(model, settings, 1.0)
    assert active_conv3d_grad_sampler() == conv
    noise_mse(module, batch).sum().backward()
    for j, p in enumerate(model.parameters()):
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-6)
    release(module, optimizer)
    use_conv3d_grad_sampler("grouped")


def test_expanded_weights_mode_matches_autograd_on_plain_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                          nn.Flatten(), nn.Linear(4 * 4 ** 3, 1))
    x = torch.randn(3, 2, 4, 4, 4)
    reference = []
    for i in range(3):
        model.zero_grad()
        model(x[i:i + 1]).sum().backward()
        reference.append([p.grad.clone() for p in model.parameters()])
    module, optimizer = privatise(model, DPSettings(grad_sample_mode="ew"), 1.0)
    module(x).sum().backward()
    for j, p in enumerate(model.parameters()):
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-6)
    release(module, optimizer)


def _clipped_sum_reference(model, items, groups, clip):
    total = None
    for rows in groups:
        model.zero_grad()
        noise_mse(model, stack([items[r] for r in rows])).mean().backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        clipped = [factor * g for g in grads]
        total = clipped if total is None else [t + c for t, c in zip(total, clipped)]
    model.zero_grad()
    return total


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_gradient_is_per_patient_then_clipped(mode):
    """Opacus clips the gradient of each patient's mean loss over all its scans and noise draws."""
    items, clip, batch_size = scan_items(10), 1e-3, 3
    model = tiny_unet()
    patient_rows = list(PATIENTS.values())
    sampled = [0, 1, 4]  # 3 + 2 + 1 scans, each twice (noise multiplicity 2)
    rows, owner = expand_patients(sampled, patient_rows, multiplicity=2)
    assert rows == [0, 0, 7, 7, 8, 8, 1, 1, 9, 9, 4, 4]
    assert owner.tolist() == [0] * 6 + [1] * 4 + [2] * 2
    reference = _clipped_sum_reference(copy.deepcopy(model), items,
                                       [patient_rows[p] for p in sampled], clip)
    settings = DPSettings(grad_sample_mode=mode, max_grad_norm=clip)
    module, optimizer = privatise(model, settings, noise_multiplier=0.0,
                                  expected_batch_size=batch_size,
                                  optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.0))
    batch = stack([items[r] for r in rows])
    backward_per_patient(module, optimizer, noise_mse, batch, owner, 3, mode)
    assert all(p.grad_sample.shape[0] == 3 for p in optimizer.params)
    norms = [p.grad_sample.flatten(1).norm(dim=1) for p in optimizer.params]
    unclipped = torch.stack(norms).norm(dim=0)
    assert (unclipped > clip).all()  # clipping really acts
    optimizer.step()
    for p, expected in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad * batch_size, expected, rtol=1e-3, atol=1e-9)
    optimizer.zero_grad()
    # One patient at a time: its clipped contribution has norm <= C.
    for patient in sampled:
        rows, owner = expand_patients([patient], patient_rows, multiplicity=2)
        batch = stack([items[r] for r in rows])
        backward_per_patient(module, optimizer, noise_mse, batch, owner, 1, mode)
        optimizer.step()
        norm = torch.sqrt(sum((p.grad * batch_size).pow(2).sum() for p in optimizer.params))
        assert norm <= clip * (1 + 1e-5)
        optimizer.zero_grad()
    release(module, optimizer)


def test_ghost_clipping_matches_per_sample_clipping():
    items, clip = scan_items(3), 1e-3
    model = tiny_unet()
    reference = _clipped_sum_reference(copy.deepcopy(model), items, [[0], [1], [2]], clip)
    settings = DPSettings(grad_sample_mode="ghost", max_grad_norm=clip)
    module, optimizer = privatise(model, settings, noise_multiplier=0.0, expected_batch_size=1,
                                  optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.0))
    backward_per_patient(module, optimizer, noise_mse, stack(items), torch.arange(3), 3, "ghost")
    optimizer.step()
    for p, expected in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-9)
    release(module, optimizer)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_has_standard_deviation_sigma_c_over_b(tmp_path: Path, clipping):
    # A Linear with zero gradient: the update after one round is -sum(noise)/B over its steps.
    model = nn.Sequential(nn.Linear(300, 300))
    items = [{"x": torch.randn(300)} for _ in range(8)]
    patients = {f"p{i}": [i] for i in range(8)}
    sigma, clip, batch = 0.8, 2.0, 4
    schedule = SchedulePlan(target_epsilon=1e6, delta=1e-3, accountant="rdp",
                            noise_multiplier=sigma, sample_rate=batch / 8, num_patients=8,
                            expected_batch_size=batch, local_epochs=1, steps_per_round=2,
                            planned_rounds=1)
    budget = SiteBudget.open(tmp_path / "ledger.jsonl", schedule, max_grad_norm=clip,
                             clipping=clipping)
    settings = DPSettings(max_grad_norm=clip, clipping=clipping, expected_batch_size=batch)
    trainer = DPTrainer(model, lambda m, b: 0.0 * m(b["x"]).sum(dim=1), items, patients, budget,
                        settings, seed=3, optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=1.0))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.run_round(1)
    change = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    expected_std = (2 ** 0.5) * sigma * clip / batch  # 2 steps of independent noise
    n = change.numel()
    statistic = (n - 1) * change.var().item() / expected_std ** 2
    assert stats.chi2.ppf(1e-4, n - 1) < statistic < stats.chi2.ppf(1 - 1e-4, n - 1)
    assert abs(change.mean().item()) < 5 * expected_std / n ** 0.5


def _trainer(tmp_path, name, settings, schedule=None, loss=random_noise_mse, seed=0, model=None,
             items=None):
    budget = SiteBudget.open(tmp_path / name / "ledger.jsonl", schedule or plan(),
                             max_grad_norm=1.0, clipping=settings.clipping)
    return DPTrainer(model or tiny_unet(), loss, items or scan_items(10), PATIENTS, budget,
                     settings, seed=seed,
                     optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.05))


def test_multiplicity_subset_and_ema_leave_epsilon_identical(tmp_path: Path):
    seen_rows = []

    def counting_loss(model, batch):
        seen_rows.append(len(batch["t"]))
        return random_noise_mse(model, batch)

    variants = {
        "plain": DPSettings(expected_batch_size=3, max_physical_batch_size=64),
        "multiplicity": DPSettings(expected_batch_size=3, max_physical_batch_size=64,
                                   noise_multiplicity=3),
        "subset": DPSettings(expected_batch_size=3, max_physical_batch_size=64,
                             trainable="attention_conditioning"),
        "ema": DPSettings(expected_batch_size=3, max_physical_batch_size=64, ema_decay=0.5),
    }
    records, weights = {}, {}
    for name, settings in variants.items():
        seen_rows.clear()
        trainer = _trainer(tmp_path, name, settings, loss=counting_loss)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.run_round(1)
        records[name], weights[name] = result.record, (initial, result.weights)
        if name == "multiplicity":
            assert seen_rows and all(rows % 3 == 0 for rows in seen_rows)
    accounted = {(r.noise_multiplier, r.sample_rate, r.steps, r.epsilon) for r in records.values()}
    assert len(accounted) == 1
    initial, released = weights["subset"]
    trained = set(trainable_parameter_names(tiny_unet(), "attention_conditioning"))
    assert trained and all("attention" in name for name in trained)
    for name, tensor in released.items():
        if name in trained:
            assert not torch.equal(tensor, initial[name]), name
        elif name in dict(tiny_unet().named_parameters()):
            assert torch.equal(tensor, initial[name]), name


def test_physical_batches_split_at_patient_boundaries_without_changing_the_result(tmp_path: Path):
    results = []
    for name, physical in (("one_pass", 64), ("split", 1)):
        settings = DPSettings(expected_batch_size=3, max_physical_batch_size=physical)
        trainer = _trainer(tmp_path, name, settings, loss=noise_mse, seed=11)
        results.append(trainer.run_round(1).weights)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-7)


def test_rounds_replay_to_the_opacus_accountant_and_stop_at_the_cap(tmp_path: Path):
    schedule = plan(sigma=1.0, cap=5.0)
    trainer = _trainer(tmp_path, "site", DPSettings(expected_batch_size=3), schedule=schedule)
    committed = []
    with pytest.raises(BudgetExhausted):
        for number in range(1, 50):
            committed.append(trainer.run_round(number).record)
    ledger_rounds = SiteLedger(trainer.budget.path).state().rounds
    assert ledger_rounds == committed and len(committed) >= 1
    assert committed[-1].epsilon <= 5.0
    # The accountant Opacus stepped during the last round holds exactly the ledger's history.
    replayed = replay_accountant(ledger_rounds, "rdp")
    assert trainer.accountant.history == replayed.history
    assert trainer.accountant.get_epsilon(1e-3) == replayed.get_epsilon(1e-3)
    assert replayed.get_epsilon(1e-3) == committed[-1].epsilon
    # The refused round trained nothing: the model is the last committed one.
    assert weights_hash(trainer.model.state_dict()) == committed[-1].model_hash_after


def test_privatising_twice_is_refused_and_hooks_are_removed_after_a_round(tmp_path: Path):
    model = tiny_unet()
    wrapped = GradSampleModule(model)
    with pytest.raises(DPSetupError, match="already wrapped or hooked"):
        _trainer(tmp_path, "twice", DPSettings(expected_batch_size=3), model=model)
    wrapped._close()
    trainer = _trainer(tmp_path, "clean", DPSettings(expected_batch_size=3), model=model)
    trainer.run_round(1)
    assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    trainer.run_round(2)


def test_in_place_change_of_a_hooked_output_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    module, optimizer = privatise(model, DPSettings(), 1.0)
    with pytest.raises(DPSetupError, match="in place"):
        backward_per_patient(module, optimizer, lambda m, b: m(b).sum(dim=1), torch.randn(3, 4),
                             torch.arange(3), 3, "hooks")
    release(module, optimizer)


def test_failed_round_commits_nothing_and_restores_the_weights(tmp_path: Path):
    trainer = _trainer(tmp_path, "mean", DPSettings(expected_batch_size=3),
                       loss=lambda m, b: noise_mse(m, b).mean())
    start = weights_hash(trainer.model.state_dict())
    with pytest.raises(DPSetupError, match="one loss per row"):
        trainer.run_round(1)
    assert SiteLedger(trainer.budget.path).state().rounds == []
    assert weights_hash(trainer.model.state_dict()) == start


def test_empty_poisson_batches_still_take_a_noisy_step(tmp_path: Path):
    calls = []

    def counting_loss(model, batch):
        calls.append(len(batch["t"]))
        return noise_mse(model, batch)

    schedule = plan(batch=1, patients=7)  # q = 1/7: 7 steps, each batch empty with probability 0.4
    trainer = _trainer(tmp_path, "sparse", DPSettings(expected_batch_size=1), schedule=schedule,
                       loss=counting_loss, seed=5)
    record = trainer.run_round(1).record
    assert record.steps == 7 and len(calls) < 7  # some steps had no patient, and still counted
    assert trainer.accountant.history == [(1.0, 1 / 7, 7)]


CRASH_SCRIPT = textwrap.dedent('''
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[1])
    from privacy.budget import SiteBudget
    from privacy.calibration import SchedulePlan
    from privacy.dp_trainer import DPSettings, DPTrainer
    from privacy.outbox import weights_hash
    torch.set_num_threads(1)
    folder, phase, round_number = sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)  # the server sends the same starting weights again after a crash
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                                torch.nn.SiLU(), torch.nn.Conv3d(4, 1, 3, padding=1))
    generator = torch.Generator().manual_seed(1)
    items = [{"x": torch.randn(2, 8, 8, 8, generator=generator)} for _ in range(6)]
    def loss(m, batch):
        x = batch["x"]
        return (m(x) - x[:, :1]).pow(2).flatten(1).mean(1)
    plan = SchedulePlan(target_epsilon=100.0, delta=1e-3, accountant="rdp", noise_multiplier=1.0,
                        sample_rate=0.5, num_patients=6, expected_batch_size=3, local_epochs=1,
                        steps_per_round=2, planned_rounds=3)
    budget = SiteBudget.open(os.path.join(folder, "ledger.jsonl"), plan, max_grad_norm=1.0)
    trainer = DPTrainer(model, loss, items, {f"p{i}": [i] for i in range(6)}, budget,
                        DPSettings(expected_batch_size=3))
    result = trainer.run_round(round_number)
    if phase == "die-before-send":
        os.kill(os.getpid(), signal.SIGKILL)  # committed, not yet sent
    torch.save(result.weights, os.path.join(folder, f"sent-{round_number}.pt"))
    print("resumed" if result.resumed else "trained", weights_hash(result.weights))
''')


def _run(script: Path, folder: Path, phase: str, round_number: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(script), str(REPO), str(folder), phase, str(round_number)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_between_commit_and_send_counts_the_round_once(tmp_path: Path):
    script = tmp_path / "site.py"
    script.write_text(CRASH_SCRIPT)
    ledger = tmp_path / "ledger.jsonl"

    killed = _run(script, tmp_path, "die-before-send", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rounds = SiteLedger(ledger).state().rounds
    assert [r.round for r in rounds] == [1] and not (tmp_path / "sent-1.pt").exists()

    restarted = _run(script, tmp_path, "send", 1)
    assert restarted.returncode == 0, restarted.stderr
    status, sent_hash = restarted.stdout.split()
    assert status == "resumed" and sent_hash == rounds[0].model_hash_after
    assert SiteLedger(ledger).state().rounds == rounds  # counted exactly once
