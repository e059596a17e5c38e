"""Two network-free figures of a set of (image, map) pairs: how sharp the images are, and how well
their intensities alone separate the tissues of their maps.

Neither needs a trained network, so neither inherits a segmenter's blind spots (the public
segmenter has seen only the public cohort's contrast):

* :func:`edge_sharpness`: the mean gradient magnitude (central differences, intensity per voxel)
  inside the brain, i.e. the map's foreground grown by one voxel so that the brain's outer edge
  counts. Blur lowers it; so does the absence of scanner noise, which real scans carry, so it is
  read next to real scans and the baselines, never alone.
* :func:`intensity_dice`: every voxel of an image gets the class whose mean intensity in that
  image (taken under the image's own map) is nearest to its own; the mean foreground Dice of
  that labelling against the map. It asks whether each tissue has its own intensity where the
  map puts it, whatever the contrast: a volume that ignores its map, or smears tissues across
  their boundaries, scores low. Partial volume and noise keep real scans below 1.

Images ``(N, 1, D, H, W)`` in [0, 1] (the data pipeline's normalisation); maps ``(N, 1, D, H, W)``
integer class indices, 0 the background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.metrics.errors import MetricInputError
from models.metrics.segmentation_utility import mean_foreground_dice


def _check(images: torch.Tensor, maps: torch.Tensor) -> None:
    if images.ndim != 5 or images.shape[1] != 1:
        raise MetricInputError(f"images must be (N, 1, D, H, W), got {tuple(images.shape)}")
    if maps.shape != images.shape:
        raise MetricInputError(f"maps {tuple(maps.shape)} do not match images "
                               f"{tuple(images.shape)}")


def brain_region(maps: torch.Tensor) -> torch.Tensor:
    """Bool (N, 1, D, H, W): the map's foreground grown by one voxel (3x3x3 max pooling)."""
    foreground = (maps > 0).float()
    return F.max_pool3d(foreground, kernel_size=3, stride=1, padding=1) > 0


def edge_sharpness(images: torch.Tensor, maps: torch.Tensor) -> float:
    """Mean over the set of each image's mean gradient magnitude inside its brain region."""
    _check(images, maps)
    x = images.float()
    # Central differences, zero at the volume's border (where the region rarely reaches).
    gradients = [torch.zeros_like(x) for _ in range(3)]
    gradients[0][:, :, 1:-1] = (x[:, :, 2:] - x[:, :, :-2]) / 2
    gradients[1][:, :, :, 1:-1] = (x[:, :, :, 2:] - x[:, :, :, :-2]) / 2
    gradients[2][..., 1:-1] = (x[..., 2:] - x[..., :-2]) / 2
    magnitude = torch.sqrt(sum(g * g for g in gradients))
    region = brain_region(maps)
    per_image = [(magnitude[i][region[i]].mean() if region[i].any() else magnitude[i].mean())
                 for i in range(x.shape[0])]
    return float(torch.stack(per_image).mean())


def nearest_mean_labels(image: torch.Tensor, classes: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """(D, H, W) image and class map -> the map that puts every voxel in the class whose mean
    intensity (under ``classes``) is nearest; classes absent from the map are never chosen."""
    means = torch.full((num_classes,), float("inf"))
    for c in range(num_classes):
        inside = classes == c
        if inside.any():
            means[c] = image[inside].mean()
    distance = (image.unsqueeze(-1) - means).abs()
    return distance.argmin(-1)


def intensity_dice(images: torch.Tensor, maps: torch.Tensor, num_classes: int) -> float:
    """Foreground Dice of each image's nearest-mean labelling (:func:`nearest_mean_labels`)
    against its map, averaged as :func:`mean_foreground_dice` (conditional Dice's average)."""
    _check(images, maps)
    predicted = torch.stack([nearest_mean_labels(image, classes, num_classes)
                             for image, classes in zip(images[:, 0].float(), maps[:, 0].long())])
    return mean_foreground_dice(predicted[:, None], maps.long(), num_classes)
