"""The quality evaluation's segmenters: trained one after another in this process (before
2026-12-02) against side by side in a :class:`~models.metrics.segmenter_pool.SegmenterPool`, in
one run.

The jobs are the demo evaluation's: six segmenters (the public one and five utility ones, one
per set) with its settings (MONAI UNet 16-32-64-128, batch 4, bf16 forward passes where the CPU
has them), on 32^3 brain-like volumes, each a fixed number of steps (no early stopping, so both
arms do the same work). Sequential uses torch's default thread count; the pool uses its defaults
(one process per core, at most 4, sharing the cores). Reported: the wall time of each arm and
their ratio, and the two arms' largest difference in validation Dice (floating-point summation
order only).

Run: ``python -m experiments.benchmarks.segmenter_pool [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.device import native_bf16
from models.metrics import SegmenterPool, SegmenterSettings
from models.metrics.segmenter_pool import available_cores

CLASSES = 4
JOBS = 6


def _pairs(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested ellipsoids of random size and centre (classes 1..3 in background 0), a noisy
    intensity per class: ``(count, 1, size^3)`` float images and uint8 maps."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    images, maps = [], []
    for _ in range(count):
        centre = 0.1 * (torch.rand(3, 1, 1, 1, generator=generator) - 0.5)
        stretch = 0.8 + 0.3 * torch.rand(3, 1, 1, 1, generator=generator)
        radius = (((grid - centre) / stretch) ** 2).sum(0).sqrt()
        label = torch.zeros(size, size, size, dtype=torch.uint8)
        for cls, r in ((1, 0.9), (2, 0.65), (3, 0.35)):
            label[radius < r] = cls
        image = torch.tensor([0.0, 0.35, 0.6, 0.85])[label.long()]
        images.append(image + 0.05 * torch.randn(size, size, size, generator=generator))
        maps.append(label)
    return torch.stack(images)[:, None], torch.stack(maps)[:, None]


def _train_all(pool: SegmenterPool, sets: list, settings: SegmenterSettings) -> tuple[float, list]:
    started = time.perf_counter()
    futures = [pool.submit(*pairs, CLASSES, seed, settings, f"job {seed}")
               for seed, pairs in enumerate(sets)]
    trained = [future.result() for future in futures]
    return time.perf_counter() - started, trained


def run(quick: bool = False) -> dict:
    """Time both arms on the same jobs (16^3 and 10 steps quick, 32^3 and 50 otherwise)."""
    size, steps = (16, 10) if quick else (32, 50)
    settings = SegmenterSettings(max_steps=steps, eval_every=steps, patience=1,
                                 bf16_training=native_bf16("cpu"))
    sets = [_pairs(16, size, seed) for seed in range(JOBS)]
    with SegmenterPool("cpu", workers=1) as pool:
        sequential_s, sequential = _train_all(pool, sets, settings)
    with SegmenterPool("cpu") as pool:
        pool_s, pooled = _train_all(pool, sets, settings)
        workers = pool.workers
    difference = max(abs(a.validation_dice - b.validation_dice)
                     for a, b in zip(sequential, pooled))
    return {
        "summary": f"{JOBS} quality segmenters ({size}^3, {steps} steps each) train "
                   f"{sequential_s / pool_s:.2f}x faster in {workers} worker processes than one "
                   f"after another in one process ({pool_s:.0f} s against {sequential_s:.0f} s, "
                   f"{available_cores()} cores).",
        "jobs": JOBS, "image_size": size, "steps": steps, "cores": available_cores(),
        "bf16_training": settings.bf16_training,
        "sequential_threads": torch.get_num_threads(), "pool_workers": workers,
        "sequential_s": sequential_s, "pool_s": pool_s, "speedup": sequential_s / pool_s,
        "max_validation_dice_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes and 10 steps")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
