"""Segmentation utility: is synthetic data as good as real data for training a segmenter?

The same small MONAI UNet (same seed, same initial weights, same number of steps, batch
size and learning rate) is trained once on synthetic (image, label map) pairs and once
on real pairs, with MONAI's DiceCELoss. Both are scored with MONAI's DiceMetric, mean
over the foreground classes, on the same held-out real pairs. ``dice_ratio =
dice_synthetic / dice_real``: 1 means the synthetic data is as useful as the real data.

Label maps are class indices ``(N, 1, D, H, W)`` (integers in ``0..num_classes-1``,
0 = background), not one-hot, to keep large sets small in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from torch import nn
from tqdm.auto import tqdm

from models.metrics.errors import MetricInputError

log = logging.getLogger(__name__)

SEGMENTER_CHANNELS = (8, 16, 32)
SEGMENTER_STRIDES = (2, 2)


@dataclass(frozen=True)
class SegmentationUtility:
    """Held-out real Dice of the segmenter trained on synthetic and on real data."""

    dice_synthetic: float
    dice_real: float

    @property
    def dice_ratio(self) -> float:
        """``dice_synthetic / dice_real``; NaN when the real-trained segmenter scores 0."""
        return self.dice_synthetic / self.dice_real if self.dice_real > 0 else math.nan


def build_segmenter(num_classes: int, seed: int) -> nn.Module:
    """A small 3D MONAI UNet ``(N, 1, D, H, W)`` -> logits ``(N, num_classes, D, H, W)``.

    Sides must be divisible by 4 (two stride-2 levels). Initialised under ``seed`` on the
    CPU without touching the caller's random state, so every build with one seed starts
    from the same weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes,
                    channels=SEGMENTER_CHANNELS, strides=SEGMENTER_STRIDES, num_res_units=1)


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


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                    seed: int, batch_size: int = 2, learning_rate: float = 1e-3,
                    device: torch.device | str = "cpu",
                    description: str = "segmenter") -> nn.Module:
    """Train :func:`build_segmenter` for ``steps`` Adam steps on ``images`` ``(N, 1, D, H, W)``
    and class maps ``labels`` ``(N, 1, D, H, W)``; returns the network in eval mode.

    Deterministic for a given ``seed`` on a given device: the initial weights and the
    batch order both come from it.
    """
    _check_pairs(images, labels, description)
    if steps < 1:
        raise MetricInputError(f"{description}: steps must be >= 1 (got {steps}); "
                               f"give the segmenter a training budget")
    net = build_segmenter(num_classes, seed).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    order = _batches(images.shape[0], batch_size, torch.Generator().manual_seed(seed))
    net.train()
    progress = tqdm(range(steps), desc=description, unit="step", disable=None, leave=False)
    for step in progress:
        index = next(order)
        batch_images = images[index].to(device=device, dtype=torch.float32)
        batch_labels = labels[index].to(device=device, dtype=torch.long)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch_images), batch_labels)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    log.debug("%s: final training loss %.4f after %d steps", description, loss.item(), steps)
    return net.eval()


@torch.no_grad()
def predict_labels(net: nn.Module, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Class map ``(N, 1, D, H, W)`` (int64, CPU) of ``net`` on ``images`` ``(N, 1, D, H, W)``."""
    device = next(net.parameters()).device
    maps = [net(images[start:start + batch_size].to(device=device, dtype=torch.float32))
            .argmax(dim=1, keepdim=True).cpu()
            for start in range(0, images.shape[0], batch_size)]
    return torch.cat(maps)


def mean_foreground_dice(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Dice of class maps ``predicted`` against ``target`` (both ``(N, 1, D, H, W)``), averaged
    over images and foreground classes (background, class 0, excluded).

    A class absent from an image's target does not count for that image (MONAI's
    ``ignore_empty``); a target with no foreground at all is refused.
    """
    if predicted.shape != target.shape:
        raise MetricInputError(f"dice: prediction {tuple(predicted.shape)} and target "
                               f"{tuple(target.shape)} differ; pass maps of one shape")
    metric = DiceMetric(include_background=False, reduction="mean", num_classes=num_classes,
                        get_not_nans=True)
    metric(predicted, target)
    dice, counted = metric.aggregate()
    if float(counted) == 0:
        raise MetricInputError("dice: the target maps hold no foreground class; "
                               "score on label maps with labelled structures")
    return float(dice)


def segmentation_utility(synthetic_images: torch.Tensor, synthetic_labels: torch.Tensor,
                         real_images: torch.Tensor, real_labels: torch.Tensor,
                         heldout_images: torch.Tensor, heldout_labels: torch.Tensor,
                         num_classes: int, steps: int, seed: int = 0, batch_size: int = 2,
                         learning_rate: float = 1e-3,
                         device: torch.device | str = "cpu") -> SegmentationUtility:
    """Train the same segmenter on synthetic and on real pairs, score both on held-out real pairs.

    All images ``(N, 1, D, H, W)``, all label maps ``(N, 1, D, H, W)`` class indices. The
    held-out pairs must come from patients absent from ``real_images`` (the caller splits
    by patient).
    """
    _check_pairs(heldout_images, heldout_labels, "held-out real")
    scores = {}
    for name, images, labels in (("synthetic", synthetic_images, synthetic_labels),
                                 ("real", real_images, real_labels)):
        net = train_segmenter(images, labels, num_classes, steps, seed, batch_size,
                              learning_rate, device, description=f"segmenter on {name}")
        scores[name] = mean_foreground_dice(predict_labels(net, heldout_images, batch_size),
                                            heldout_labels, num_classes)
        log.info("segmenter trained on %s data: held-out real Dice %.4f", name, scores[name])
    return SegmentationUtility(dice_synthetic=scores["synthetic"], dice_real=scores["real"])
