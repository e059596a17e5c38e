"""Quality segmenters trained side by side in worker processes: the same segmenters as in one
process, errors that reach the caller, cached sets that train nothing."""

from __future__ import annotations

import pytest
import torch

from models.metrics import (MetricInputError, SegmenterPool, SegmenterSettings,
                            collapse_baseline, evaluate_quality, start_public_segmenter,
                            train_segmenter)
from models.metrics.segmenter_pool import available_cores, default_workers
from tests.models.test_metrics_segmentation import NUM_CLASSES, brains

TINY = SegmenterSettings(channels=(4, 8), strides=(2,), max_steps=6, eval_every=2, patience=5)


class CountingPool(SegmenterPool):
    """A real two-worker pool that remembers what it was asked to train."""

    def __init__(self) -> None:
        super().__init__("cpu", workers=2)
        self.descriptions: list[str] = []

    def submit(self, images, labels, num_classes, seed, settings=SegmenterSettings(),
               description="segmenter"):
        self.descriptions.append(description)
        return super().submit(images, labels, num_classes, seed, settings, description)


def test_workers_train_the_same_segmenters_as_this_process():
    sets = [brains(6, seed=40), brains(6, seed=41)]
    with SegmenterPool("cpu", workers=2) as pool:
        futures = [pool.submit(*pairs, NUM_CLASSES, seed, TINY, f"set {seed}")
                   for seed, pairs in enumerate(sets)]
        pooled = [future.result() for future in futures]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() // 2))  # the workers' thread count
    try:
        here = [train_segmenter(*pairs, NUM_CLASSES, seed, TINY) for seed, pairs in enumerate(sets)]
    finally:
        torch.set_num_threads(threads)
    for mine, theirs in zip(here, pooled):
        assert (theirs.steps, theirs.best_step) == (mine.steps, mine.best_step)
        assert theirs.validation_dice == pytest.approx(mine.validation_dice, abs=1e-6)
        assert not theirs.net.training
        assert not any(p.requires_grad for p in theirs.net.parameters())
        for name, value in mine.net.state_dict().items():
            assert torch.allclose(theirs.net.state_dict()[name], value, atol=1e-5), name
    first_weights = [next(result.net.parameters()) for result in pooled]
    assert not torch.equal(*first_weights)  # two jobs, two segmenters


def test_a_workers_error_reaches_the_caller_as_one_line():
    images, labels = brains(2, seed=42)
    with SegmenterPool("cpu", workers=2) as pool:
        failing = pool.submit(images[:1], labels[:1], NUM_CLASSES, 0, TINY, "one pair")
        with pytest.raises(MetricInputError, match="one pair: 1 pair"):
            failing.result()


def test_one_worker_or_an_accelerator_trains_in_this_process():
    assert SegmenterPool("cpu", workers=1).workers == 1
    assert default_workers("cuda") == 1 and SegmenterPool("cuda", workers=4).workers == 1
    assert 1 <= default_workers("cpu") <= 4
    with SegmenterPool("cpu", workers=1) as pool:
        done = pool.submit(*brains(4, seed=43), NUM_CLASSES, 0, TINY)
        assert done.done() and pool._executor is None
        assert done.result().steps == TINY.max_steps


def test_the_public_and_utility_segmenters_share_the_pool_and_cached_sets_train_nothing(
        tmp_path):
    public, reference = brains(6, seed=44), brains(4, seed=45)
    synthetic, real = brains(4, seed=46), brains(4, seed=47)
    baselines = {"real": real, "collapse": collapse_baseline([real], synthetic[1]),
                 "copy": None, "pretrained_only": None}
    measured = []
    for _ in range(2):
        with CountingPool() as pool:
            pending = start_public_segmenter(*public, NUM_CLASSES, tmp_path, seed=0,
                                             settings=TINY, pool=pool)
            report = evaluate_quality(synthetic, reference, baselines, pending, NUM_CLASSES,
                                      seed=0, seg_settings=TINY, cache_dir=tmp_path, pool=pool)
        measured.append((pool.descriptions, report))
    (first_jobs, first), (second_jobs, second) = measured
    assert first_jobs == ["public segmenter", "segmenter on real", "segmenter on collapse",
                          "segmenter on synthetic"]
    assert second_jobs == []  # public segmenter and every set read from the cache
    assert second.synthetic == first.synthetic and second.baselines == first.baselines
    assert first.baselines["copy"] is None and 0 < first.synthetic.utility_dice <= 1
