"""Several quality segmenters trained at once, one worker process per share of the CPU.

An evaluation trains up to six segmenters (the public one and one utility segmenter per set),
each independent of the others. One small 3D UNet does not keep two CPU threads busy: measured
on the demo's 2-core machine (batch 4, 32^3, bf16), one training step takes 196 ms on two
threads and 276 ms on one, while two one-thread processes side by side take 276-279 ms each,
1.4x the throughput. So on the CPU :class:`SegmenterPool` trains its jobs in worker processes,
``workers`` at a time with ``cores // workers`` threads each. On a GPU, or with one worker, it
trains them in this process, one after another, on the given device.

Each job is :func:`~models.metrics.segmentation_utility.train_segmenter` unchanged: same seed,
same split, same batches. Results can differ from a one-process run only by floating-point
summation order (thread count), as they do between machines.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from models.metrics.segmentation_utility import (SegmenterSettings, TrainedSegmenter,
                                                 build_segmenter, train_segmenter)

log = logging.getLogger(__name__)

# At 32^3 a job holds well under 1 GiB; at 128^3 several, so the CPU pool stays small.
MAX_WORKERS = 4


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: torch.device | str) -> int:
    """Worker processes for ``device``: one per core (at most :data:`MAX_WORKERS`) on the CPU,
    none (train in this process) on an accelerator."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(MAX_WORKERS, available_cores()))


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_in_worker(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                     settings: SegmenterSettings,
                     description: str) -> tuple[dict[str, torch.Tensor], int, int, float]:
    trained = train_segmenter(images, labels, num_classes, seed, settings, "cpu", description)
    return trained.net.state_dict(), trained.steps, trained.best_step, trained.validation_dice


class SegmenterPool:
    """Trains segmenters (:func:`~models.metrics.segmentation_utility.train_segmenter`), several
    at once on a multi-core CPU. Use as a context manager; :meth:`submit` returns a
    :class:`~concurrent.futures.Future` of the :class:`TrainedSegmenter` (frozen, eval mode, on
    ``device``).

    device: where the segmenters train and where the returned nets live; workers: processes
    (default :func:`default_workers`); 1 trains in this process at :meth:`submit`.
    """

    def __init__(self, device: torch.device | str = "cpu", workers: int | None = None) -> None:
        self.device = torch.device(device)
        self.workers = default_workers(self.device) if workers is None else max(1, workers)
        if self.device.type != "cpu":
            self.workers = 1
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> SegmenterPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (jobs not yet started are cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            threads = max(1, available_cores() // self.workers)
            # spawn, not fork: forking a process whose torch already started OpenMP threads
            # can deadlock the child.
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_threads, initargs=(threads,))
            log.info("training quality segmenters in %d processes of %d thread(s)",
                     self.workers, threads)
        return self._executor

    def submit(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
               settings: SegmenterSettings = SegmenterSettings(),
               description: str = "segmenter") -> Future[TrainedSegmenter]:
        """Train on ``images`` ``(N, 1, D, H, W)`` and class maps ``labels`` (same shape);
        errors (:class:`~models.metrics.errors.MetricInputError`) surface at ``result()``."""
        if self.workers == 1:
            done: Future[TrainedSegmenter] = Future()
            try:
                done.set_result(train_segmenter(images, labels, num_classes, seed, settings,
                                                self.device, description))
            except Exception as err:  # noqa: BLE001 - handed to the caller through the future
                done.set_exception(err)
            return done
        raw = self._pool().submit(_train_in_worker, images.cpu(), labels.cpu(), num_classes,
                                  seed, settings, description)
        result: Future[TrainedSegmenter] = Future()

        def finish(job: Future) -> None:
            if job.cancelled():
                result.cancel()
                return
            try:
                state, steps, best_step, validation_dice = job.result()
                net = build_segmenter(num_classes, seed, settings)
                net.load_state_dict(state)
                net.eval().requires_grad_(False)
                trained = TrainedSegmenter(net=net.to(self.device), steps=steps,
                                           best_step=best_step, validation_dice=validation_dice)
            except Exception as err:  # noqa: BLE001 - a waiting caller must not hang
                result.set_exception(err)
                return
            log.info("%s: best validation Dice %.4f at step %d of %d", description,
                     validation_dice, best_step, steps)
            result.set_result(trained)

        raw.add_done_callback(finish)
        return result
