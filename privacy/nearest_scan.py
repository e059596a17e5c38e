"""Exact pruned nearest-scan search for the gate's shift-tolerant relative L2 distance.

The distance (:mod:`privacy.gate`, ``latent`` and ``nrmse``) from a candidate to a scan ``s`` is

    d(q, s) = min_j ||w_j - s||_2 / ||s||_2,

over the candidate's *effective views* ``w_j``: each of its T views (latent translates) under each
site-side offset (a circular :func:`torch.roll` in image space; a roll permutes voxels, so it is
applied to the view before anything else and every bound below holds for the rolled vector as it
is). Brute force costs ``V * D`` multiply-adds per candidate-scan pair (V = T x offsets views, D
values per volume). This search returns the SAME nearest distance with far fewer of them:

1. **Projected lower bound, every pair.** ``P`` maps a volume (C, *S) to its lowest ``f`` spatial
   frequencies per axis (separable orthonormal DCT-II coefficients: a fixed, data-independent
   orthogonal projection in an orthonormal basis; no PCA, nothing fitted). For any ``w``, ``s``:
   ``||w - s||^2 = ||P(w - s)||^2 + ||R(w - s)||^2`` with ``R`` the orthogonal remainder, and
   ``||R(w - s)|| >= | ||Rw|| - ||Rs|| |`` (triangle inequality). The first term costs one
   (V x k) @ (k x M) product per candidate (k = C f^3, e.g. 192 for a 3x16^3 latent at f = 4);
   the second is a scalar per view and scan.
2. **Finer projected bound, survivors only**: the same at twice the frequencies (k 8x larger).
3. **Exact distances in increasing bound order**, a batch at a time, with early termination: a
   scan whose lower bound exceeds the running best cannot be nearer and is never computed.

Floating point: the bounds are computed in float64 from the float32/float64 inputs, and each
squared bound is lowered by ``4 (D + 8) u`` times the squared norms involved (u = 2^-53, a
worst-case bound on the rounding of a length-D float64 dot product, whatever its summation
order), so a bound never exceeds the true distance. Exact distances use the brute-force formula
(:func:`relative_l2`: ``torch.cdist`` in float64, divided by the scan's norm), so a returned
distance equals brute force's up to the rounding of that formula (about 1e-12 relative; a pruned
scan is farther than the returned one by more than that rounding). Ties keep a nearest scan,
not necessarily the same index as brute force.

Memory: candidates go in blocks of at most ``chunk_size`` effective views, bounds are computed
against ``bank_chunk`` scans at a time, and exact distances for ``exact_batch`` scans at a time;
the index holds the bank, its norms and its projections (k + k' values per scan). Everything runs
on the bank's device (CUDA included). On the CPU, blocks of candidates are shared among
``torch.get_num_threads()`` worker threads, each running its products single-threaded.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

Offset = tuple[int, int, int]
# Views of candidates [start, stop): (stop - start, T, C, *S). A tensor is sliced; a callable may
# compute them on demand (a site's calibration embeds its scans' translates chunk by chunk).
ViewSource = torch.Tensor | Callable[[int, int], torch.Tensor]
_UNIT_ROUNDOFF = 2.0 ** -53
# The coarse projection keeps at most this many values per volume (cheap all-pairs bound).
COARSE_VALUES = 256


def relative_l2(queries: torch.Tensor, bank: torch.Tensor, bank_norm: torch.Tensor) -> torch.Tensor:
    """(a, F) x (b, F) float64 -> (a, b): ``||q - s|| / ||s||`` (cdist, matrix-product form)."""
    distances = torch.cdist(queries[None], bank[None], compute_mode="use_mm_for_euclid_dist")[0]
    return distances / bank_norm.clamp_min(torch.finfo(torch.float64).tiny)[None]


def rolled(volumes: torch.Tensor, offset: Offset) -> torch.Tensor:
    """Volumes (..., D, H, W) translated circularly by ``offset`` voxels along (D, H, W)."""
    if not any(offset):
        return volumes
    return torch.roll(volumes, shifts=tuple(offset), dims=(-3, -2, -1))


def dct_rows(size: int, frequencies: int) -> torch.Tensor:
    """The ``frequencies`` lowest rows of the orthonormal DCT-II matrix of length ``size``:
    float64 (min(frequencies, size), size), orthonormal rows."""
    frequencies = min(frequencies, size)
    position = torch.arange(size, dtype=torch.float64) + 0.5
    rows = torch.stack([torch.cos(math.pi * position * f / size) for f in range(frequencies)])
    rows[0] *= math.sqrt(1.0 / size)
    rows[1:] *= math.sqrt(2.0 / size)
    return rows


class LowFrequencyProjection:
    """A volume's lowest spatial frequencies: (B, C, *S) -> (B, C * f1 f2 f3), float64.

    The coefficients of the separable orthonormal DCT-II (per axis its ``frequencies`` lowest
    rows): a fixed, data-independent orthogonal projection in an orthonormal basis, so it never
    increases a distance. Smooth volumes (scans, latents) keep most of their differences there.
    """

    def __init__(self, spatial: Sequence[int], frequencies: int, device: torch.device):
        self.frequencies = int(frequencies)
        self.axes = [dct_rows(size, self.frequencies).to(device) for size in spatial]

    @property
    def values_per_channel(self) -> int:
        return math.prod(a.shape[0] for a in self.axes)

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        x = volumes.to(torch.float64)
        first, second, third = self.axes
        x = torch.einsum("bcxyz,kz->bcxyk", x, third)
        x = torch.einsum("bcxyk,jy->bcxjk", x, second)
        x = torch.einsum("bcxjk,ix->bcijk", x, first)
        return x.reshape(x.shape[0], -1)


def projection_frequencies(channels: int, spatial: Sequence[int]) -> tuple[int, ...]:
    """Frequencies per axis of the two bounds: the most whose projection keeps at most
    :data:`COARSE_VALUES` values, then twice that (when it is still smaller than the volume)."""
    frequencies = 1
    while channels * math.prod(min(frequencies + 1, s) for s in spatial) <= COARSE_VALUES and \
            frequencies < max(spatial):
        frequencies += 1
    finer = 2 * frequencies
    return (frequencies, finer) if finer < max(spatial) else (frequencies,)


@dataclass
class _Level:
    """One projection of the bank: coordinates (M, k) and the remainders' norm intervals (M,)."""

    projection: LowFrequencyProjection
    coords: torch.Tensor
    coords_sq: torch.Tensor
    rest_low: torch.Tensor
    rest_high: torch.Tensor


@dataclass(frozen=True)
class SearchResult:
    """Per query: distance float64 (N,) (inf where every scan was excluded), the nearest scan's
    index int64 (N,) (-1 then), the effective view that reached it int64 (N,), and how many
    candidate-scan pairs needed an exact distance (the rest were pruned by a bound). Effective
    view ``j`` is view ``j % views_per_offset`` under offset ``j // views_per_offset``."""

    distance: np.ndarray
    index: np.ndarray
    view: np.ndarray
    exact_pairs: int
    pairs: int
    views_per_offset: int = 1


class ScanIndex:
    """A site's scans prepared for exact pruned nearest-scan queries.

    bank: (M, C, *S) (images or embeddings; float32 or float64, kept as given on ``device``).
    """

    def __init__(self, bank: torch.Tensor, *, device: torch.device | str | None = None,
                 frequencies: Sequence[int] | None = None, bank_chunk: int = 4096):
        if bank.ndim != 5:
            raise ValueError(f"the bank must be volumes (M, C, D, H, W), got {tuple(bank.shape)}")
        self.device = torch.device(device) if device is not None else bank.device
        self.bank = bank.to(self.device)
        self.bank_chunk = max(1, int(bank_chunk))
        channels, spatial = bank.shape[1], tuple(bank.shape[2:])
        self.values = channels * math.prod(spatial)
        # Worst-case relative rounding of a float64 dot product / squared norm of length <= D.
        self.slack = 4 * (self.values + 8) * _UNIT_ROUNDOFF
        # Norms in float64 as brute force computes them; the bank itself stays in its own dtype
        # (exact distances convert the rows they need).
        norm_sq, norm = [], []
        for s0, s1 in self._chunks():
            rows = self.rows(torch.arange(s0, s1, device=self.device))
            norm_sq.append(rows.square().sum(1))
            norm.append(rows.norm(dim=1))
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.norm_sq = torch.cat(norm_sq) if norm_sq else empty
        self.norm = torch.cat(norm) if norm else empty
        # relative_l2 divides by the norm clamped the same way (a zero scan is infinitely far).
        self.safe_norm = self.norm.clamp_min(torch.finfo(torch.float64).tiny)
        if frequencies is None:
            frequencies = projection_frequencies(channels, spatial)
        self.levels = [self._level(LowFrequencyProjection(spatial, f, self.device))
                       for f in frequencies]

    def __len__(self) -> int:
        return self.bank.shape[0]

    def rows(self, scans: torch.Tensor) -> torch.Tensor:
        """Scans (indices) as float64 rows (n, D)."""
        return self.bank[scans].reshape(scans.numel(), -1).to(torch.float64)

    def _chunks(self):
        for start in range(0, len(self), self.bank_chunk):
            yield start, min(start + self.bank_chunk, len(self))

    def _level(self, projection: LowFrequencyProjection) -> _Level:
        if len(self) == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return _Level(projection, empty.reshape(0, 0), empty, empty, empty)
        coords = torch.cat([projection(self.bank[s:e]) for s, e in self._chunks()])
        coords_sq = coords.square().sum(1)
        low, high = self.remainder_interval(self.norm_sq, coords_sq)
        return _Level(projection, coords, coords_sq, low, high)

    def remainder_interval(self, norm_sq: torch.Tensor, coords_sq: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on ``||R x||`` from ``||x||^2 - ||P x||^2`` and their rounding."""
        rest = norm_sq - coords_sq
        error = self.slack * norm_sq
        return (rest - error).clamp_min(0).sqrt(), (rest + error).clamp_min(0).sqrt()

    # --- bounds ---------------------------------------------------------------------------------

    def _bound_sq(self, level: _Level, views: torch.Tensor, views_sq: torch.Tensor,
                  rest_low: torch.Tensor, rest_high: torch.Tensor,
                  scans: torch.Tensor | slice) -> torch.Tensor:
        """Squared lower bounds (A, n) on ``||w - s||`` for views (A, k) and the given scans."""
        coords, coords_sq = level.coords[scans], level.coords_sq[scans]
        # ||Pw - Ps||^2, lowered by its worst-case rounding (<= slack (||Pw||^2 + ||Ps||^2) * 2).
        shrink = 1.0 - 2.0 * self.slack
        projected = torch.addmm((shrink * coords_sq)[None], views, coords.T, alpha=-2.0)
        projected.add_((shrink * views_sq)[:, None]).clamp_(min=0)
        gap = torch.maximum(rest_low[:, None] - level.rest_high[scans][None],
                            level.rest_low[scans][None] - rest_high[:, None]).clamp_(min=0)
        return projected.addcmul_(gap, gap)

    # --- search ---------------------------------------------------------------------------------

    def search(self, views: ViewSource, num_queries: int, *,
               offsets: Sequence[Offset] = ((0, 0, 0),), chunk_size: int = 64,
               query_groups: Sequence[int] | None = None,
               bank_groups: Sequence[int] | None = None, exact_batch: int = 128,
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
            flat = flat.reshape((q1 - q0) * per_query, *block.shape[2:])
            exclude = (groups_q[q0:q1, None] == groups_b[None]) if grouped else None
            pairs = self._search_block(flat, q1 - q0, per_query, exclude, exact_batch,
                                       best[q0:q1], best_index[q0:q1], best_view[q0:q1])
            if progress is not None:
                progress(q1 - q0)
            return pairs

        # One block per worker thread, each single-threaded inside: the per-query work is many
        # small products, which intra-op threads slow down (badly so on a loaded machine).
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        starts = range(0, num_queries, rows)
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

    def _view_level(self, level: _Level, flat: torch.Tensor, norm_sq: torch.Tensor):
        coords = level.projection(flat)
        coords_sq = coords.square().sum(1)
        low, high = self.remainder_interval(norm_sq, coords_sq)
        return coords, coords_sq, low, high

    def _search_block(self, flat: torch.Tensor, queries: int, per_query: int,
                      exclude: torch.Tensor | None, exact_batch: int, best: torch.Tensor,
                      best_index: torch.Tensor, best_view: torch.Tensor) -> int:
        """Fill ``best*`` (views of ``queries`` queries, per_query each). Returns exact pairs."""
        vectors = flat.reshape(flat.shape[0], -1).to(torch.float64)        # (q V, D)
        norm_sq = vectors.square().sum(1)
        per_level = [self._view_level(level, flat, norm_sq) for level in self.levels]
        coarse, *finer = self.levels
        coords, coords_sq, low, high = per_level[0]
        # 1. coarse bound for every pair: min over the query's views, bank chunk by chunk.
        bounds = torch.empty((queries, len(self)), dtype=torch.float64, device=self.device)
        for s0, s1 in self._chunks():
            pairs = self._bound_sq(coarse, coords, coords_sq, low, high, slice(s0, s1))
            bounds[:, s0:s1] = pairs.reshape(queries, per_query, s1 - s0).amin(1)
        bounds = bounds.sqrt_().div_(self.safe_norm[None]).mul_(1.0 - 1e-12)  # rounded down
        exact_pairs = 0
        for q in range(queries):
            rows = slice(q * per_query, (q + 1) * per_query)
            allowed = None if exclude is None else ~exclude[q]
            exact_pairs += self._one_query(vectors[rows], [tuple(t[rows] for t in lv)
                                                           for lv in per_level[1:]],
                                           bounds[q], allowed, finer, exact_batch, best,
                                           best_index, best_view, q)
        return exact_pairs

    def _one_query(self, vectors: torch.Tensor, finer_views: list, bounds: torch.Tensor,
                   allowed: torch.Tensor | None, finer: list[_Level], exact_batch: int,
                   best: torch.Tensor, best_index: torch.Tensor, best_view: torch.Tensor,
                   q: int) -> int:
        order = torch.argsort(bounds)
        if allowed is not None:
            order = order[allowed[order]]
        if order.numel() == 0:
            return 0
        # A first exact batch (the most promising scans) sets the running best.
        seed = max(1, exact_batch // 16)
        value, index, view = self._exact(vectors, order[:seed])
        running, exact_pairs = value, min(seed, order.numel())
        candidates, candidate_bounds = order[seed:], bounds[order[seed:]]
        keep = candidate_bounds <= running
        candidates, candidate_bounds = candidates[keep], candidate_bounds[keep]
        for level, (coords, coords_sq, low, high) in zip(finer, finer_views):
            if candidates.numel() == 0:
                break
            finer_bounds = self._bound_sq(level, coords, coords_sq, low, high, candidates)
            finer_bounds = finer_bounds.amin(0).sqrt_().div_(self.safe_norm[candidates])
            finer_bounds.mul_(1.0 - 1e-12)
            candidate_bounds = torch.maximum(candidate_bounds, finer_bounds)
            keep = candidate_bounds <= running
            candidates, candidate_bounds = candidates[keep], candidate_bounds[keep]
            resort = torch.argsort(candidate_bounds)
            candidates, candidate_bounds = candidates[resort], candidate_bounds[resort]
        # 3. exact distances in increasing bound order until the next bound exceeds the best.
        start = 0
        while start < candidates.numel():
            if float(candidate_bounds[start]) > running:
                break
            stop = min(start + exact_batch, candidates.numel())
            batch = candidates[start:stop][candidate_bounds[start:stop] <= running]
            b_value, b_index, b_view = self._exact(vectors, batch)
            exact_pairs += batch.numel()
            if b_value < running:
                running, index, view = b_value, b_index, b_view
            start = stop
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
