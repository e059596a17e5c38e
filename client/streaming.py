"""Scans streamed from disk instead of held in memory (``memory.stream_from_disk``).

:func:`client.site_data.load_site` preprocesses every scan once and keeps the cohort in RAM
(MONAI ``CacheDataset``): right for the tiny demo, impossible for thousands of 128^3 volumes
(8 MiB each in fp32). :func:`stream_site` validates the same files the same way, but its
:class:`StreamingScans` is the same :class:`SiteDataset` over a plain MONAI ``Dataset``: each
item is read and preprocessed when asked for, and :func:`iterate_batches` reads batches through
a ``DataLoader`` with worker processes so the next batch is prepared while the current one
trains.

:class:`LazyStack` gives one key of such a dataset the indexing of a stacked tensor
(``images[index]``: only those scans are read), so code written for the in-memory cohort runs on
the streamed one unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from client.manifest import ScanRecord, attribute_matrix, read_manifest
from client.site_data import SiteDataset, check_scan
from configs.schema import DataConfig

log = logging.getLogger(__name__)


class StreamingScans(SiteDataset):
    """A site's scans, each read and preprocessed on access (nothing cached).

    Items are those of :class:`client.site_data.SiteDataset`: ``image`` float32
    (1, D, H, W) in [0, 1]; ``label`` float32 (C, D, H, W) one-hot; ``patient_id``;
    ``attributes`` float32 (A,); ``affine`` float64 (4, 4).
    """

    def __init__(self, records: Sequence[ScanRecord], data: DataConfig,
                 attributes: torch.Tensor, attribute_names: Sequence[str] = ()):
        super().__init__(records, data, attributes, attribute_names, cached=False)


def stream_site(site_dir: Path, data: DataConfig, manifest: str = "manifest.csv",
                attributes: Sequence[str] = ()) -> StreamingScans:
    """Validate a site's manifest and every scan exactly as :func:`client.site_data.load_site`
    does (one :class:`~client.manifest.SiteDataError` line on the first bad input), then return
    the scans as a :class:`StreamingScans` that reads them from disk on access."""
    records = read_manifest(Path(site_dir), manifest)
    values = attribute_matrix(records, attributes)
    for record in tqdm(records, desc="validating scans", unit="scan", disable=None):
        check_scan(record, data.label_names)
    scans = StreamingScans(records, data, torch.as_tensor(values), attributes)
    log.info("%s: %d scans of %d patients, streamed from disk", site_dir, len(scans),
             scans.num_patients)
    return scans


def _label_indices(item: dict) -> torch.Tensor:
    return item["label"].argmax(0).to(torch.uint8)


def _image(item: dict) -> torch.Tensor:
    return item["image"].float()


def _affine(item: dict) -> torch.Tensor:
    return item["affine"]


class _Field(torch.utils.data.Dataset):
    """One converted field of a dataset's items (picklable, for DataLoader workers)."""

    def __init__(self, dataset: torch.utils.data.Dataset, convert: Callable[[dict], torch.Tensor]):
        self.dataset, self.convert = dataset, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.convert(self.dataset[i])


class LazyStack:
    """One field of every scan, indexable along dim 0 like the stacked tensor it stands for.

    ``stack[i]`` is one item (``stack[i, 0]`` indexes into it); ``stack[index]`` (a slice, list
    or 1-D tensor of indices) reads only those scans and stacks them. ``shape`` is the stacked
    tensor's shape.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, convert: Callable[[dict], Any],
                 item_shape: Sequence[int]):
        self.field = _Field(dataset, convert)
        self.shape = torch.Size([len(dataset), *item_shape])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):  # e.g. images[i, 0]: dim 0 here, the rest on the result
            head, rest = index[0], index[1:]
            return self[head][rest] if isinstance(head, int) else self[head][(slice(None), *rest)]
        if isinstance(index, int):
            return self.field[index]
        if isinstance(index, slice):
            positions = range(*index.indices(len(self)))
        else:
            positions = torch.as_tensor(index).reshape(-1).tolist()
        if not positions:  # an empty selection (e.g. no held-out scans): shape (0, *item)
            return self.field[0].new_empty((0, *self.field[0].shape))
        return torch.stack([self.field[int(i)] for i in positions])


def image_stack(scans: StreamingScans) -> LazyStack:
    """Images (N, 1, D, H, W) float32, read on access."""
    return LazyStack(scans, _image, (1, *scans.data.shape))


def label_stack(scans: StreamingScans) -> LazyStack:
    """Label maps (N, D, H, W) uint8 class indices, read on access."""
    return LazyStack(scans, _label_indices, tuple(scans.data.shape))


def affine_stack(scans: StreamingScans) -> LazyStack:
    """RAS affines (N, 4, 4) float64 of the preprocessed volumes, read on access."""
    return LazyStack(scans, _affine, (4, 4))


def iterate_batches(volumes: torch.Tensor | LazyStack, batches: Sequence[torch.Tensor],
                    num_workers: int = 0) -> Iterator[torch.Tensor]:
    """The stacked volumes of each batch of indices, in order.

    An in-memory tensor is indexed directly; a :class:`LazyStack` is read through a ``DataLoader``
    (``batch_sampler`` = ``batches``, ``num_workers`` reader processes, pinned memory when CUDA
    is present), so the order, and any seeded result, is the same with or without workers.
    """
    if not isinstance(volumes, LazyStack):
        for index in batches:
            yield volumes[index]
        return
    loader = DataLoader(volumes.field, batch_sampler=[[int(i) for i in b] for b in batches],
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    yield from loader
