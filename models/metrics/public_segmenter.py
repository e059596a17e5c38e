"""The public segmenter: trained on the PUBLIC cohort's scans and maps only, frozen, hashed,
cached on disk, so it is trained once per public cohort and training settings.

It serves two metrics:

* **conditional Dice** (Med-LSDM protocol): segment each synthetic volume and compare with the
  map it was conditioned on (:func:`conditional_dice`);
* **KID features** (:func:`segmenter_features`): its encoder's four stages, each globally
  average-pooled and concatenated, ``(N, 16 + 32 + 64 + 128)`` for the default widths. A network
  that learned brain anatomy from public data, with no download.

The cache file is named by the SHA-256 of the public tensors plus the training settings; the
network's own fingerprint (SHA-256 of its state dict) is stored with it and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from monai.networks.nets import UNet

from models.metrics.errors import MetricInputError
from models.metrics.feature_net import extract_features, feature_net_fingerprint
from models.metrics.segmentation_utility import (SegmenterSettings, build_segmenter,
                                                 mean_foreground_dice, predict_labels)
from models.metrics.segmenter_pool import SegmenterPool

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class PublicSegmenter:
    """The frozen public segmenter and what identifies it.

    key: SHA-256 of (public images, public maps, settings, seed) that names the cache file;
    sha256: SHA-256 of the network's state dict; validation_dice: its early-stopping score on
    a held-out part of the public set; cached: loaded from the cache rather than trained now.
    """

    net: UNet
    key: str
    sha256: str
    validation_dice: float
    steps: int
    cached: bool


def encoder_stages(net: UNet) -> list[torch.nn.Module]:
    """The encoder units of a MONAI UNet, top to bottom: each level's down unit, then the bottom.

    MONAI nests a UNet as ``Sequential(down, SkipConnection(<next level>), up)`` with the bottom
    layer inside the innermost ``SkipConnection``.
    """
    stages, node = [], net.model
    while isinstance(node, torch.nn.Sequential):
        stages.append(node[0])
        node = node[1].submodule
    return stages + [node]


class _Encoder(torch.nn.Module):
    """The UNet's encoder stages, each globally average-pooled and concatenated:
    ``(N, 1, D, H, W)`` -> ``(N, sum of the widths)``. Runs the whole net and reads the stages
    through forward hooks (the decoder output is discarded)."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net
        self.stages = encoder_stages(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        hooks = [stage.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                 for stage in self.stages]
        try:
            self.net(x)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([s.mean(dim=tuple(range(2, s.ndim))) for s in outputs], dim=1)


def public_key(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
               settings: SegmenterSettings) -> str:
    """SHA-256 naming the segmenter trained on these public pairs with these settings."""
    digest = hashlib.sha256()
    digest.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().to(torch.uint8).cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"format": CACHE_FORMAT, "num_classes": num_classes, "seed": seed,
                              "shape": list(images.shape), "settings": settings.to_json_dict()},
                             sort_keys=True).encode())
    return digest.hexdigest()


def _save_atomic(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(content, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class PendingPublicSegmenter:
    """A public segmenter that may still be training (:func:`start_public_segmenter`).

    key: as :attr:`PublicSegmenter.key`, known before training ends; :meth:`result` waits for
    the segmenter, caches it on disk the first time and returns it.
    """

    def __init__(self, key: str, finish: Callable[[], PublicSegmenter]) -> None:
        self.key = key
        self._finish = finish
        self._segmenter: PublicSegmenter | None = None

    def result(self) -> PublicSegmenter:
        if self._segmenter is None:
            self._segmenter = self._finish()
        return self._segmenter


def _load_cached(path: Path, key: str, num_classes: int, seed: int, settings: SegmenterSettings,
                 device: torch.device | str) -> PublicSegmenter | None:
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if stored.get("key") != key:
        return None
    net = build_segmenter(num_classes, seed, settings)
    net.load_state_dict(stored["state_dict"])
    if feature_net_fingerprint(net) != stored["sha256"]:
        raise MetricInputError(f"{path}: cached public segmenter does not match its "
                               f"stored SHA-256; delete the file to retrain it")
    net.eval().requires_grad_(False)
    log.info("public segmenter %s loaded from %s", stored["sha256"][:12], path)
    return PublicSegmenter(net.to(device), key, stored["sha256"],
                           float(stored["validation_dice"]), int(stored["steps"]), True)


def start_public_segmenter(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           cache_dir: Path | str, seed: int = 0,
                           settings: SegmenterSettings = SegmenterSettings(),
                           device: torch.device | str = "cpu",
                           pool: SegmenterPool | None = None) -> PendingPublicSegmenter:
    """:func:`public_segmenter`, with its training (when not cached) handed to ``pool`` so that
    other segmenters can train beside it; the result is read with ``.result()``."""
    key = public_key(images, labels, num_classes, seed, settings)
    path = Path(cache_dir) / f"public_segmenter_{key[:16]}.pt"
    cached = _load_cached(path, key, num_classes, seed, settings, device)
    if cached is not None:
        return PendingPublicSegmenter(key, lambda: cached)
    if pool is None:
        training = SegmenterPool(device, workers=1).submit(
            images, labels, num_classes, seed, settings, "public segmenter")
    else:
        training = pool.submit(images, labels, num_classes, seed, settings, "public segmenter")

    def finish() -> PublicSegmenter:
        trained = training.result()
        net = trained.net.cpu()
        sha256 = feature_net_fingerprint(net)
        _save_atomic(path, {"key": key, "sha256": sha256, "state_dict": net.state_dict(),
                            "validation_dice": trained.validation_dice, "steps": trained.steps,
                            "settings": settings.to_json_dict(), "num_classes": num_classes})
        log.info("public segmenter %s trained (%d steps, validation Dice %.3f), cached at %s",
                 sha256[:12], trained.steps, trained.validation_dice, path)
        return PublicSegmenter(net.to(device), key, sha256, trained.validation_dice,
                               trained.steps, False)

    return PendingPublicSegmenter(key, finish)


def public_segmenter(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     cache_dir: Path | str, seed: int = 0,
                     settings: SegmenterSettings = SegmenterSettings(),
                     device: torch.device | str = "cpu") -> PublicSegmenter:
    """The segmenter of the public pairs ``images``/``labels`` ``(N, 1, D, H, W)``: loaded from
    ``cache_dir`` when it was trained before with the same data and settings, else trained to
    convergence now (in this process) and cached. Frozen, eval mode."""
    return start_public_segmenter(images, labels, num_classes, cache_dir, seed, settings,
                                  device).result()


def segmenter_features(segmenter: PublicSegmenter, volumes: torch.Tensor,
                       description: str = "segmenter features") -> torch.Tensor:
    """Encoder features ``(N, F)`` (float64, CPU) of ``volumes`` ``(N, 1, D, H, W)``."""
    return extract_features(_Encoder(segmenter.net), volumes, description=description)


def conditional_dice(segmenter: PublicSegmenter, images: torch.Tensor, maps: torch.Tensor,
                     num_classes: int) -> float:
    """Mean foreground Dice of the public segmenter's labels of ``images`` ``(N, 1, D, H, W)``
    against ``maps`` ``(N, 1, D, H, W)``, the maps the images were generated from (or, for real
    scans, their own label maps)."""
    return mean_foreground_dice(predict_labels(segmenter.net, images), maps.long(), num_classes)
