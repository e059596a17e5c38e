"""Known answers of the network-free figures: intensity Dice and sharpness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.metrics import MetricInputError, edge_sharpness, intensity_dice
from models.metrics.map_contrast import brain_region, nearest_mean_labels
from tests.models.test_metrics_segmentation import NUM_CLASSES, brains


def blurred(images: torch.Tensor) -> torch.Tensor:
    """A 5^3 box blur: tissues smeared across their boundaries (an autoencoder's blur)."""
    return F.avg_pool3d(images, kernel_size=5, stride=1, padding=2, count_include_pad=False)


def test_piecewise_constant_tissues_score_one_and_follow_the_contrast_whatever_it_is():
    _, labels = brains(3, seed=0)
    for intensities in ([0.0, 0.3, 0.6, 0.9], [0.0, 0.9, 0.2, 0.5]):   # any order of tissues
        images = torch.tensor(intensities)[labels.long()]
        assert intensity_dice(images, labels, NUM_CLASSES) == pytest.approx(1.0)


def test_an_image_that_ignores_its_map_or_is_blurred_scores_lower():
    images, labels = brains(4, seed=1)
    noisy = intensity_dice(images, labels, NUM_CLASSES)
    other_maps = labels.roll(1, dims=0)          # each image scored against another brain's map
    smeared = blurred(images)
    assert 0.8 < noisy < 1.0
    assert intensity_dice(images, other_maps, NUM_CLASSES) < noisy
    assert intensity_dice(smeared, labels, NUM_CLASSES) < noisy
    # The mean scan of a set (a collapsed generator) against each scan's own map.
    mean = images.mean(0, keepdim=True).expand_as(images)
    assert intensity_dice(mean, labels, NUM_CLASSES) < noisy


def test_nearest_mean_labels_never_choose_a_class_absent_from_the_map():
    image = torch.tensor([0.0, 0.1, 0.9, 1.0]).reshape(1, 1, 4)
    classes = torch.tensor([0, 0, 3, 3]).reshape(1, 1, 4)
    assert nearest_mean_labels(image, classes, NUM_CLASSES).flatten().tolist() == [0, 0, 3, 3]


def test_sharpness_is_zero_for_a_constant_image_and_falls_with_blur():
    images, labels = brains(3, seed=2)
    assert edge_sharpness(torch.full_like(images, 0.5), labels) == 0.0
    sharp = edge_sharpness(images, labels)
    assert 0 < edge_sharpness(blurred(images), labels) < sharp
    region = brain_region(labels)
    assert region.sum() > (labels > 0).sum()          # grown by one voxel past the brain's edge


def test_mismatched_inputs_are_refused_with_one_line():
    images, labels = brains(2, seed=3)
    with pytest.raises(MetricInputError, match="do not match"):
        intensity_dice(images, labels[:, :, :8], NUM_CLASSES)
    with pytest.raises(MetricInputError, match=r"\(N, 1, D, H, W\)"):
        edge_sharpness(images[:, 0], labels[:, 0])
