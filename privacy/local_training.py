"""Pieces both local trainers share (:mod:`privacy.dp_trainer` and :mod:`privacy.nonprivate_trainer`):
a batch of patients expanded to its rows, a collated batch on the device, the EMA of the weights,
and the weights a round returns. Plain torch (no Opacus, no Flower).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset, default_collate


def expand_patients(patient_indices: Sequence[int], patient_rows: Sequence[Sequence[int]],
                    multiplicity: int) -> tuple[list[int], torch.Tensor]:
    """Rows for the sampled patients: each patient's scans, each repeated ``multiplicity`` times.

    Returns the scan dataset index of every row and ``patient_of_row`` (R,) long, the position of
    the row's patient in ``patient_indices``.
    """
    rows: list[int] = []
    owners: list[int] = []
    for position, patient in enumerate(patient_indices):
        for scan in patient_rows[int(patient)]:
            rows.extend([int(scan)] * multiplicity)
            owners.extend([position] * multiplicity)
    return rows, torch.tensor(owners, dtype=torch.long)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, possibly in dicts, lists or tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def collate_rows(scans: Dataset, rows: Sequence[int], device: torch.device) -> Any:
    """The scans of ``rows`` collated with ``default_collate`` and moved to ``device``."""
    return to_device(default_collate([scans[i] for i in rows]), device)


def ema_of(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters, or None without a decay."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def released_weights(model: nn.Module, ema: AveragedModel | None) -> dict[str, torch.Tensor]:
    """The round's weights: the EMA copied into ``model`` when there is one (post-processing),
    then ``model``'s full state dict as detached CPU copies."""
    if ema is not None:
        with torch.no_grad():
            for target, averaged in zip(model.parameters(), ema.module.parameters()):
                target.copy_(averaged)
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
