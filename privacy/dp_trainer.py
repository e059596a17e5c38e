"""DP-SGD fine-tuning of any ``nn.Module`` at the patient level, with Opacus.

The model is trained through ``loss_fn(model, batch) -> Tensor (R,)``, one loss per row of the batch
(``models.diffusion.diffusion_loss`` has this contract). The privacy unit is the patient:

1. Opacus' ``DPDataLoader`` Poisson-samples PATIENT indices at rate q = B/N (B the expected batch
   size in patients, N the site's patients). ``BatchMemoryManager`` splits a logical batch into
   physical ones at patient boundaries, so a patient's rows are never split.
2. Each sampled patient expands to all its scans, each repeated ``noise_multiplicity`` times (DPDM:
   K noise/timestep draws per scan; ``loss_fn`` draws the noise, so each copy gets its own).
3. After the backward pass, each parameter's per-row gradients (``p.grad_sample``, rows = scans x K)
   are averaged per patient (:func:`reduce_grad_samples_by_patient`): the per-patient gradient is
   the gradient of the patient's mean loss. A patient whose gradient holds a NaN or an infinity
   gets a zero gradient (:func:`zero_non_finite_patients`): Opacus' clip factor for an infinite
   norm is 0 and 0 * inf is NaN, which would turn the whole noisy sum into NaN and tell the server
   that some sampled patient misbehaved. A zero row keeps each patient's contribution within norm C.
   Only then does Opacus' ``DPOptimizer`` clip (each patient to norm C), sum, add
   N(0, sigma^2 C^2) and divide by B.

Multiplicity, the trainable subset and the EMA change none of q, sigma or the step count, so the
accounted epsilon is the same (tested). Steps per round are ``local_epochs x int(1/q)``.

Write-ahead commit (:meth:`DPTrainer.run_round`): the budget is checked BEFORE training (epsilon as
if the round were already composed; :class:`~privacy.budget.BudgetExhausted` otherwise, so nothing
is trained past the cap). The round is committed to the ledger AFTER training and BEFORE the weights
are returned, so the entry can name the exact weights it releases (hash before and after) and
nothing can leave uncounted: ``run_round`` returns weights only after the append was fsync'd. The
privacy cost is incurred when weights are released; a crash during training releases nothing. A
crash after the commit counts the round: the restarted site resends the committed weights from the
outbox (same round, same starting weights) instead of training and charging again. The model is
trained in place; if anything fails before the commit, it is put back to the weights the round
started from, so no uncommitted weights stay in it.

The accountant of the engine (``engine.accountant``) is restored from the ledger with
``load_state_dict``; Opacus' own step hook steps it during the round, and before the commit its
history must equal the ledger's plus this round, or the round is abandoned.

Opacus pitfalls handled here: a model already wrapped or hooked by Opacus is refused (privatising
twice stacks hooks) and the hooks are removed after each round; ghost clipping gets one loss per row
through ``DPTensorFastGradientClipping`` and is only allowed when every patient has exactly one row
(it clips rows, and cannot average a patient's rows first; it has no per-sample gradient to zero,
so there a non-finite row is caught by the weights check before the commit instead). Opacus'
``secure_mode`` needs torchcsprng, which is not installed; noise comes from a ``torch.Generator``
seeded from the OS entropy pool unless a seed is given (tests).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule, prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset
from tqdm import tqdm

from privacy.accounting import history_of, merge_history, replay_accountant
from privacy.budget import PlanMismatch, SiteBudget
from privacy.grad_samplers import ConvGradSampler, use_conv3d_grad_sampler
from privacy.local_training import collate_rows, ema_of, expand_patients, released_weights
from privacy.outbox import (OutboxItem, committed_weights, outbox_path, weights_hash,
                            write_outbox)
from privacy.site_ledger import PlanRecord, RoundRecord, SiteLedgerState
from privacy.trainable import apply_trainable, restore_trainable

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]


class DPSetupError(ValueError):
    """A model, loss or setting the DP trainer cannot use. One line: what and how to fix."""


class AccountingMismatch(RuntimeError):
    """Opacus' accountant and the ledger disagree after a round; the round is not committed."""


class NonFiniteWeights(RuntimeError):
    """A round's weights hold NaN or infinite values; they are not committed, kept or sent."""


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())]


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings (the fields of ``configs.schema.PrivacyConfig`` that training uses).

    ``max_physical_batch_size`` counts rows (scans x noise_multiplicity) per forward pass; a
    physical batch holds whole patients, at least one.
    """

    max_grad_norm: float = 1.0
    clipping: Literal["flat", "per_layer"] = "flat"
    expected_batch_size: int = 8
    max_physical_batch_size: int = 8
    grad_sample_mode: GradSampleMode = "hooks"
    noise_multiplicity: int = 1
    trainable: Literal["all", "attention_conditioning"] = "all"
    ema_decay: float | None = None
    learning_rate: float = 1e-4
    conv_grad_sampler: ConvGradSampler = "grouped"

    @classmethod
    def from_config(cls, privacy: Any) -> "DPSettings":
        """From a PrivacyConfig-like object (duck-typed: privacy/ does not import configs)."""
        names = [name for name in cls.__dataclass_fields__ if hasattr(privacy, name)]
        return cls(**{name: getattr(privacy, name) for name in names})


@dataclass(frozen=True)
class RoundResult:
    """The released weights of one round and its ledger entry.

    ``weights`` is the full ``state_dict`` (CPU) of the model after the round (the EMA weights when
    ``ema_decay`` is set). ``resumed`` is True when the round was already committed and its weights
    come from the outbox (nothing was trained or charged again).
    """

    round: int
    weights: dict[str, torch.Tensor]
    record: RoundRecord
    resumed: bool


def check_not_privatised(model: nn.Module) -> None:
    """Refuse a model that Opacus already wraps or hooks (a second wrap would stack hooks)."""
    if isinstance(model, AbstractGradSampleModule) or any(
            hasattr(module, "autograd_grad_sample_hooks") for module in model.modules()) or any(
            hasattr(p, "grad_sample") for p in model.parameters()):
        raise DPSetupError(f"{type(model).__name__} is already wrapped or hooked by Opacus; pass "
                           f"the plain nn.Module (privatising it twice would stack hooks and "
                           f"double gradients)")


def per_layer_norms(max_grad_norm: float, num_parameters: int) -> list[float]:
    """Per-layer clipping bounds C/sqrt(L) for L parameter tensors: their joint norm is C."""
    return [max_grad_norm / math.sqrt(num_parameters)] * num_parameters


def privatise(model: nn.Module, settings: DPSettings, noise_multiplier: float, *,
              expected_batch_size: int | None = None,
              noise_generator: torch.Generator | None = None,
              optimizer_factory: OptimizerFactory | None = None
              ) -> tuple[AbstractGradSampleModule, DPOptimizer]:
    """Wrap ``model`` for per-sample gradients and build the DP optimizer over its trainable params.

    Per-sample gradients are of the SUM of the row losses (``loss_reduction="sum"`` in the module),
    so a row's ``grad_sample`` is the gradient of its own loss; the optimizer divides the noisy
    clipped sum by ``expected_batch_size`` (patients). Freeze parameters (``requires_grad``) before
    calling.
    """
    check_not_privatised(model)
    mode = settings.grad_sample_mode
    if mode not in ("hooks", "functorch", "ew", "ghost"):
        raise DPSetupError(f"grad_sample_mode must be hooks, functorch, ew or ghost (got {mode!r})")
    if mode == "ghost" and settings.clipping != "flat":
        raise DPSetupError("grad_sample_mode 'ghost' supports only flat clipping; "
                           "set clipping: flat")
    try:
        ModuleValidator.validate(model, strict=True)  # what PrivacyEngine.make_private checks
    except UnsupportedModuleError as err:
        raise DPSetupError(f"{type(model).__name__} has layers Opacus cannot clip per sample "
                           f"({str(err).strip().splitlines()[-1]}); replace them (e.g. BatchNorm "
                           f"by GroupNorm)") from None
    use_conv3d_grad_sampler(settings.conv_grad_sampler)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DPSetupError(f"{type(model).__name__} has no trainable parameter; check 'trainable'")
    extra = {"max_grad_norm": settings.max_grad_norm} if mode == "ghost" else {}
    module = prepare_module(model, grad_sample_mode=mode, batch_first=True, loss_reduction="sum",
                            **extra)
    module.forbid_grad_accumulation()
    base = optimizer_factory(params) if optimizer_factory else torch.optim.Adam(
        params, lr=settings.learning_rate)
    bound = per_layer_norms(settings.max_grad_norm, len(params)) \
        if settings.clipping == "per_layer" else settings.max_grad_norm
    optimizer_class = get_optimizer_class(clipping=settings.clipping, distributed=False,
                                          grad_sample_mode=mode)
    optimizer = optimizer_class(
        base, noise_multiplier=noise_multiplier, max_grad_norm=bound,
        expected_batch_size=expected_batch_size or settings.expected_batch_size,
        loss_reduction="mean", generator=noise_generator)
    return module, optimizer


def release(module: AbstractGradSampleModule, optimizer: DPOptimizer) -> None:
    """Remove Opacus' hooks and per-parameter state so the model is a plain module again."""
    module.cleanup()
    for p in optimizer.params:
        p.grad = None
        if hasattr(p, "summed_grad"):
            del p.summed_grad


def reduce_grad_samples_by_patient(params: Sequence[nn.Parameter], patient_of_row: torch.Tensor,
                                   num_patients: int) -> None:
    """Replace each ``p.grad_sample`` (R, *p.shape) by its per-patient mean (P, *p.shape).

    Must run after ``backward`` and before the DP optimizer clips. A trainable parameter the forward
    pass did not use has a zero gradient for every patient.
    """
    identity = len(patient_of_row) == num_patients and bool(
        torch.equal(patient_of_row, torch.arange(num_patients)))
    counts = None
    for p in params:
        samples = getattr(p, "grad_sample", None)
        if samples is None:
            p.grad_sample = torch.zeros((num_patients, *p.shape), device=p.device, dtype=p.dtype)
            continue
        if isinstance(samples, list):
            samples = torch.cat(samples, dim=0)
        if identity:
            p.grad_sample = samples
            continue
        owners = patient_of_row.to(samples.device)
        if counts is None or counts.device != samples.device:
            counts = torch.bincount(owners, minlength=num_patients).clamp_min(1).to(samples.dtype)
        summed = torch.zeros((num_patients, *samples.shape[1:]), device=samples.device,
                             dtype=samples.dtype)
        summed.index_add_(0, owners, samples)
        p.grad_sample = summed / counts.view(-1, *([1] * (samples.dim() - 1)))


def zero_non_finite_patients(params: Sequence[nn.Parameter]) -> int:
    """Zero every patient's per-sample gradient row (``p.grad_sample`` (P, *p.shape), all
    parameters) that holds a NaN or an infinity in any parameter; returns how many were zeroed.

    Runs after :func:`reduce_grad_samples_by_patient` and before the DP optimizer clips, so a
    patient contributes either its clipped gradient or nothing: the sensitivity stays C.
    """
    finite = None
    for p in params:
        samples = getattr(p, "grad_sample", None)
        if samples is None or samples.shape[0] == 0:
            continue
        rows = torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)
        finite = rows if finite is None else finite & rows.to(finite.device)
    if finite is None or bool(finite.all()):
        return 0
    for p in params:
        samples = getattr(p, "grad_sample", None)
        if samples is not None and samples.shape[0]:
            keep = finite.to(samples.device).view(-1, *([1] * (samples.dim() - 1)))
            p.grad_sample = torch.where(keep, samples, torch.zeros((), dtype=samples.dtype,
                                                                   device=samples.device))
    return int((~finite).sum())


def backward_per_patient(module: AbstractGradSampleModule, optimizer: DPOptimizer, loss_fn: LossFn,
                         batch: Any, patient_of_row: torch.Tensor, num_patients: int,
                         mode: GradSampleMode) -> torch.Tensor:
    """Forward and backward one physical batch; leaves per-patient gradients for the optimizer.

    ``batch`` holds R rows; ``patient_of_row`` (R,) maps rows to patients 0..num_patients-1. Returns
    the detached per-row losses (R,).
    """
    try:
        losses = loss_fn(module, batch)
    except RuntimeError as err:
        if "BackwardHookFunction" in str(err) and "inplace" in str(err):
            raise DPSetupError("the model changes a layer's output in place (e.g. "
                               "ReLU(inplace=True) or x.add_()), which breaks Opacus' per-sample "
                               "gradient hooks; use the out-of-place operation") from None
        raise
    rows = len(patient_of_row)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (rows,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise DPSetupError(f"loss_fn must return one loss per row, shape ({rows},) (got {shape}); "
                           f"do not reduce over the batch")
    if mode == "ghost" and rows != num_patients:
        raise DPSetupError("grad_sample_mode 'ghost' clips rows, but a patient has several rows "
                           "(scans x noise_multiplicity); use hooks or functorch")
    with warnings.catch_warnings():
        # The first layer's input needs no gradient; Opacus' hooks still get the output gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if mode == "ghost":
            DPTensorFastGradientClipping(module, optimizer, losses, "sum").backward()
        else:
            losses.sum().backward()
    if mode != "ghost":
        reduce_grad_samples_by_patient(optimizer.params, patient_of_row, num_patients)
        zeroed = zero_non_finite_patients(optimizer.params)
        if zeroed:
            log.warning("%d sampled patient(s) had a non-finite gradient; their gradient is zero "
                        "in this step (the noisy sum stays finite)", zeroed)
    return losses.detach()


def empty_step_gradients(optimizer: DPOptimizer, mode: GradSampleMode) -> None:
    """Gradients for an empty Poisson batch: the step still happens and adds pure noise."""
    for p in optimizer.params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


class _PatientIndices(Dataset):
    """Patient j -> ``(tensor(j),)``: what Opacus' Poisson sampler draws from."""

    def __init__(self, num_patients: int):
        self.num_patients = num_patients

    def __len__(self) -> int:
        return self.num_patients

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (torch.tensor(index, dtype=torch.long),)


class _StepLimit:
    """Optimizer step hook: counts logical steps, steps Opacus' accountant, refuses extra steps.

    It runs after the noise is added and before the parameter update, so an extra step raises before
    any weight changes.
    """

    def __init__(self, limit: int, accountant_hook: Callable[[DPOptimizer], None]):
        self.limit = limit
        self.steps = 0
        self.accountant_hook = accountant_hook

    def __call__(self, optimizer: DPOptimizer) -> None:
        if self.steps >= self.limit:
            raise AccountingMismatch(f"step {self.steps + 1} in a round planned with {self.limit}")
        self.steps += 1
        self.accountant_hook(optimizer)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


class DPTrainer:
    """DP-SGD rounds of one site under its ledger-backed budget.

    ``scans`` is the site's scan-level dataset (items are collated with ``default_collate`` and
    given to ``loss_fn``); ``patients`` maps each patient id to its scans' indices in ``scans``
    (e.g. ``client.site_data.SiteDataset.patients``).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, scans: Dataset,
                 patients: Mapping[str, Sequence[int]], budget: SiteBudget, settings: DPSettings, *,
                 seed: int | None = None, optimizer_factory: OptimizerFactory | None = None):
        check_not_privatised(model)
        if settings.noise_multiplicity < 1:
            raise DPSetupError(f"noise_multiplicity must be >= 1 "
                               f"(got {settings.noise_multiplicity})")
        self.patient_rows = [list(rows) for rows in patients.values()]
        if not self.patient_rows or any(not rows for rows in self.patient_rows):
            raise DPSetupError("every patient needs at least one scan, and the site at least one "
                               "patient")
        if settings.grad_sample_mode == "ghost" and (
                settings.noise_multiplicity != 1 or any(len(r) != 1 for r in self.patient_rows)):
            raise DPSetupError("grad_sample_mode 'ghost' clips rows, so it needs one scan per "
                               "patient and noise_multiplicity 1; use hooks or functorch")
        self.model = model
        self.loss_fn = loss_fn
        self.scans = scans
        self.budget = budget
        self.settings = settings
        self.optimizer_factory = optimizer_factory
        device = next(model.parameters()).device
        self.sampling_generator = _generator(seed, torch.device("cpu"))
        self.noise_generator = _generator(None if seed is None else seed + 1, device)
        widest = max(len(rows) for rows in self.patient_rows) * settings.noise_multiplicity
        self.physical_patients = max(1, settings.max_physical_batch_size // widest)
        # The PrivacyEngine accountant of the last completed round: restored from the ledger, then
        # stepped by Opacus during the round (equal to the ledger's replay, checked before the
        # commit).
        self.accountant: IAccountant | None = None

    @property
    def num_patients(self) -> int:
        return len(self.patient_rows)

    def _check_plan(self, plan: PlanRecord) -> None:
        if plan.num_patients != self.num_patients or \
                plan.expected_batch_size != self.settings.expected_batch_size:
            raise PlanMismatch(f"{self.budget.path}: the plan samples {plan.expected_batch_size} "
                               f"of {plan.num_patients} patients, the trainer has "
                               f"{self.settings.expected_batch_size} of {self.num_patients}; open "
                               f"the budget with a plan built from this site's data and settings")

    def run_round(self, round: int) -> RoundResult:
        """Check the budget, train one round, commit it, then return its weights (module doc)."""
        before = weights_hash(self.model.state_dict())
        with self.budget.locked():
            state = self.budget.state()
            plan = self.budget.plan(state)
            self._check_plan(plan)
            resent = self._resend(round, before, state)
            if resent is not None:
                return resent
            self.budget.check(round, plan.steps_per_round, state)
            start = {name: tensor.detach().clone()
                     for name, tensor in self.model.state_dict().items()}
            try:
                weights = self._train(round, plan, state)
                bad = non_finite_tensors(weights)
                if bad:
                    raise NonFiniteWeights(
                        f"{self.budget.path}: round {round} produced non-finite weights "
                        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing is "
                        f"committed or sent - lower the learning rate or check the model")
                after = weights_hash(weights)
                write_outbox(outbox_path(self.budget.path),
                             OutboxItem(round, before, after, weights))
                record = self.budget.charge(round, model_hash_before=before, model_hash_after=after,
                                            steps=plan.steps_per_round)
            except BaseException:
                # Uncommitted weights must not be sendable: the model goes back to the round's
                # start.
                self.model.load_state_dict(start)
                raise
        return RoundResult(round, weights, record, resumed=False)

    def _resend(self, round: int, before: str, state: SiteLedgerState) -> RoundResult | None:
        last = state.rounds[-1] if state.rounds else None
        item = committed_weights(self.budget.path, round, before, last)
        if item is None:
            return None
        self.model.load_state_dict(item.weights)
        return RoundResult(round, item.weights, last, resumed=True)

    def _train(self, round: int, plan: PlanRecord,
               state: SiteLedgerState) -> dict[str, torch.Tensor]:
        settings, model = self.settings, self.model
        was_training = model.training
        flags = apply_trainable(model, settings.trainable)
        model.train()
        ema = ema_of(model, settings.ema_decay)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=plan.accountant)
        replay_accountant(state.rounds, plan.accountant, engine.accountant)
        module = optimizer = None
        try:
            module, optimizer = privatise(model, settings, plan.noise_multiplier,
                                          expected_batch_size=plan.expected_batch_size,
                                          noise_generator=self.noise_generator,
                                          optimizer_factory=self.optimizer_factory)
            accountant_hook = engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate)
            limit = _StepLimit(plan.steps_per_round, accountant_hook)
            optimizer.attach_step_hook(limit)
            loader = DPDataLoader(_PatientIndices(self.num_patients), sample_rate=plan.sample_rate,
                                  generator=self.sampling_generator)
            with tqdm(total=plan.steps_per_round, desc=f"round {round} DP-SGD", disable=None,
                      leave=False) as progress:
                for _ in range(plan.local_epochs):
                    self._epoch(module, optimizer, loader, limit, ema, progress)
            self._check_accounting(engine, state, plan, limit.steps)
            self.accountant = engine.accountant
        finally:
            if module is not None:
                release(module, optimizer)
            restore_trainable(model, flags)
            model.train(was_training)
        return released_weights(model, ema)

    def _epoch(self, module: AbstractGradSampleModule, optimizer: DPOptimizer, loader: DPDataLoader,
               limit: _StepLimit, ema: AveragedModel | None, progress: tqdm) -> None:
        """One epoch of Poisson-sampled logical batches, in physical batches of whole patients."""
        device = next(self.model.parameters()).device
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=self.physical_patients,
                                optimizer=optimizer) as physical_batches:
            for (patient_indices,) in physical_batches:
                self._physical_step(module, optimizer, patient_indices.tolist(), device)
                steps = limit.steps
                optimizer.step()  # clips and accumulates; noise and update at a logical batch's end
                optimizer.zero_grad(set_to_none=True)
                if limit.steps != steps:
                    progress.update(1)
                    if ema is not None:
                        ema.update_parameters(self.model)

    def _physical_step(self, module: AbstractGradSampleModule, optimizer: DPOptimizer,
                       patient_indices: list[int], device: torch.device) -> None:
        mode = self.settings.grad_sample_mode
        rows, patient_of_row = expand_patients(patient_indices, self.patient_rows,
                                               self.settings.noise_multiplicity)
        if not rows:
            empty_step_gradients(optimizer, mode)
            return
        batch = collate_rows(self.scans, rows, device)
        backward_per_patient(module, optimizer, self.loss_fn, batch, patient_of_row,
                             len(patient_indices), mode)

    def _check_accounting(self, engine: PrivacyEngine, state: SiteLedgerState, plan: PlanRecord,
                          steps: int) -> None:
        expected = merge_history(history_of(state.rounds) +
                                 [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)])
        observed = merge_history(engine.accountant.history)
        if steps != plan.steps_per_round or observed != expected:
            raise AccountingMismatch(f"{self.budget.path}: Opacus counted {observed} but the "
                                     f"ledger would hold {expected}; the round is not committed")
