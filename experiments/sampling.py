"""Synthetic volumes from a checkpoint, following given semantic maps, written as a site folder.

The mask folder is either a site-format folder (a manifest whose ``label`` column names the maps;
attribute columns are used when the model is attribute-conditioned) or a plain folder of label
NIfTI files. Maps must already be on the checkpoint's grid (``data.shape``); they are reoriented to
RAS like the training data. The output folder holds ``images/``, ``labels/`` (copies of the maps
used), ``manifest.csv`` (patient_id, image, label, attributes, condition) readable by
``client.site_data.read_manifest``, and ``preview.png``. It appears complete or not at all.

Used by ``fedsynth sample`` and by the quality stage of ``fedsynth sweep``.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.yaml", "manifest.yml")
PREVIEW_LIMIT = 8


class SampleInputError(ValueError):
    """Bad sampling input (mask folder, output folder, steps). One line."""


@dataclass(frozen=True)
class ConditionMap:
    """One conditioning map: its name, file, and attribute values (None: the public means)."""

    name: str
    path: Path
    attributes: tuple[float, ...] | None


@dataclass(frozen=True)
class SampledFolder:
    """What :func:`sample_folder` wrote: ``num`` volumes from ``maps`` maps into ``out``."""

    out: Path
    num: int
    maps: int
    checkpoint_sha256: str
    steps: int
    guidance: float
    seed: int


def find_maps(masks: Path, attribute_names: tuple[str, ...]) -> list[ConditionMap]:
    """The maps of a mask folder, in manifest order (or file-name order for a plain folder)."""
    from client.manifest import attribute_matrix
    from client.site_data import read_manifest

    if not masks.is_dir():
        raise SampleInputError(f"{masks}: mask folder not found; pass a folder of label maps "
                               f"or a site folder")
    manifest = next((name for name in MANIFEST_NAMES if (masks / name).is_file()), None)
    if manifest is not None:
        records = read_manifest(masks, manifest)
        if not records:
            raise SampleInputError(f"{masks / manifest}: lists no maps; add rows or pass "
                                   f"another folder")
        given = any(n in r.attributes for r in records for n in attribute_names)
        if not given:
            return [ConditionMap(r.patient_id, r.label, None) for r in records]
        values = attribute_matrix(records, attribute_names)
        return [ConditionMap(r.patient_id, r.label, tuple(float(v) for v in row))
                for r, row in zip(records, values)]
    files = sorted(p for p in masks.iterdir()
                   if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise SampleInputError(f"{masks}: no manifest ({', '.join(MANIFEST_NAMES)}) and no "
                               f".nii/.nii.gz label maps; pass a folder of label maps or a "
                               f"site folder")
    return [ConditionMap(p.name.split(".nii")[0], p, None) for p in files]


def sample_folder(checkpoint_path: Path, masks: Path, num: int, out: Path, *, seed: int = 0,
                  guidance: float | None = None, steps: int | None = None,
                  batch_size: int = 4, device: str | None = None, precision: str = "fp32",
                  memory=None) -> SampledFolder:
    """Generate ``num`` volumes with the checkpoint, each conditioned on a map of ``masks``
    (cycled in order), into the new or empty folder ``out`` (see the module docstring).

    ``guidance`` / ``steps`` None: the checkpoint's own. Every map is read and checked before
    anything is generated; bad input raises :class:`SampleInputError` or the loaders' one-line
    errors. ``device`` (``auto`` when None) and ``precision`` (``fp32`` | ``bf16``) say where and
    how to sample; ``memory`` (a ``MemoryConfig``) adds flash attention and tiled decoding.
    """
    import numpy as np
    import torch

    from models.checkpoint import load_checkpoint
    from models.device import check_precision, resolve_device
    from models.memory import configure
    from models.volume_io import read_label_map

    out = Path(out)
    device = resolve_device(device)
    check_precision(precision, device)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SampleInputError(f"{out}: output folder exists and is not empty; "
                               f"choose a new folder")
    checkpoint = load_checkpoint(checkpoint_path)
    grid, diffusion = checkpoint.data, checkpoint.model_config["diffusion"]
    if steps is not None and steps > diffusion["train_timesteps"]:
        raise SampleInputError(f"--steps {steps} exceeds the model's "
                               f"{diffusion['train_timesteps']} training timesteps; use fewer")
    maps = find_maps(Path(masks), grid.attributes)
    loaded = [read_label_map(m.path, grid.shape, grid.num_classes) for m in maps]
    for condition, (_, affine) in zip(maps, loaded):
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if not np.allclose(spacing, grid.spacing, rtol=1e-3):
            log.warning("%s: voxel size %s mm differs from the model's %s mm; the anatomy's "
                        "scale may look off", condition.path, np.round(spacing, 3).tolist(),
                        list(grid.spacing))

    model = checkpoint.build_model(device)
    if memory is not None:
        configure(model, memory)
    embedding = model.denoiser.attribute_embedding
    means = tuple(embedding.mean.tolist()) if embedding is not None else ()
    if embedding is not None and any(m.attributes is None for m in maps):
        log.info("no attribute values in %s: conditioning on the public means %s", masks,
                 dict(zip(grid.attributes, means)))
    guidance = checkpoint.model_config["conditioning"]["guidance_scale"] \
        if guidance is None else guidance
    steps = steps or diffusion["sampling_steps"]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_samples(staging, model, maps, loaded, means, num, batch_size,
                      torch.Generator().manual_seed(seed), guidance, steps, grid, precision)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SampledFolder(out, num, len(maps), checkpoint.content_hash, steps, guidance, seed)


def write_samples(folder: Path, model, maps: list[ConditionMap], loaded, means: tuple,
                  num: int, batch_size: int, generator, guidance: float, steps: int,
                  grid, precision: str = "fp32") -> None:
    """Generate ``num`` volumes into ``folder``: images/, labels/, manifest.csv, preview.png.

    The model samples on its own device (at ``precision``); what is written comes from CPU copies.
    """
    import numpy as np
    import torch
    from monai.networks.utils import one_hot
    from tqdm.auto import tqdm

    from models.device import autocast, module_device
    from models.previews import save_preview
    from models.volume_io import write_volume

    rows, previews = [], []
    for start in tqdm(range(0, num, batch_size), desc="generating", unit="batch", disable=None):
        indices = list(range(start, min(start + batch_size, num)))
        chosen = [i % len(maps) for i in indices]
        labels = torch.stack([torch.as_tensor(loaded[c][0])[None] for c in chosen])
        attributes = None
        if means:
            attributes = torch.tensor([maps[c].attributes or means for c in chosen],
                                      dtype=torch.float32)
        device = module_device(model)
        with autocast(device, precision):
            images = model.sample(one_hot(labels, grid.num_classes, dim=1).float().to(device),
                                  None if attributes is None else attributes.to(device),
                                  generator=generator, guidance_scale=guidance, steps=steps)
        images = images.float().cpu()
        for row, (i, c) in enumerate(zip(indices, chosen)):
            name = f"synth_{i:04d}"
            label_array, affine = loaded[c]
            image = images[row, 0].numpy()
            write_volume(folder / "images" / f"{name}.nii.gz", image, affine)
            write_volume(folder / "labels" / f"{name}_label.nii.gz", label_array, affine,
                         dtype=np.uint8)
            values = attributes[row].tolist() if attributes is not None else []
            rows.append({"patient_id": name, "image": f"images/{name}.nii.gz",
                         "label": f"labels/{name}_label.nii.gz",
                         **{a: f"{v:g}" for a, v in zip(grid.attributes, values)},
                         "condition": maps[c].name})
            if len(previews) < PREVIEW_LIMIT:
                previews.append((image, label_array, name))
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_preview(folder / "preview.png", [p[0] for p in previews], [p[1] for p in previews],
                 [p[2] for p in previews], num_classes=grid.num_classes)
