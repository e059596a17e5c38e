"""The segmenter behind every Dice figure, trained to convergence, and the utility protocol.

One architecture serves three measurements: the public segmenter (conditional Dice and the
KID features, :mod:`models.metrics.public_segmenter`) and the utility segmenters (Med-DDPM
protocol: train on a set of (image, map) pairs, score on held-out real pairs).

The network is a MONAI :class:`~monai.networks.nets.UNet` (instance norm, so small batches are
fine; measured 3-4x cheaper per step on the CPU than a SegResNet of similar depth):
``(N, 1, D, H, W)`` -> logits ``(N, num_classes, D, H, W)``; sides divisible by 8.
Training (:func:`train_segmenter`) holds out a validation part of its own training pairs,
scores it every ``eval_every`` steps, keeps the best weights and stops after ``patience``
scores without improvement (or at ``max_steps``). Augmentation: a random left-right flip (the
first axis of the RAS-oriented volumes; the same flip for image and map) and a random intensity
scale/shift. Flipping the other axes too turns brains upside down and costs the segmenter the
location prior of aligned brains: on the demo cohort, 250 steps, held-out Dice 0.616 with flips
along every axis against 0.641 with left-right flips only.

Label maps are class indices ``(N, 1, D, H, W)`` (integers in ``0..num_classes-1``,
0 = background), not one-hot, to keep large sets small in memory.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from torch import nn
from tqdm.auto import tqdm

from models.device import autocast
from models.metrics.errors import MetricInputError

log = logging.getLogger(__name__)

# The left-right axis of (N, C, D, H, W) volumes in RAS orientation (models.data.site_data).
LEFT_RIGHT_DIM = 2


@dataclass(frozen=True)
class SegmenterSettings:
    """Architecture and training budget of a segmenter (part of the public segmenter's cache key).

    channels / strides: UNet widths per level and the stride into each (a first stride of 1
    keeps a full-resolution level, which thin 32^3 structures need); res_units: residual
    units per level.
    max_steps: Adam steps at most; eval_every / patience: early stopping on the validation
    Dice; val_fraction: the share of the training pairs held out for it (at least 1 pair).
    bf16_training: the training forward passes under bf16 autocast (loss, weights and every
    prediction stay fp32). Measured on the demo's held-out patients, 250 steps, on a 2-core CPU
    with AVX512-BF16: real-trained Dice 0.7653 in 29 s against 0.7631 in 51 s in fp32.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)
    res_units: int = 1
    learning_rate: float = 3e-3
    batch_size: int = 4
    max_steps: int = 400
    eval_every: int = 25
    patience: int = 4
    val_fraction: float = 0.2
    augment: bool = True
    bf16_training: bool = False

    def to_json_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels),
                "strides": list(self.strides)}


@dataclass(frozen=True)
class TrainedSegmenter:
    """A trained segmenter (eval mode, frozen) and how its training went."""

    net: nn.Module
    steps: int
    best_step: int
    validation_dice: float


@dataclass(frozen=True)
class SegmentationUtility:
    """Held-out real Dice of the segmenter trained on synthetic and on real data."""

    dice_synthetic: float
    dice_real: float

    @property
    def dice_ratio(self) -> float:
        """``dice_synthetic / dice_real``; NaN when the real-trained segmenter scores 0."""
        return self.dice_synthetic / self.dice_real if self.dice_real > 0 else math.nan


class BiasAfterConvTranspose3d(nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` that adds its bias after the convolution: the same
    function and the same parameters, because PyTorch's CPU transposed convolution with a fused
    bias is about 3x slower than without one. Measured 2026-12-03 (torch 2.13, one thread, batch
    4, 32^3, bf16): the segmenter's top up-convolution (32 -> 4 channels) 65 ms with the bias,
    21 ms without; ``experiments/benchmarks/segmenter_step.py`` times whole training steps.
    """

    def forward(self, input: torch.Tensor,  # noqa: A002 - the signature of ConvTranspose3d
                output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 3, self.dilation)
        output = nn.functional.conv_transpose3d(input, self.weight, None, self.stride,
                                                self.padding, output_padding, self.groups,
                                                self.dilation)
        if self.bias is None:
            return output
        return output + self.bias.to(output.dtype).view(1, -1, 1, 1, 1)


def build_segmenter(num_classes: int, seed: int,
                    settings: SegmenterSettings = SegmenterSettings()) -> UNet:
    """A 3D MONAI UNet ``(N, 1, D, H, W)`` -> logits ``(N, num_classes, D, H, W)``.

    Initialised under ``seed`` on the CPU without touching the caller's random state, so every
    build with one seed starts from the same weights. Its transposed convolutions are
    :class:`BiasAfterConvTranspose3d` (same state dict as MONAI's).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes,
                   channels=settings.channels, strides=settings.strides,
                   num_res_units=settings.res_units)
    for module in net.modules():
        if type(module) is nn.ConvTranspose3d:
            module.__class__ = BiasAfterConvTranspose3d
    return net


def _check_pairs(images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if images.ndim != 5 or images.shape[1] != 1:
        raise MetricInputError(f"{name}: expected images of shape (N, 1, D, H, W), got "
                               f"{tuple(images.shape)}; pass single-channel 3D volumes")
    if labels.shape != images.shape:
        raise MetricInputError(f"{name}: label maps {tuple(labels.shape)} do not match images "
                               f"{tuple(images.shape)}; pass one (N, 1, D, H, W) class map "
                               f"per image")
    if images.shape[0] == 0:
        raise MetricInputError(f"{name}: no (image, label) pairs; add some")


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices: seeded reshuffles of ``range(count)``, one after another."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _augment(images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random left-right flip (same for image and map) and intensity scale/shift, per batch."""
    if torch.rand(1, generator=generator).item() < 0.5:
        images, labels = images.flip([LEFT_RIGHT_DIM]), labels.flip([LEFT_RIGHT_DIM])
    scale = 1.0 + 0.2 * (torch.rand(images.shape[0], 1, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(images.shape[0], 1, 1, 1, 1, generator=generator) - 0.5)
    return images * scale.to(images.device) + shift.to(images.device), labels


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                    settings: SegmenterSettings = SegmenterSettings(),
                    device: torch.device | str = "cpu",
                    description: str = "segmenter") -> TrainedSegmenter:
    """Train :func:`build_segmenter` on ``images`` ``(N, 1, D, H, W)`` and class maps ``labels``
    ``(N, 1, D, H, W)`` to convergence (module docstring); N >= 2 (one pair validates).

    Deterministic for a given ``seed`` on a given device: the split, the initial weights, the
    batch order and the augmentation all come from it. Returns the best-validation weights,
    frozen, in eval mode.
    """
    _check_pairs(images, labels, description)
    if images.shape[0] < 2:
        raise MetricInputError(f"{description}: {images.shape[0]} pair(s); training needs at "
                               f"least 2 (one is held out for early stopping); add pairs")
    if settings.max_steps < 1:
        raise MetricInputError(f"{description}: max_steps must be >= 1 (got "
                               f"{settings.max_steps}); give the segmenter a training budget")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    val_count = min(max(1, round(settings.val_fraction * images.shape[0])), images.shape[0] - 1)
    val_idx, train_idx = order[:val_count], order[val_count:]
    train_images, train_labels = images[train_idx], labels[train_idx]
    net = build_segmenter(num_classes, seed, settings).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.max_steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batches = _batches(len(train_idx), min(settings.batch_size, len(train_idx)), generator)
    best_dice, best_step, best_state, waited = -1.0, 0, None, 0
    progress = tqdm(range(1, settings.max_steps + 1), desc=description, unit="step",
                    disable=None, leave=False)
    step = 0
    for step in progress:
        net.train()
        index = next(batches)
        batch_images = train_images[index].to(device=device, dtype=torch.float32)
        batch_labels = train_labels[index].to(device=device, dtype=torch.long)
        if settings.augment:
            batch_images, batch_labels = _augment(batch_images, batch_labels, generator)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, "bf16" if settings.bf16_training else "fp32"):
            logits = net(batch_images)
        loss = loss_fn(logits.float(), batch_labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % settings.eval_every and step != settings.max_steps:
            continue
        net.eval()
        dice = mean_foreground_dice(predict_labels(net, images[val_idx]), labels[val_idx],
                                    num_classes, empty_ok=True)
        progress.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{dice:.3f}")
        if dice > best_dice:
            best_dice, best_step, waited = dice, step, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            waited += 1
            if waited >= settings.patience:
                break
    net.load_state_dict(best_state)
    log.info("%s: best validation Dice %.4f at step %d of %d", description, best_dice,
             best_step, step)
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return TrainedSegmenter(net=net, steps=step, best_step=best_step, validation_dice=best_dice)


@torch.no_grad()
def predict_labels(net: nn.Module, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Class map ``(N, 1, D, H, W)`` (int64, CPU) of ``net`` on ``images`` ``(N, 1, D, H, W)``."""
    device = next(net.parameters()).device
    maps = [net(images[start:start + batch_size].to(device=device, dtype=torch.float32))
            .argmax(dim=1, keepdim=True).cpu()
            for start in range(0, images.shape[0], batch_size)]
    return torch.cat(maps)


def mean_foreground_dice(predicted: torch.Tensor, target: torch.Tensor, num_classes: int,
                         empty_ok: bool = False) -> float:
    """Dice of class maps ``predicted`` against ``target`` (both ``(N, 1, D, H, W)``), averaged
    over images and foreground classes (background, class 0, excluded).

    A class absent from an image's target does not count for that image (MONAI's
    ``ignore_empty``); a target with no foreground at all is refused (0 with ``empty_ok``).
    """
    if predicted.shape != target.shape:
        raise MetricInputError(f"dice: prediction {tuple(predicted.shape)} and target "
                               f"{tuple(target.shape)} differ; pass maps of one shape")
    metric = DiceMetric(include_background=False, reduction="mean", num_classes=num_classes,
                        get_not_nans=True)
    metric(predicted, target)
    dice, counted = metric.aggregate()
    if float(counted) == 0:
        if empty_ok:
            return 0.0
        raise MetricInputError("dice: the target maps hold no foreground class; "
                               "score on label maps with labelled structures")
    return float(dice)


def segmenter_dice(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, seed: int = 0,
                   settings: SegmenterSettings = SegmenterSettings(),
                   device: torch.device | str = "cpu", description: str = "segmenter") -> float:
    """Dice on ``test_*`` of a segmenter trained to convergence on ``images``/``labels``."""
    _check_pairs(test_images, test_labels, f"{description} test")
    trained = train_segmenter(images, labels, num_classes, seed, settings, device, description)
    return mean_foreground_dice(predict_labels(trained.net, test_images), test_labels,
                                num_classes)


def segmentation_utility(synthetic_images: torch.Tensor, synthetic_labels: torch.Tensor,
                         real_images: torch.Tensor, real_labels: torch.Tensor,
                         heldout_images: torch.Tensor, heldout_labels: torch.Tensor,
                         num_classes: int, seed: int = 0,
                         settings: SegmenterSettings = SegmenterSettings(),
                         device: torch.device | str = "cpu") -> SegmentationUtility:
    """Train the same segmenter on synthetic and on real pairs, score both on held-out real pairs.

    All images ``(N, 1, D, H, W)``, all label maps ``(N, 1, D, H, W)`` class indices. The
    held-out pairs must come from patients absent from ``real_images`` (the caller splits
    by patient).
    """
    scores = {name: segmenter_dice(images, labels, heldout_images, heldout_labels, num_classes,
                                   seed, settings, device, f"segmenter on {name}")
              for name, images, labels in (("synthetic", synthetic_images, synthetic_labels),
                                           ("real", real_images, real_labels))}
    return SegmentationUtility(dice_synthetic=scores["synthetic"], dice_real=scores["real"])
