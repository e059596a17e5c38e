"""Server-side evaluation of the global model each round, on PUBLIC data only.

The server never sees a site's scans. It holds a small public validation set (a few scans of
``data.public_dir``, preprocessed like every site's, written by ``fedsynth federate``/``deploy`` to
``federation/public_validation.pt``) and computes, per round:

- ``val/diffusion_loss``: the denoiser's epsilon-prediction loss on the public latents, with noise and
  timesteps fixed by a seed so rounds are comparable;
- ``val/mmd``: MONAI's MMD between a few DDIM samples (conditioned on public maps) and the public
  scans (:func:`models.metrics.volume_mmd`) - a cheap quality signal, not a benchmark;
- a PNG preview of the samples next to the public scans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import atomic_torch_save
from models.device import module_device
from models.diffusion import LatentDiffusion, build_scheduler, diffusion_loss
from models.metrics import volume_mmd
from models.previews import save_preview

log = logging.getLogger(__name__)

FORMAT = "fedsynth-public-validation/1"
FILE_NAME = "public_validation.pt"


class ValidationSetError(ValueError):
    """A public validation file that cannot be used. One line with the fix."""


@dataclass(frozen=True)
class PublicValidationSet:
    """images (N, 1, D, H, W) float32 in [0, 1]; labels (N, D, H, W) uint8 class indices;
    attributes (N, A) float32."""

    images: torch.Tensor
    labels: torch.Tensor
    attributes: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def onehot(self, num_classes: int) -> torch.Tensor:
        """(N, C, D, H, W) float32."""
        return torch.nn.functional.one_hot(self.labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()


def save_validation_set(path: Path, validation: PublicValidationSet) -> Path:
    atomic_torch_save({"format": FORMAT, "images": validation.images.float(),
                       "labels": validation.labels.to(torch.uint8),
                       "attributes": validation.attributes.float()}, Path(path))
    return Path(path)


def load_validation_set(path: Path) -> PublicValidationSet:
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
        raise ValidationSetError(f"{path}: unreadable public validation set ({type(err).__name__}); "
                                 f"delete it and run `fedsynth federate` again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValidationSetError(f"{path}: not a fedsynth public validation set; delete it")
    return PublicValidationSet(raw["images"], raw["labels"], raw["attributes"])


@torch.no_grad()
def evaluate_public(model: LatentDiffusion, validation: PublicValidationSet, num_classes: int, *,
                    seed: int, samples: int = 2, sampling_steps: int = 10,
                    preview: Path | None = None) -> dict[str, float]:
    """``val/diffusion_loss`` and (with 2+ public scans) ``val/mmd``; writes ``preview`` if given."""
    model.eval()
    device = module_device(model)  # the model's device; metrics and previews from CPU copies
    generator = torch.Generator().manual_seed(seed)
    onehot = validation.onehot(num_classes).to(device)
    attributes = validation.attributes.to(device) if validation.attributes.shape[1] else None
    latents = model.encode(validation.images.to(device))
    loss = diffusion_loss(model.denoiser, build_scheduler(model.model_cfg), latents,
                          onehot, attributes,
                          generator=generator).mean()
    metrics = {"val/diffusion_loss": float(loss)}
    count = min(samples, len(validation))
    if count >= 2:
        synthetic = model.sample(onehot[:count], None if attributes is None else attributes[:count],
                                 generator=torch.Generator().manual_seed(seed), steps=sampling_steps,
                                 progress=False).float().cpu()
        metrics["val/mmd"] = volume_mmd(validation.images, synthetic.clamp(0, 1), seed=seed)
        if preview is not None:
            images = [v for i in range(count) for v in (validation.images[i, 0].numpy(),
                                                        synthetic[i, 0].clamp(0, 1).numpy())]
            labels = [validation.labels[i].numpy() for i in range(count) for _ in range(2)]
            titles = [t for i in range(count) for t in (f"public {i}", f"sample {i}")]
            save_preview(preview, images, labels, titles, num_classes=num_classes)
    return metrics
