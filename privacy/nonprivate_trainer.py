"""Non-private local training: the baseline a site may opt into (no DP-SGD, no Opacus).

Only for research and demo data, and only when the SITE allows it (``SiteConfig.allow_non_private``;
:mod:`client.site_runtime` checks). The weights it releases carry NO differential-privacy guarantee:
the site's epsilon is infinite from the first such round on.

The training is the DP path minus privacy, so a sweep compares like with like: the same loss
(``loss_fn(model, batch) -> Tensor (R,)``, one loss per row), the same trainable subset and EMA, and
the same objective per step (the mean over the step's patients of each patient's mean row loss,
each scan repeated ``noise_multiplicity`` times), optimised with plain ``torch.optim.Adam``. Each of
``local_epochs`` epochs visits every patient once, in shuffled batches of ``batch_size`` patients (the
last may be smaller): ``local_epochs x ceil(N / batch_size)`` steps per round. A step's patients are
split into forward passes of at most ``max_physical_batch_size`` rows (whole patients), and their
gradients accumulated.

Nothing leaves uncounted: like :class:`privacy.dp_trainer.DPTrainer`, the round is committed to the
site's hash-chained ledger (a ``non-private-round`` entry naming the hashes of the weights before and
after) BEFORE the weights are returned, the weights are kept in the outbox, and the same round asked
again from the same starting weights resends them instead of appending a second entry.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from privacy.local_training import collate_rows, ema_of, expand_patients, released_weights
from privacy.outbox import OutboxItem, committed_weights, outbox_path, weights_hash, write_outbox
from privacy.site_ledger import NonPrivateRoundRecord, SiteLedger, fedsynth_version, utc_timestamp
from privacy.trainable import apply_trainable, restore_trainable

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class NonPrivateSettings:
    """``batch_size`` in patients per step; ``max_physical_batch_size`` in rows per forward pass."""

    batch_size: int = 8
    local_epochs: int = 1
    learning_rate: float = 1e-4
    trainable: str = "all"
    ema_decay: float | None = None
    noise_multiplicity: int = 1
    max_physical_batch_size: int = 8

    @classmethod
    def from_config(cls, privacy: Mapping[str, Any], local_epochs: int) -> "NonPrivateSettings":
        """From the consortium's privacy section (a dict of ``PrivacyConfig`` fields): the same
        batch size, learning rate, trainable subset, EMA and multiplicity as a DP round would use."""
        return cls(batch_size=int(privacy["expected_batch_size"]), local_epochs=int(local_epochs),
                   learning_rate=float(privacy["learning_rate"]),
                   trainable=str(privacy.get("trainable", "all")),
                   ema_decay=privacy.get("ema_decay"),
                   noise_multiplicity=int(privacy.get("noise_multiplicity", 1)),
                   max_physical_batch_size=int(privacy.get("max_physical_batch_size", 8)))


@dataclass(frozen=True)
class NonPrivateResult:
    """A round's released weights (full CPU ``state_dict``, the EMA's with ``ema_decay``), its
    ledger entry, and whether they were resent from the outbox (nothing trained or recorded)."""

    round: int
    weights: dict[str, torch.Tensor]
    record: NonPrivateRoundRecord
    resumed: bool


class NonPrivateTrainer:
    """Non-private rounds of one site, each recorded in its ledger before the weights are returned.

    ``scans`` and ``patients`` as for :class:`privacy.dp_trainer.DPTrainer`: the scan-level dataset
    and each patient id's scan indices.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, scans: Dataset,
                 patients: Mapping[str, Sequence[int]], ledger: SiteLedger | Path | str,
                 settings: NonPrivateSettings, *, seed: int | None = None):
        self.patient_rows = [list(rows) for rows in patients.values()]
        if not self.patient_rows or any(not rows for rows in self.patient_rows):
            raise ValueError("every patient needs at least one scan, and the site at least one "
                             "patient")
        if settings.batch_size < 1 or settings.local_epochs < 1 or settings.noise_multiplicity < 1:
            raise ValueError(f"batch_size, local_epochs and noise_multiplicity must be >= 1 "
                             f"(got {settings})")
        self.model, self.loss_fn, self.scans, self.settings = model, loss_fn, scans, settings
        self.ledger = ledger if isinstance(ledger, SiteLedger) else SiteLedger(ledger)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        widest = max(len(rows) for rows in self.patient_rows) * settings.noise_multiplicity
        self.physical_patients = max(1, settings.max_physical_batch_size // widest)

    @property
    def num_patients(self) -> int:
        return len(self.patient_rows)

    @property
    def steps_per_round(self) -> int:
        return self.settings.local_epochs * math.ceil(self.num_patients / self.settings.batch_size)

    def run_round(self, round: int) -> NonPrivateResult:
        """Train one round, commit it to the ledger, then return its weights (module doc)."""
        before = weights_hash(self.model.state_dict())
        with self.ledger.locked():
            state = self.ledger.state()
            last = state.non_private[-1] if state.non_private else None
            item = committed_weights(self.ledger.path, round, before, last)
            if item is not None:
                self.model.load_state_dict(item.weights)
                return NonPrivateResult(round, item.weights, last, resumed=True)
            start = {name: tensor.detach().clone()
                     for name, tensor in self.model.state_dict().items()}
            try:
                weights, steps = self._train()
                after = weights_hash(weights)
                write_outbox(outbox_path(self.ledger.path), OutboxItem(round, before, after, weights))
                record = NonPrivateRoundRecord(
                    round=int(round), num_patients=self.num_patients,
                    batch_size=self.settings.batch_size, local_epochs=self.settings.local_epochs,
                    steps=steps, learning_rate=float(self.settings.learning_rate),
                    model_hash_before=before, model_hash_after=after, timestamp=utc_timestamp(),
                    fedsynth_version=fedsynth_version())
                self.ledger.append(record)
            except BaseException:
                # Unrecorded weights must not be sendable: the model goes back to the round's start.
                self.model.load_state_dict(start)
                raise
        log.warning("%s: round %d committed WITHOUT differential privacy (%d steps over %d "
                    "patients); this site's epsilon is infinite", self.ledger.path, round, steps,
                    self.num_patients)
        return NonPrivateResult(round, weights, record, resumed=False)

    def _train(self) -> tuple[dict[str, torch.Tensor], int]:
        settings, model = self.settings, self.model
        was_training = model.training
        flags = apply_trainable(model, settings.trainable)
        model.train()
        ema = ema_of(model, settings.ema_decay)
        steps = 0
        try:
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                         lr=settings.learning_rate)
            for _ in range(settings.local_epochs):
                order = torch.randperm(self.num_patients, generator=self.generator).tolist()
                for start in range(0, self.num_patients, settings.batch_size):
                    self._step(optimizer, order[start:start + settings.batch_size])
                    steps += 1
                    if ema is not None:
                        ema.update_parameters(model)
        finally:
            restore_trainable(model, flags)
            model.train(was_training)
        return released_weights(model, ema), steps

    def _step(self, optimizer: torch.optim.Optimizer, patients: list[int]) -> None:
        """One optimizer step on the mean over ``patients`` of each patient's mean row loss."""
        device = next(self.model.parameters()).device
        optimizer.zero_grad(set_to_none=True)
        for first in range(0, len(patients), self.physical_patients):
            chunk = patients[first:first + self.physical_patients]
            rows, patient_of_row = expand_patients(chunk, self.patient_rows,
                                                   self.settings.noise_multiplicity)
            losses = self.loss_fn(self.model, collate_rows(self.scans, rows, device))
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(rows),):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
                raise ValueError(f"loss_fn must return one loss per row, shape ({len(rows)},) "
                                 f"(got {shape}); do not reduce over the batch")
            owners = patient_of_row.to(losses.device)
            counts = torch.bincount(owners, minlength=len(chunk)).to(losses.dtype)
            per_patient = torch.zeros(len(chunk), device=losses.device, dtype=losses.dtype)
            per_patient = per_patient.index_add(0, owners, losses) / counts
            (per_patient.sum() / len(patients)).backward()
        optimizer.step()
