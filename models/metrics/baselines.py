"""Trivial generators every quality figure is shown next to (built from real pairs).

* **collapse** (:func:`collapse_baseline`): each training set's mean scan, with its majority-vote
  map, repeated: a generator that learned only the average brain.
* **copy** (:func:`copy_baseline`): for each conditioning map, the training scan whose own map is
  closest (fewest differing voxels), returned with that map: perfect fidelity, no privacy.

The two others, **real** (held-out real scans) and **pretrained only** (samples of the public
model), are real scans and model samples; the caller supplies them.
"""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot

from models.metrics.errors import MetricInputError


def _check(images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if images.ndim != 5 or images.shape != labels.shape or images.shape[0] == 0:
        raise MetricInputError(f"{name}: expected non-empty images and maps of one shape "
                               f"(N, 1, D, H, W), got {tuple(images.shape)} and "
                               f"{tuple(labels.shape)}")


def collapse_baseline(training_sets: list[tuple[torch.Tensor, torch.Tensor]], count: int,
                      num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` volumes cycling through each training set's mean scan.

    ``training_sets``: (images ``(N, 1, D, H, W)``, class maps ``(N, 1, D, H, W)``) per site.
    Returns images ``(count, 1, D, H, W)`` float32 and maps ``(count, 1, D, H, W)`` uint8 (the
    voxel-wise majority class of the set's maps).
    """
    if not training_sets:
        raise MetricInputError("collapse baseline: no training set given; pass at least one")
    means = []
    for k, (images, labels) in enumerate(training_sets):
        _check(images, labels, f"collapse baseline set {k}")
        votes = one_hot(labels.long(), num_classes, dim=1).sum(0, keepdim=True)
        means.append((images.float().mean(0, keepdim=True),
                      votes.argmax(1, keepdim=True).to(torch.uint8)))
    chosen = [means[i % len(means)] for i in range(count)]
    return torch.cat([c[0] for c in chosen]), torch.cat([c[1] for c in chosen])


def copy_baseline(train_images: torch.Tensor, train_labels: torch.Tensor,
                  condition_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each map of ``condition_maps`` ``(M, 1, D, H, W)``, the training pair whose map
    differs from it in the fewest voxels: images ``(M, 1, D, H, W)`` and their own maps."""
    _check(train_images, train_labels, "copy baseline training set")
    if condition_maps.shape[1:] != train_labels.shape[1:]:
        raise MetricInputError(f"copy baseline: condition maps {tuple(condition_maps.shape)} and "
                               f"training maps {tuple(train_labels.shape)} differ in shape")
    flat_train = train_labels.flatten(1)
    nearest = torch.stack([(flat_train != m.flatten()).sum(1).argmin()
                           for m in condition_maps])
    return train_images[nearest].float(), train_labels[nearest].clone()
