"""Trivial generators every quality figure is shown next to (built from real pairs).

* **collapse** (:func:`collapse_baseline`): each training set's mean scan, repeated: a generator
  that learned only the average brain and ignores the map it is asked for.
* **copy** (:func:`copy_baseline`): for each conditioning map, the training scan whose own map is
  closest (fewest differing voxels): perfect fidelity, no privacy.

A generator is judged against the maps it was asked to follow, so both return the conditioning
maps they were given as their maps (conditional Dice and the utility segmenter's training pairs
use them). Pairing the mean scan with its own majority-vote map instead would score it as if it
had followed a request it ignored: on the demo cohort that pairing out-scored held-out real scans
on conditional Dice (0.683 against 0.670).

The two others, **real** (held-out real scans) and **pretrained only** (samples of the public
model), are real scans and model samples; the caller supplies them.
"""

from __future__ import annotations

import torch

from models.metrics.errors import MetricInputError


def _check(images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if images.ndim != 5 or images.shape != labels.shape or images.shape[0] == 0:
        raise MetricInputError(f"{name}: expected non-empty images and maps of one shape "
                               f"(N, 1, D, H, W), got {tuple(images.shape)} and "
                               f"{tuple(labels.shape)}")


def collapse_baseline(training_sets: list[tuple[torch.Tensor, torch.Tensor]],
                      condition_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume per map of ``condition_maps`` ``(M, 1, D, H, W)``, cycling through each
    training set's mean scan.

    ``training_sets``: (images ``(N, 1, D, H, W)``, class maps ``(N, 1, D, H, W)``) per site.
    Returns images ``(M, 1, D, H, W)`` float32 and the conditioning maps (a copy).
    """
    if not training_sets:
        raise MetricInputError("collapse baseline: no training set given; pass at least one")
    means = []
    for k, (images, labels) in enumerate(training_sets):
        _check(images, labels, f"collapse baseline set {k}")
        if condition_maps.shape[1:] != labels.shape[1:]:
            raise MetricInputError(f"collapse baseline: condition maps "
                                   f"{tuple(condition_maps.shape)} and set {k}'s maps "
                                   f"{tuple(labels.shape)} differ in shape")
        means.append(images.float().mean(0, keepdim=True))
    chosen = [means[i % len(means)] for i in range(condition_maps.shape[0])]
    return torch.cat(chosen), condition_maps.clone()


def copy_baseline(train_images: torch.Tensor, train_labels: torch.Tensor,
                  condition_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each map of ``condition_maps`` ``(M, 1, D, H, W)``, the training scan whose own map
    differs from it in the fewest voxels: images ``(M, 1, D, H, W)`` and the conditioning maps."""
    _check(train_images, train_labels, "copy baseline training set")
    if condition_maps.shape[1:] != train_labels.shape[1:]:
        raise MetricInputError(f"copy baseline: condition maps {tuple(condition_maps.shape)} and "
                               f"training maps {tuple(train_labels.shape)} differ in shape")
    flat_train = train_labels.flatten(1)
    nearest = torch.stack([(flat_train != m.flatten()).sum(1).argmin()
                           for m in condition_maps])
    return train_images[nearest].float(), condition_maps.clone()
