"""Segmentation utility: Dice, the seeded segmenter, synthetic-versus-real training."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import (MetricInputError, SegmentationUtility, SegmenterSettings,
                            build_segmenter, mean_foreground_dice, segmentation_utility,
                            train_segmenter)

NUM_CLASSES = 4
SHORT = SegmenterSettings(max_steps=3, eval_every=1, patience=10)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brains(count: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested shells (classes 1..3 inside background 0) of random size, the image a noisy
    intensity per class. Images float ``(count, 1, size^3)``, labels uint8, same shape."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = (z ** 2 + y ** 2 + x ** 2).sqrt()
    images, labels = [], []
    for _ in range(count):
        scale = 0.75 + 0.2 * torch.rand(1, generator=generator)
        label = torch.zeros(size, size, size, dtype=torch.uint8)
        for cls, r in ((1, 0.95), (2, 0.7), (3, 0.4)):
            label[radius < r * scale] = cls
        image = torch.tensor([0.0, 0.3, 0.6, 0.9])[label.long()]
        images.append(image + 0.05 * torch.randn(size, size, size, generator=generator))
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


def test_dice_of_a_perfect_segmentation_is_one_and_of_a_wrong_one_less():
    _, labels = brains(3, seed=0)
    assert mean_foreground_dice(labels, labels.clone(), NUM_CLASSES) == pytest.approx(1.0)
    wrong = labels.clone()
    wrong[wrong == 3] = 2  # the inner class is called its neighbour
    partly = mean_foreground_dice(wrong, labels, NUM_CLASSES)
    assert 0.0 < partly < 1.0
    assert mean_foreground_dice(torch.zeros_like(labels), labels, NUM_CLASSES) == 0.0


def test_dice_refuses_targets_without_foreground_and_mismatched_shapes():
    empty = torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8)
    with pytest.raises(MetricInputError, match="no foreground"):
        mean_foreground_dice(empty, empty, NUM_CLASSES)
    with pytest.raises(MetricInputError, match="differ"):
        mean_foreground_dice(empty, torch.zeros(2, 1, 8, 8, 4, dtype=torch.uint8), NUM_CLASSES)


def test_segmenter_build_and_training_are_deterministic_for_a_seed():
    assert all(torch.equal(a, b) for a, b in zip(build_segmenter(NUM_CLASSES, 3).parameters(),
                                                 build_segmenter(NUM_CLASSES, 3).parameters()))
    images, labels = brains(4, seed=1)
    first = train_segmenter(images, labels, NUM_CLASSES, seed=5, settings=SHORT)
    second = train_segmenter(images, labels, NUM_CLASSES, seed=5, settings=SHORT)
    other = train_segmenter(images, labels, NUM_CLASSES, seed=6, settings=SHORT)
    assert not first.net.training and first.steps == 3 and 1 <= first.best_step <= 3
    assert all(torch.equal(a, b) for a, b in zip(first.net.parameters(), second.net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(first.net.parameters(),
                                                     other.net.parameters()))


def test_training_stops_early_and_keeps_the_best_validation_weights():
    images, labels = brains(4, seed=1)
    patient = SegmenterSettings(max_steps=200, eval_every=1, patience=2, learning_rate=0.0)
    trained = train_segmenter(images, labels, NUM_CLASSES, seed=0, settings=patient)
    assert trained.steps == 3 and trained.best_step == 1  # nothing improves without learning


def test_training_refuses_unpaired_images_and_labels():
    images, labels = brains(2, seed=0)
    with pytest.raises(MetricInputError, match="do not match"):
        train_segmenter(images, labels[:1], NUM_CLASSES, seed=0, settings=SHORT)
    with pytest.raises(MetricInputError, match="max_steps must be >= 1"):
        train_segmenter(images, labels, NUM_CLASSES, seed=0,
                        settings=SegmenterSettings(max_steps=0))
    with pytest.raises(MetricInputError, match="at least 2"):
        train_segmenter(images[:1], labels[:1], NUM_CLASSES, seed=0, settings=SHORT)


def test_segmentation_utility_end_to_end_is_finite_with_the_ratio_of_the_dices():
    synthetic, real, heldout = brains(4, seed=1), brains(4, seed=2), brains(3, seed=3)
    settings = SegmenterSettings(max_steps=25, eval_every=5)
    utility = segmentation_utility(*synthetic, *real, *heldout, NUM_CLASSES, seed=0,
                                   settings=settings)
    assert isinstance(utility, SegmentationUtility)
    assert 0.0 < utility.dice_synthetic <= 1.0 and 0.0 < utility.dice_real <= 1.0
    assert utility.dice_ratio == pytest.approx(utility.dice_synthetic / utility.dice_real)
    assert math.isfinite(utility.dice_ratio)
    # same seed, same data: the same numbers
    again = segmentation_utility(*synthetic, *real, *heldout, NUM_CLASSES, seed=0,
                                 settings=settings)
    assert again == utility


def test_the_ratio_is_nan_when_the_real_segmenter_scores_zero():
    assert math.isnan(SegmentationUtility(dice_synthetic=0.5, dice_real=0.0).dice_ratio)


def test_bf16_training_learns_the_shells_and_keeps_fp32_weights_and_predictions():
    images, labels = brains(6, seed=4)
    test_images, test_labels = brains(3, seed=5)
    settings = SegmenterSettings(max_steps=40, eval_every=10, bf16_training=True)
    trained = train_segmenter(images, labels, NUM_CLASSES, seed=0, settings=settings)
    assert all(p.dtype == torch.float32 for p in trained.net.parameters())
    from models.metrics.segmentation_utility import predict_labels
    predicted = predict_labels(trained.net, test_images)
    assert predicted.dtype == torch.int64
    assert mean_foreground_dice(predicted, test_labels, NUM_CLASSES) > 0.5
    assert settings.to_json_dict()["bf16_training"] is True   # part of the public cache key


def test_native_bf16_is_a_yes_or_no_for_every_device():
    from models.device import native_bf16
    assert native_bf16("cpu") in (True, False)
    assert native_bf16("cuda") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_the_segmenter_adds_its_transposed_convolutions_bias_after_and_computes_monai_s_unet():
    from monai.networks.nets import UNet

    from models.metrics.segmentation_utility import BiasAfterConvTranspose3d

    net = build_segmenter(NUM_CLASSES, seed=3)
    up = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert up and all(type(m) is BiasAfterConvTranspose3d and m.bias is not None for m in up)
    settings = SegmenterSettings()
    monai = UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                 channels=settings.channels, strides=settings.strides,
                 num_res_units=settings.res_units)
    monai.load_state_dict(net.state_dict())  # the same parameters, under the same names
    images, labels = brains(2, seed=4)
    ours, theirs = net(images), monai(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy
    loss(ours, labels[:, 0].long()).backward()
    loss(theirs, labels[:, 0].long()).backward()
    for (name, mine), reference in zip(net.named_parameters(), monai.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
