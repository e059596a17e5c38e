"""Exact nearest-scan search for the gate's shift-tolerant relative L2 distance, by one GEMM.

The distance (:mod:`privacy.gate`, ``latent`` and ``nrmse``) from a candidate to a scan ``s`` is

    d(q, s) = min_j ||w_j - s||_2 / ||s||_2,

over the candidate's *effective views* ``w_j``: each of its T views (latent translates) under each
site-side offset (a circular :func:`torch.roll`; a roll permutes values, so it is applied to the
view first). With every vector centred on one fixed reference ``r`` (the bank's mean; a common
shift leaves every difference unchanged), ``a = w - r``, ``b = s - r``:

    ||w - s||^2 = ||a||^2 + ||b||^2 - 2 <a, b>,

so all V x N x M inner products are blocked float32 matrix products (``torch.matmul``: BLAS on
the CPU, cuBLAS on CUDA). Centring makes ``||a||, ||b||`` (and so the rounding error below) of the
size of the differences between scans instead of the size of the scans.

Rigorous rounding bound. ``A = fl32(a)``, ``B = fl32(b)`` are rounded from float64 (relative error
<= u each), and any summation order of a length-D float32 dot product (blocked BLAS, split-K, FMA
or not) satisfies ``|fl(<A, B>) - <A, B>| <= gamma_D ||A|| ||B||`` with ``gamma_D = D u / (1 - D u)``
(Higham, Accuracy and Stability of Numerical Algorithms, 3.1 and Cauchy-Schwarz). Hence

    |G - <a, b>| <= (gamma_D (1 + u)^2 + 2 u + u^2) ||a|| ||b||,

with u = 2^-24: the products run at full float32 precision (:func:`full_float32_products` turns
TF32 and bfloat16 passes off around them, whatever the global setting).
Norms and the assembly are float64; their rounding is covered by ``4 (D + 8) 2^-53 (||a||^2 +
||b||^2)``. This gives, for every pair and view, a lower and an upper bound on the true distance.

Exact answer. Per candidate, ``upper`` = the least upper bound over all scans; every scan whose
lower bound exceeds ``upper`` is farther than the nearest scan and is dropped. The survivors get
the brute-force formula (:func:`relative_l2`: ``torch.cdist`` in float64 over every view) in
increasing lower-bound order, stopping when the next lower bound exceeds the running best. The
returned distance is therefore brute force's float64 value for a truly nearest scan (differences
with brute force are that formula's own rounding, <= ~1e-8 of the norms for a copy at ~0); ties
keep a nearest scan, not necessarily brute force's index.

Memory: candidates go in blocks of at most ``chunk_size`` effective views, against ``bank_chunk``
scans at a time; the index holds the bank as given plus its centred float32 copy (M D 4 bytes).
Everything runs on the index's device (CUDA included); on the CPU, blocks of candidates are shared
among ``torch.get_num_threads()`` worker threads, each running its products single-threaded.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

Offset = tuple[int, int, int]
# Views of candidates [start, stop): (stop - start, T, C, *S). A tensor is sliced; a callable may
# compute them on demand (a site's calibration embeds its scans' translates chunk by chunk).
ViewSource = torch.Tensor | Callable[[int, int], torch.Tensor]
_FLOAT64_ROUNDOFF = 2.0 ** -53
_FLOAT32_ROUNDOFF = 2.0 ** -24
# Relative margin on a bound after sqrt and division (a few float64 roundings).
_MARGIN = 1e-12


def relative_l2(queries: torch.Tensor, bank: torch.Tensor, bank_norm: torch.Tensor) -> torch.Tensor:
    """(a, F) x (b, F) float64 -> (a, b): ``||q - s|| / ||s||`` (cdist, matrix-product form)."""
    distances = torch.cdist(queries[None], bank[None], compute_mode="use_mm_for_euclid_dist")[0]
    return distances / bank_norm.clamp_min(torch.finfo(torch.float64).tiny)[None]


def rolled(volumes: torch.Tensor, offset: Offset) -> torch.Tensor:
    """Volumes (..., D, H, W) translated circularly by ``offset`` voxels along (D, H, W)."""
    if not any(offset):
        return volumes
    return torch.roll(volumes, shifts=tuple(offset), dims=(-3, -2, -1))


@contextmanager
def full_float32_products():
    """Float32 matrix products at full precision (no TF32 or bfloat16 passes) while inside, so
    that the unit roundoff 2^-24 bounds them; the previous settings are restored on exit."""
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


def dot_error_factor(length: int, roundoff: float) -> float:
    """``c`` with ``|fl32(<a, b>) - <a, b>| <= c ||a|| ||b||`` for float64 vectors ``a, b`` of
    ``length`` values rounded to float32 and multiplied in any summation order."""
    n_u = length * roundoff
    if n_u >= 0.5:
        raise ValueError(f"volumes of {length} values are too long for a float32 bound")
    gamma = n_u / (1.0 - n_u)
    return gamma * (1.0 + roundoff) ** 2 + 2.0 * roundoff + roundoff ** 2


@dataclass(frozen=True)
class SearchResult:
    """Per query: distance float64 (N,) (inf where every scan was excluded), the nearest scan's
    index int64 (N,) (-1 then), the effective view that reached it int64 (N,), and how many
    candidate-scan pairs needed an exact float64 distance (the rest were settled by the float32
    bounds). Effective view ``j`` is view ``j % views_per_offset`` under offset
    ``j // views_per_offset``."""

    distance: np.ndarray
    index: np.ndarray
    view: np.ndarray
    exact_pairs: int
    pairs: int
    views_per_offset: int = 1


class ScanIndex:
    """A site's scans prepared for exact nearest-scan queries.

    bank: (M, C, *S) (images or embeddings; float32 or float64, kept as given on ``device``).
    """

    def __init__(self, bank: torch.Tensor, *, device: torch.device | str | None = None,
                 bank_chunk: int = 4096):
        if bank.ndim != 5:
            raise ValueError(f"the bank must be volumes (M, C, D, H, W), got {tuple(bank.shape)}")
        self.device = torch.device(device) if device is not None else bank.device
        self.bank = bank.to(self.device)
        self.bank_chunk = max(1, int(bank_chunk))
        self.values = math.prod(bank.shape[1:])
        self.float64_slack = 4 * (self.values + 8) * _FLOAT64_ROUNDOFF
        self.factor = dot_error_factor(self.values, _FLOAT32_ROUNDOFF)
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.center = torch.zeros(self.values, dtype=torch.float64, device=self.device)
        for s0, s1 in self._chunks():
            self.center += self.rows(torch.arange(s0, s1, device=self.device)).sum(0)
        self.center /= max(1, len(self))
        norm, centered, centered_norm = [], [], []
        for s0, s1 in self._chunks():
            rows = self.rows(torch.arange(s0, s1, device=self.device))
            norm.append(rows.norm(dim=1))
            rows -= self.center
            centered.append(rows.to(torch.float32))
            centered_norm.append(rows.norm(dim=1))
        self.norm = torch.cat(norm) if norm else empty
        # relative_l2 divides by the norm clamped the same way (a zero scan is infinitely far).
        self.safe_norm = self.norm.clamp_min(torch.finfo(torch.float64).tiny)
        self.centered = (torch.cat(centered) if centered
                         else torch.zeros((0, self.values), device=self.device))
        self.centered_norm = torch.cat(centered_norm) if centered_norm else empty

    def __len__(self) -> int:
        return self.bank.shape[0]

    def rows(self, scans: torch.Tensor) -> torch.Tensor:
        """Scans (indices) as float64 rows (n, D)."""
        return self.bank[scans].reshape(scans.numel(), -1).to(torch.float64)

    def _chunks(self):
        for start in range(0, len(self), self.bank_chunk):
            yield start, min(start + self.bank_chunk, len(self))

    def bounds(self, vectors: torch.Tensor, start: int = 0, stop: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds (n, m) on the relative distance of views ``vectors`` (n, D)
        float64 to scans [start, stop): one float32 product and its rounding bound."""
        stop = len(self) if stop is None else stop
        centered = vectors - self.center
        a_norm = centered.norm(dim=1)[:, None]
        b_norm = self.centered_norm[None, start:stop]
        with full_float32_products():
            products = torch.matmul(centered.to(torch.float32), self.centered[start:stop].T)
        products = products.to(torch.float64)
        squares = a_norm.square() + b_norm.square()
        error = (2.0 * self.factor) * a_norm * b_norm + self.float64_slack * squares
        estimate = squares - 2.0 * products
        scale = self.safe_norm[None, start:stop]
        low = (estimate - error).clamp_min_(0).sqrt_().div_(scale).mul_(1.0 - _MARGIN)
        high = (estimate + error).clamp_min_(0).sqrt_().div_(scale).mul_(1.0 + _MARGIN)
        return low, high

    def search(self, views: ViewSource, num_queries: int, *,
               offsets: Sequence[Offset] = ((0, 0, 0),), chunk_size: int = 64,
               query_groups: Sequence[int] | None = None,
               bank_groups: Sequence[int] | None = None, exact_batch: int = 64,
               progress: Callable[[int], None] | None = None) -> SearchResult:
        """Exact nearest scan for each of ``num_queries`` queries.

        views: (N, T, C, *S) or a :data:`ViewSource`; every view is also rolled by every offset
        (V = T x len(offsets) effective views, offset-major: view ``j`` is offset ``j // T``).
        ``query_groups`` (N,) / ``bank_groups`` (M,): pairs in the same group are skipped.
        Blocks of at most ``chunk_size`` effective views (one query at least).
        """
        best = torch.full((num_queries,), math.inf, dtype=torch.float64)
        best_index = torch.full((num_queries,), -1, dtype=torch.long)
        best_view = torch.zeros((num_queries,), dtype=torch.long)
        if num_queries == 0 or len(self) == 0:
            return SearchResult(best.numpy(), best_index.numpy(), best_view.numpy(), 0, 0)
        source = views.__getitem__ if isinstance(views, torch.Tensor) else None
        first = self._views(views, source, 0, 1)
        per_query = first.shape[1] * len(offsets)
        grouped = query_groups is not None and bank_groups is not None
        if grouped:
            groups_q = torch.as_tensor(list(query_groups), device=self.device)
            groups_b = torch.as_tensor(list(bank_groups), device=self.device)
        rows = max(1, chunk_size // per_query)

        def one_block(q0: int) -> int:
            q1 = min(q0 + rows, num_queries)
            block = self._views(views, source, q0, q1)
            if block.shape[0] != q1 - q0 or block.shape[2:] != self.bank.shape[1:]:
                raise ValueError(f"query views {tuple(block.shape)} do not match the bank "
                                 f"{tuple(self.bank.shape)}")
            flat = torch.stack([rolled(block, o) for o in offsets], dim=1)  # (q, O, T, C, *S)
            vectors = flat.reshape((q1 - q0) * per_query, -1).to(torch.float64)
            exclude = (groups_q[q0:q1, None] == groups_b[None]) if grouped else None
            pairs = self._search_block(vectors, q1 - q0, per_query, exclude, exact_batch,
                                       best[q0:q1], best_index[q0:q1], best_view[q0:q1])
            if progress is not None:
                progress(q1 - q0)
            return pairs

        # On the CPU, blocks are shared among torch.get_num_threads() worker threads, each
        # single-threaded inside: intra-op threads on a shared machine mostly wait for a busy
        # core (measured 10x slower at load 8 on 2 cores).
        # The precision is set here, once, so that worker threads never restore a reduced one.
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        starts = range(0, num_queries, rows)
        with full_float32_products():
            if threads <= 1:
                exact_pairs = sum(map(one_block, starts))
            else:
                torch.set_num_threads(1)
                try:
                    with ThreadPoolExecutor(max_workers=threads) as pool:
                        exact_pairs = sum(pool.map(one_block, starts))
                finally:
                    torch.set_num_threads(threads)
        return SearchResult(best.numpy(), best_index.numpy(), best_view.numpy(), exact_pairs,
                            num_queries * len(self), first.shape[1])

    def _views(self, views: ViewSource, source, start: int, stop: int) -> torch.Tensor:
        block = source(slice(start, stop)) if source is not None else views(start, stop)
        if block.ndim != self.bank.ndim + 1:
            raise ValueError(f"query views must be (N, T, C, D, H, W), got {tuple(block.shape)}")
        return block.to(self.device)

    def _search_block(self, vectors: torch.Tensor, queries: int, per_query: int,
                      exclude: torch.Tensor | None, exact_batch: int, best: torch.Tensor,
                      best_index: torch.Tensor, best_view: torch.Tensor) -> int:
        """Fill ``best*`` for ``queries`` queries of ``per_query`` views each (vectors
        (queries * per_query, D) float64). Returns the number of exact pairs."""
        lower = torch.empty((queries, len(self)), dtype=torch.float64, device=self.device)
        upper = torch.full((queries,), math.inf, dtype=torch.float64, device=self.device)
        for s0, s1 in self._chunks():
            low, high = self.bounds(vectors, s0, s1)
            low = low.reshape(queries, per_query, s1 - s0).amin(1)
            high = high.reshape(queries, per_query, s1 - s0).amin(1)
            if exclude is not None:
                low.masked_fill_(exclude[:, s0:s1], math.inf)
                high.masked_fill_(exclude[:, s0:s1], math.inf)
            lower[:, s0:s1] = low
            upper = torch.minimum(upper, high.amin(1))
        exact_pairs = 0
        for q in range(queries):
            rows = vectors[q * per_query:(q + 1) * per_query]
            keep = lower[q] <= upper[q]
            if exclude is not None:
                keep &= ~exclude[q]
            survivors = torch.nonzero(keep).flatten()
            bounds = lower[q, survivors]
            order = torch.argsort(bounds)
            survivors, bounds = survivors[order], bounds[order]
            running, index, view = math.inf, -1, 0
            for start in range(0, survivors.numel(), exact_batch):
                if float(bounds[start]) > running:
                    break
                stop = start + exact_batch
                batch = survivors[start:stop][bounds[start:stop] <= running]
                value, b_index, b_view = self._exact(rows, batch)
                exact_pairs += batch.numel()
                if value < running:
                    running, index, view = value, b_index, b_view
            best[q], best_index[q], best_view[q] = running, index, view
        return exact_pairs

    def _exact(self, vectors: torch.Tensor, scans: torch.Tensor) -> tuple[float, int, int]:
        """The exact nearest of ``scans`` (indices) for one query's views (V, D) float64."""
        distances = relative_l2(vectors, self.rows(scans), self.norm[scans])  # (V, n)
        per_scan, views = distances.min(dim=0)
        where = int(torch.argmin(per_scan))
        return float(per_scan[where]), int(scans[where]), int(views[where])


def brute_force_search(views: torch.Tensor, bank: torch.Tensor, *,
                       offsets: Sequence[Offset] = ((0, 0, 0),),
                       query_groups: Sequence[int] | None = None,
                       bank_groups: Sequence[int] | None = None) -> np.ndarray:
    """Reference: every pair's distance in float64, minimum per query (N,). Small inputs only."""
    vectors = torch.stack([rolled(views, o) for o in offsets], dim=1)
    vectors = vectors.reshape(views.shape[0], -1, bank[0].numel()).to(torch.float64)
    flat_bank = bank.reshape(bank.shape[0], -1).to(torch.float64)
    norms = flat_bank.norm(dim=1)
    out = np.full(views.shape[0], np.inf)
    for q in range(views.shape[0]):
        d = relative_l2(vectors[q], flat_bank, norms).amin(0)
        if query_groups is not None and bank_groups is not None:
            same = torch.as_tensor(list(bank_groups)) == int(query_groups[q])
            d = d.masked_fill(same, math.inf)
        out[q] = float(d.min()) if d.numel() else math.inf
    return out
