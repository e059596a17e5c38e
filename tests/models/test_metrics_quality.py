"""Known answers of the headline metrics: KID, the public segmenter, baselines, the report."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import (BASELINES, KID, SegmenterSettings, collapse_baseline,
                            conditional_dice, copy_baseline, evaluate_quality,
                            kernel_inception_distance, mean_foreground_dice, public_segmenter,
                            segmenter_dice, segmenter_features)
from models.metrics.public_segmenter import encoder_stages
from tests.models.test_metrics_segmentation import NUM_CLASSES, brains

FAST = SegmenterSettings(max_steps=60, eval_every=20, patience=2)


def varied_brains(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`brains` moved by up to 3 voxels along each axis: their mean scan is a blur that
    no single scan looks like (what makes a collapsed generator detectable)."""
    images, labels = brains(count, seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    shifts = torch.randint(-3, 4, (count, 3), generator=generator).tolist()
    moved = [(i.roll(s, dims=(1, 2, 3)), m.roll(s, dims=(1, 2, 3)))
             for i, m, s in zip(images, labels, shifts)]
    return torch.stack([m[0] for m in moved]), torch.stack([m[1] for m in moved])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    torch.set_num_threads(1)
    images, labels = varied_brains(10, seed=11)
    return public_segmenter(images, labels, NUM_CLASSES, tmp_path_factory.mktemp("cache"),
                            seed=0, settings=FAST)


def test_kid_of_a_set_against_itself_is_about_zero_and_a_shifted_set_is_not():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 16, generator=generator)
    other = torch.randn(60, 16, generator=generator)
    same = kernel_inception_distance(real, real.clone(), subsets=50, subset_size=30)
    sampled = kernel_inception_distance(real, other, subsets=50, subset_size=30)
    shifted = kernel_inception_distance(real, other + 1.0, subsets=50, subset_size=30)
    assert isinstance(same, KID) and same.subset_size == 30
    # Unbiased: another draw of the same distribution scores ~0. The set against itself is
    # slightly negative (a vector in both subsets adds its self-similarity to the cross term).
    assert abs(sampled.mean) < sampled.std and -0.1 * shifted.mean < same.mean <= 0
    assert shifted.mean > 10 * max(abs(sampled.mean), sampled.std)
    assert kernel_inception_distance(real, other, seed=3) == kernel_inception_distance(
        real, other, seed=3)


def test_kid_matches_the_unbiased_formula_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 2.0]])

    def k(a, b):
        return (float(a @ b) / 2 + 1) ** 3

    m = 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    kid = kernel_inception_distance(x, y, subsets=5, subset_size=3)  # the whole sets each time
    assert kid.mean == pytest.approx(xx + yy - 2 * xy) and kid.std == pytest.approx(0.0)


def test_public_segmenter_is_cached_hashed_and_beats_chance(segmenter, tmp_path):
    images, labels = varied_brains(10, seed=11)
    again = public_segmenter(images, labels, NUM_CLASSES, tmp_path, seed=0, settings=FAST)
    assert not segmenter.cached and len(segmenter.sha256) == 64
    assert not again.cached  # another cache folder: trained again, deterministically
    assert again.sha256 == segmenter.sha256
    cached = public_segmenter(images, labels, NUM_CLASSES, tmp_path, seed=0, settings=FAST)
    assert cached.cached and cached.sha256 == segmenter.sha256
    test_images, test_labels = varied_brains(4, seed=12)
    chance = mean_foreground_dice(torch.randint(0, NUM_CLASSES, test_labels.shape,
                                                generator=torch.Generator().manual_seed(0)),
                                  test_labels, NUM_CLASSES)
    dice = conditional_dice(segmenter, test_images, test_labels, NUM_CLASSES)
    assert dice > 0.8 > chance + 0.3
    features = segmenter_features(segmenter, test_images)
    widths = sum(stage.out_channels if hasattr(stage, "out_channels") else 0
                 for stage in encoder_stages(segmenter.net))
    assert features.shape == (4, widths) == (4, 16 + 32 + 64 + 128)


def test_real_trained_segmenter_beats_chance_on_held_out_pairs():
    train, test = brains(8, seed=13), brains(4, seed=14)
    dice = segmenter_dice(*train, *test, NUM_CLASSES, seed=0, settings=FAST)
    chance = mean_foreground_dice(torch.zeros_like(test[1]) + 1, test[1], NUM_CLASSES)
    assert dice > 0.8 and dice > chance + 0.3


def test_baselines_collapse_loses_and_copy_wins_on_fidelity(segmenter):
    training = varied_brains(16, seed=20)
    reference, real_half = varied_brains(12, seed=21), varied_brains(10, seed=22)
    conditions = varied_brains(10, seed=23)[1]
    noise = (torch.rand(10, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)),
             conditions)
    baselines = {"real": real_half, "collapse": collapse_baseline([training], conditions),
                 "copy": copy_baseline(*training, conditions), "pretrained_only": None}
    report = evaluate_quality(noise, reference, baselines, segmenter, NUM_CLASSES, seed=0,
                              seg_settings=FAST)
    real, collapse, copy = (report.baselines[n] for n in ("real", "collapse", "copy"))
    assert report.baselines["pretrained_only"] is None
    assert collapse.ms_ssim_diversity < 1e-6 < real.ms_ssim_diversity  # one set: one mean
    assert collapse.conditional_dice < real.conditional_dice
    assert copy.kid < collapse.kid and copy.kid < report.synthetic.kid  # noise as the "model"
    assert copy.conditional_dice > collapse.conditional_dice
    assert copy.conditional_dice > report.synthetic.conditional_dice
    assert report.synthetic.utility_dice < real.utility_dice
    # Network-free: the mean scan and uniform noise follow the maps worse than real scans.
    assert collapse.intensity_dice < real.intensity_dice
    assert report.synthetic.intensity_dice < real.intensity_dice
    json = report.to_json_dict()
    assert json["metrics"]["sharpness_ratio"] == pytest.approx(
        report.synthetic.sharpness / real.sharpness)
    assert set(json["baselines"]) == set(BASELINES)
    assert json["bars"]["beats_collapse_kid"] is (report.synthetic.kid < collapse.kid)
    assert json["metrics"]["utility_dice_ratio"] == pytest.approx(
        report.synthetic.utility_dice / real.utility_dice)
    assert math.isfinite(json["metrics"]["kid"])


def test_copy_returns_the_training_pair_with_the_closest_map():
    images, labels = varied_brains(5, seed=30)
    picked_images, picked_labels = copy_baseline(images, labels, labels[[3, 1]])
    assert torch.equal(picked_labels, labels[[3, 1]])
    for image, label in zip(picked_images, picked_labels):  # a training pair, image with its map
        assert any(torch.equal(image, i) and torch.equal(label, m) for i, m in zip(images, labels))
    nearly = labels[[2]].clone()
    nearly[0, 0, 0, 0, :3] = 3  # three voxels off: still closest to pair 2
    near_image, near_map = copy_baseline(images, labels, nearly)
    assert torch.equal(near_image, images[[2]].float())
    assert torch.equal(near_map, nearly)  # judged against the map it was asked for


def test_collapse_repeats_each_mean_scan_against_the_requested_maps():
    images, labels = varied_brains(5, seed=30)
    requested = varied_brains(5, seed=31)[1]
    collapsed, maps = collapse_baseline([(images, labels), (images[:2], labels[:2])], requested)
    assert torch.allclose(collapsed[0], images.mean(0)) and torch.equal(collapsed[0], collapsed[2])
    assert torch.allclose(collapsed[1], images[:2].mean(0))
    assert collapsed.shape == (5, 1, 16, 16, 16) and torch.equal(maps, requested)
