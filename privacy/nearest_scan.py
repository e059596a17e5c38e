"""Exact nearest-scan search for the gate's shift-tolerant relative L2 distance.

The distance (:mod:`privacy.gate`, ``latent`` and ``nrmse``) from a candidate to a scan ``s`` is

    d(q, s) = min_j ||w_j - s||_2 / ||s||_2,

over the candidate's *effective views* ``w_j``: each of its T views (latent translates) under each
site-side offset (a circular :func:`torch.roll`; a roll permutes values, so it is applied to the
view first). With every vector centred on one fixed reference ``r`` (the bank's mean; a common
shift leaves every difference unchanged), ``a = w - r``, ``b = s - r``:

    ||w - s||^2 = ||a||^2 + ||b||^2 - 2 <a, b>,

so the search is about the V x N x M inner products ``<a, b>``. Centring makes ``||a||, ||b||``
(and so every error bound below) of the size of the differences between scans, not of the scans.
The search runs three stages, each a rigorous bound, so that the answer is brute force's:

1. **int8 lower bounds for every pair** (:func:`quantize`, :func:`integer_products`). Each
   centred vector is written ``a = s_a A + e_a``: ``A`` int8 codes (|A_i| <= 127), ``s_a`` a scale
   (one per candidate, shared by its views; one per scan), ``e_a`` the rounding residual. The
   integer products ``<A, B>`` are EXACT (int32 accumulation, ``torch._int_mm``: AVX-512 VNNI on this
   AMD EPYC, about 8x its float32 rate; in slices short enough never to overflow), and

       |<a, b> - s_a s_b <A, B>| <= ||s_a A|| ||e_b|| + ||e_a|| ||b||      (Cauchy-Schwarz),

   a bound of about 1-2% of ``||a|| ||b||`` (it grows with the data's peak-to-RMS ratio).
   Minimised over the views, it gives a lower bound on d(q, s) for every pair at the cost of one
   int8 matrix product.
2. **Running best.** The two scans with the lowest bounds get the exact float64 distance (over
   the views the int8 stage marks for them, see 3); their minimum ``U`` is an upper bound on the
   answer. Every scan whose lower bound exceeds ``U`` is
   farther than a scan already found and is dropped (exclusions, e.g. same patient, first).
3. **float32 bounds, then float64, for the survivors only.** The survivors' float32 products of
   the centred vectors (:meth:`ScanIndex.bounds`; only for the views whose own int8 bound does
   not rule them out) with the rounding bound

       |G - <a, b>| <= (gamma_D (1 + u)^2 + 2 u + u^2) ||a|| ||b||,   u = 2^-24,

   (Higham, Accuracy and Stability of Numerical Algorithms, 3.1 and Cauchy-Schwarz: inputs
   rounded from float64, any summation order; :func:`full_float32_products` turns TF32 and
   bfloat16 passes off around them) narrow the survivors to a ~1e-5 band around the nearest
   distance; those get the brute-force formula (:func:`relative_l2`: ``torch.cdist`` in float64)
   in increasing lower-bound order, stopping when the next bound exceeds the running best. The
   float32 and float64 stages use only the views marked for some scan in their batch: a view is
   unmarked for a scan only where its own int8 bound exceeds an upper bound on the nearest
   distance, so the nearest scan's nearest view is always among them, and leaving views out can
   only raise the minimum of a scan that is not nearest.

Norms and every float64 assembly are covered by ``4 (D + 8) 2^-53`` of the terms' magnitudes, and
bounds after a square root and a division by ``||s||`` by a relative margin of 1e-12. The returned
distance is brute force's float64 value for a truly nearest scan (differences with brute force are
that formula's own rounding, <= ~1e-8 of the norms for a copy at ~0); ties keep a nearest scan, not
necessarily brute force's index.

How much the int8 stage prunes depends on the data, never the answer: it drops the scans farther
than about 1.03-1.04x the nearest distance. On the benchmark's structured latents (tissue mixtures,
scanner contrasts, atrophy, per-patient fields, noise; ~5% of all scans lie within 1.07x of a
candidate's nearest distance) 96% of the pairs are settled there, and the survivors need float32
products for about one of their 27 views (the int8 stage also marks, per pair, the views whose own
bound can still be nearest). Data where many scans sit within a few percent of the nearest
distance, or a bank of far-apart clusters (the centred vectors then dwarf the distances inside a
cluster, and the int8 grid is coarse next to them), leave more survivors for the float32 stage:
slower, still exact. Lower-dimensional orthonormal projections (Haar low-pass at 1,536, 192, 24
dims) were measured as a first stage on the same data and left 49-70% of the pairs (the
differences between patients are spread over most of the 12,288 values), so none is used.

``prefilter=False`` skips stage 1 (the float32 bound for every pair, then float64: the previous
search, kept as the benchmark's baseline).

Memory: with the int8 stage, candidates go in blocks of ``max(chunk_size, min(2048, 2^25 / D))``
effective views (the int8 product runs ~35% faster at ~1000 rows than at ~500), as given (float32
for latents; float64 one candidate at a time), plus the block's float32 centred copy and codes; the
int8 products go 1,024 scans at a time (a float64 scratch of views x 1,024); survivors go
``bank_chunk`` scans at a time. Without it, blocks of at most ``chunk_size`` views against
``bank_chunk`` scans. The index holds the bank as given plus its centred float32 copy and int8
codes (M D 5 bytes). Everything runs on the index's device (CUDA included: ``_int_mm`` there
needs padded shapes, which :func:`integer_products` pads; a device without an int8 product falls
back to exact float64 products of the codes); on the CPU, blocks of candidates are shared among
``torch.get_num_threads()`` worker threads, each running its products single-threaded.
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
_INT8_LIMIT = 127
# Products of int8 codes accumulate exactly in int32 over at most this many values.
_INT32_SAFE_LENGTH = (2 ** 31 - 1) // _INT8_LIMIT ** 2
# Effective views per block of the int8 stage (its rate grows ~25% from 243 to 972 rows and
# ~35% from 540 to 1080), at most _BLOCK_VALUES values (128 MiB of float32 views).
_BLOCK_VIEWS = 2048
_BLOCK_VALUES = 2 ** 25
# Scans per int8 product: its float64 scratch (views x scans) stays ~16 MiB at 2048 views.
_INT8_BANK_CHUNK = 1024
# Scans per candidate that get the exact distance first, to start the running best.
_SEED_SCANS = 2


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
class Quantized:
    """Rows ``x`` (n, D) float64 written ``x = scale * codes + residual``.

    codes: int8 (n, D') (D' >= D, zero-padded to a multiple of 8); scale: float64 (n,) > 0;
    norm: ``||x||`` (n,) (float64); code_norm >= ``||scale * codes||`` and residual_norm >=
    ``||residual||`` (n,), rounded up; centered32: ``x`` in float32 (n, D) if kept."""

    codes: torch.Tensor
    scale: torch.Tensor
    norm: torch.Tensor
    code_norm: torch.Tensor
    residual_norm: torch.Tensor
    centered32: torch.Tensor | None = None


def quantize(rows: torch.Tensor, group: int = 1, center: torch.Tensor | None = None,
             keep_float32: bool = False) -> Quantized:
    """Rows (n, D) (in float64, less ``center`` (D,) if given) -> int8 codes (and, with
    ``keep_float32``, the centred rows rounded to float32), one scale per ``group``
    consecutive rows (n % group == 0): the group's largest |value| / 127, codes = round(x /
    scale). (Clipping the range at 3-6 RMS, so that outliers saturate, was measured: it loosens
    the bound on the benchmark's latents, whose values are heavy-tailed.)"""
    n, length = rows.shape
    codes = torch.zeros((n, length + (-length % 8)), dtype=torch.int8, device=rows.device)
    scale, norm, residual_norm = (torch.empty(n, dtype=torch.float64, device=rows.device)
                                  for _ in range(3))
    single = (torch.empty((n, length), dtype=torch.float32, device=rows.device)
              if keep_float32 else None)
    step = group * max(1, 32 // group)        # slices of whole groups that stay in cache
    scratch = torch.empty((min(step, n), length), dtype=torch.float32, device=rows.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        x = (torch.sub(rows[r0:r1], center).to(torch.float64) if center is not None
             else rows[r0:r1].to(torch.float64, copy=True))         # a scratch copy
        if single is not None:
            rounded = single[r0:r1]
            rounded.copy_(x)
        else:
            rounded = x.to(torch.float32)
        torch.linalg.vector_norm(x, dim=1, out=norm[r0:r1])
        # Any integer codes make a valid bound (the residual is measured in float64), so the
        # scale and codes come from the float32 copy (half the memory traffic).
        # (vector_norm(inf) and aminmax are 20x slower than amax and amin)
        peak = torch.maximum(rounded.amax(1), rounded.amin(1).neg_()).to(torch.float64)
        spread = peak.reshape(-1, group).amax(1).repeat_interleave(group)
        s = torch.where(spread > 0, spread / _INT8_LIMIT, torch.ones_like(spread))
        q = torch.mul(rounded, (1.0 / s).to(torch.float32)[:, None],
                      out=scratch[:r1 - r0]).round_().clamp_(-_INT8_LIMIT, _INT8_LIMIT)
        scale[r0:r1] = s
        torch.linalg.vector_norm(x.addcmul_(q, s[:, None], value=-1.0), dim=1,
                                 out=residual_norm[r0:r1])
        codes[r0:r1, :length] = q
    # The residual is computed within a few roundings of |x| and rounded up by the float64 slack;
    # ||scale * codes|| = ||x - residual|| <= ||x|| + ||residual||.
    slack = 4 * (length + 8) * _FLOAT64_ROUNDOFF
    residual_norm = residual_norm * (1 + slack) + slack * norm
    return Quantized(codes, scale, norm, (norm + residual_norm) * (1 + slack), residual_norm,
                     single)


def integer_products(left: torch.Tensor, right: torch.Tensor,
                     column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """EXACT inner products of int8 rows: (n, D) x (m, D) -> float64 (n, m), each column times
    ``column_scale`` (m,) float64 if given (one float64 rounding).

    int32 accumulation (``torch._int_mm``) over slices of at most 133,144 values, which cannot
    overflow (127^2 per product), summed in float64 (exact below 2^53). On CUDA the operands are
    zero-padded to the shapes ``_int_mm`` takes there; where it is not available, float64 products
    of the codes (exact too, slower)."""
    n, m = left.shape[0], right.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((n, m), dtype=torch.float64, device=left.device)
    if left.device.type == "cuda":
        left = torch.nn.functional.pad(left, (0, 0, 0, max(17, -(-n // 8) * 8) - n))
        right = torch.nn.functional.pad(right, (0, 0, 0, -m % 8))
    total, sliced = None, left.shape[1] > _INT32_SAFE_LENGTH
    for k0 in range(0, left.shape[1], _INT32_SAFE_LENGTH):
        a = left[:, k0:k0 + _INT32_SAFE_LENGTH]
        b = right[:, k0:k0 + _INT32_SAFE_LENGTH]
        if sliced:
            a, b = a.contiguous(), b.contiguous()
        try:
            part = torch._int_mm(a, b.T)
        except (RuntimeError, NotImplementedError, AttributeError):
            part = torch.matmul(a.to(torch.float64), b.to(torch.float64).T)
        total = part if total is None else total.to(torch.float64).add_(part)
    total = total[:n, :m]
    if column_scale is None:
        return total.to(torch.float64)
    return total * column_scale[None]         # int32 x float64 -> float64 in one pass


@dataclass(frozen=True)
class SearchResult:
    """Per query: distance float64 (N,) (inf where every scan was excluded), the nearest scan's
    index int64 (N,) (-1 then), the effective view that reached it int64 (N,); how many
    candidate-scan pairs needed an exact float64 distance, how many a float32 bound (the rest were
    settled by the int8 bounds), of ``pairs`` in all, and how many (view, scan) float32 products
    those took (the int8 stage leaves out views that cannot be nearest). Effective view ``j`` is view
    ``j % views_per_offset`` under offset ``j // views_per_offset``."""

    distance: np.ndarray
    index: np.ndarray
    view: np.ndarray
    exact_pairs: int
    pairs: int
    views_per_offset: int = 1
    float32_pairs: int = 0
    float32_view_pairs: int = 0


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
        norm, centered, centered_norm, quantized = [], [], [], []
        for s0, s1 in self._chunks():
            rows = self.rows(torch.arange(s0, s1, device=self.device))
            norm.append(rows.norm(dim=1))
            rows -= self.center
            centered.append(rows.to(torch.float32))
            centered_norm.append(rows.norm(dim=1))
            quantized.append(quantize(rows))
        self.norm = torch.cat(norm) if norm else empty
        # relative_l2 divides by the norm clamped the same way (a zero scan is infinitely far).
        self.safe_norm = self.norm.clamp_min(torch.finfo(torch.float64).tiny)
        self.centered = (torch.cat(centered) if centered
                         else torch.zeros((0, self.values), device=self.device))
        self.centered_norm = torch.cat(centered_norm) if centered_norm else empty
        padded = self.values + (-self.values % 8)
        self.codes = (torch.cat([q.codes for q in quantized]) if quantized
                      else torch.zeros((0, padded), dtype=torch.int8, device=self.device))
        self.code_scale = torch.cat([q.scale for q in quantized]) if quantized else empty
        self.code_norm = torch.cat([q.code_norm for q in quantized]) if quantized else empty
        self.residual_norm = (torch.cat([q.residual_norm for q in quantized]) if quantized
                              else empty)
        # Per scan: ||b||^2 less the float64 slack of everything the bound adds up (see
        # _int8_lower_bounds).
        self._scan_term_slack = (4 * self.float64_slack
                                 * (self.centered_norm + self.residual_norm).square())
        self._scan_term = self.centered_norm.square() - self._scan_term_slack

    def __len__(self) -> int:
        return self.bank.shape[0]

    def rows(self, scans: torch.Tensor) -> torch.Tensor:
        """Scans (indices) as float64 rows (n, D)."""
        return self.bank[scans].reshape(scans.numel(), -1).to(torch.float64)

    def _chunks(self, size: int | None = None):
        size = size or self.bank_chunk
        for start in range(0, len(self), size):
            yield start, min(start + size, len(self))

    def bounds(self, vectors: torch.Tensor, start: int = 0, stop: int | None = None, *,
               scans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds (n, m) on the relative distance of views ``vectors`` (n, D)
        float64 to scans [start, stop) (or the indices ``scans``): one float32 product and its
        rounding bound."""
        if scans is None:
            stop = len(self) if stop is None else stop
            scans = slice(start, stop)
        centered = vectors - self.center
        return self._float32_bounds(centered.to(torch.float32), centered.norm(dim=1), scans)

    def _float32_bounds(self, centered32: torch.Tensor, a_norm: torch.Tensor,
                        scans: torch.Tensor | slice, scratch: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`bounds` of centred views, given in float32 (n, D) with their float64 norms
        (n,): ``fl32`` of the float64 centred vectors, as the rounding bound assumes. Scans
        given by index are gathered into ``scratch`` (>= len(scans) rows of D float32) if given
        (a fresh buffer per call costs as much as the copy)."""
        a_norm = a_norm[:, None]
        b_norm = self.centered_norm[None, scans]
        if isinstance(scans, slice):
            rows = self.centered[scans]
        elif scratch is not None:
            rows = torch.index_select(self.centered, 0, scans, out=scratch[:scans.numel()])
        else:
            rows = self.centered.index_select(0, scans)
        with full_float32_products():
            products = torch.matmul(centered32, rows.T)
        products = products.to(torch.float64)
        squares = a_norm.square() + b_norm.square()
        error = (2.0 * self.factor) * a_norm * b_norm + self.float64_slack * squares
        estimate = squares - 2.0 * products
        scale = self.safe_norm[None, scans]
        low = (estimate - error).clamp_min_(0).sqrt_().div_(scale).mul_(1.0 - _MARGIN)
        high = (estimate + error).clamp_min_(0).sqrt_().div_(scale).mul_(1.0 + _MARGIN)
        return low, high

    def int8_lower_bounds(self, vectors: torch.Tensor, per_query: int,
                          exclude: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, Quantized, torch.Tensor | None]:
        """Lower bounds (q, M) on d(query, scan) for queries of ``per_query`` views each
        (``vectors`` (q * per_query, D), any float dtype), from exact int8 products (module
        docstring); inf where ``exclude`` (q, M) is true. Also the views' codes, norms and
        float32 centred copy, and (up to 63 views per query) a bit mask (q, M) int64 of the
        views that may still be nearest: bit ``j`` is clear only where view ``j``'s own lower
        bound exceeds an upper bound on the query's nearest distance (the best int8 upper bound
        seen so far), so that view cannot reach that scan's nearest distance; 0 where the pair's
        own lower bound already exceeded that upper bound (it is never the nearest scan).

        For view ``a`` and scan ``b`` with ``a = s_a A + e_a``, ``b = s_b B + e_b``:
        ``||a - b||^2 >= ||a||^2 + ||b||^2 - 2 s_a s_b <A, B> - 2 E - slack`` with
        ``E = ||s_a A|| ||e_b|| + ||e_a|| ||b||``, and ``<= ... + 2 E + slack``. The scale s_a
        and the largest E over a query's views are per query, so the minimum over views is of
        ``||a||^2 / s_a - 2 s_b <A, B>`` alone (s_a > 0). ``slack = 4 (D + 8) 2^-53 x 4 ((||a||
        + ||e_a||)^2 + (||b|| + ||e_b||)^2)`` bounds every float64 rounding (each summed term is
        at most that size), with ``||a|| + ||e_a||`` the query's largest."""
        queries = vectors.shape[0] // per_query
        coded = quantize(vectors, per_query, self.center, keep_float32=True)
        a_norm = coded.norm
        largest = (a_norm + coded.residual_norm).reshape(queries, per_query).amax(1)
        query_slack = 4 * self.float64_slack * largest.square()                     # (q,)
        query_scale = coded.scale.reshape(queries, per_query)[:, 0]                 # (q,)
        view_term = ((a_norm.square() - query_slack.repeat_interleave(per_query))
                     / coded.scale)                                                # (qV,)
        code_norm = coded.code_norm.reshape(queries, per_query).amax(1)[:, None]
        residual_norm = coded.residual_norm.reshape(queries, per_query).amax(1)[:, None]
        lower = torch.empty((queries, len(self)), dtype=torch.float64, device=self.device)
        masked = per_query <= 63
        # Zero (no view) where a pair was pruned when its chunk was bounded: its int8 lower bound
        # exceeded an upper bound on the nearest distance, so it is never the nearest scan.
        view_mask = (torch.zeros((queries, len(self)), dtype=torch.int64, device=self.device)
                     if masked else None)
        bits = 2 ** torch.arange(per_query, device=self.device)[None, :, None]
        ceiling = torch.full((queries, 1), math.inf, dtype=torch.float64, device=self.device)
        for s0, s1 in self._chunks(min(self.bank_chunk, _INT8_BANK_CHUNK)):
            products = integer_products(coded.codes, self.codes[s0:s1],
                                        -2.0 * self.code_scale[s0:s1])    # (qV, m)
            products.add_(view_term[:, None])
            per_view = products.reshape(queries, per_query, s1 - s0)
            error = 2.0 * (code_norm * self.residual_norm[None, s0:s1]
                           + residual_norm * self.centered_norm[None, s0:s1])      # 2 E (q, m)
            rest = self._scan_term[None, s0:s1] - error
            squared = per_view.amin(1).mul_(query_scale[:, None]).add_(rest)   # lower^2 ||s||^2
            norm = self.safe_norm[None, s0:s1]
            upper = ((squared + 2.0 * error + 2.0 * query_slack[:, None]
                      + 2.0 * (self._scan_term_slack[None, s0:s1]))
                     .clamp_min(0).sqrt_().div_(norm).mul_(1.0 + _MARGIN))
            low = squared.clamp_min_(0).sqrt_().div_(norm).mul_(1.0 - _MARGIN)
            if exclude is not None:
                low.masked_fill_(exclude[:, s0:s1], math.inf)
                upper.masked_fill_(exclude[:, s0:s1], math.inf)
            lower[:, s0:s1] = low
            ceiling = torch.minimum(ceiling, upper.amin(1, keepdim=True))
            if masked:
                # View j may matter only if its own bound is <= ceiling (with a relative 1e-9
                # for the roundings of this comparison, so the mask only errs on keeping); only
                # for the pairs that are not already pruned (the others' masks are never read).
                q_kept, m_kept = torch.nonzero(low <= ceiling, as_tuple=True)
                limit = (((ceiling[q_kept, 0] * norm[0, m_kept]).square_().mul_(1.0 + 1e-9)
                          - rest[q_kept, m_kept]) / query_scale[q_kept])
                limit += 1e-9 * limit.abs()
                kept_views = per_view[q_kept, :, m_kept]                      # (kept, V)
                view_mask[q_kept, m_kept + s0] = ((kept_views <= limit[:, None]) * bits[0, :, 0]
                                                  ).sum(1)
        return lower, coded, view_mask

    def search(self, views: ViewSource, num_queries: int, *,
               offsets: Sequence[Offset] = ((0, 0, 0),), chunk_size: int = 64,
               query_groups: Sequence[int] | None = None,
               bank_groups: Sequence[int] | None = None, exact_batch: int = 64,
               prefilter: bool = True,
               progress: Callable[[int], None] | None = None) -> SearchResult:
        """Exact nearest scan for each of ``num_queries`` queries.

        views: (N, T, C, *S) or a :data:`ViewSource`; every view is also rolled by every offset
        (V = T x len(offsets) effective views, offset-major: view ``j`` is offset ``j // T``).
        ``query_groups`` (N,) / ``bank_groups`` (M,): pairs in the same group are skipped.
        With ``prefilter`` (the int8 stage), equal blocks of about ``max(chunk_size, min(2048,
        2^25 / D))`` effective views; without it, blocks of at most ``chunk_size`` views (one
        query at least either way).
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
        block_views = (max(chunk_size, min(_BLOCK_VIEWS, _BLOCK_VALUES // self.values))
                       if prefilter else chunk_size)
        rows = max(1, block_views // per_query)
        if prefilter:       # equal blocks: a small last block would run the int8 product slowly
            rows = -(-num_queries // -(-num_queries // rows))

        def one_block(q0: int) -> tuple[int, int, int]:
            q1 = min(q0 + rows, num_queries)
            block = self._views(views, source, q0, q1)
            if block.shape[0] != q1 - q0 or block.shape[2:] != self.bank.shape[1:]:
                raise ValueError(f"query views {tuple(block.shape)} do not match the bank "
                                 f"{tuple(self.bank.shape)}")
            flat = (block[:, None] if len(offsets) == 1 and not any(offsets[0])
                    else torch.stack([rolled(block, o) for o in offsets], dim=1))  # (q, O, T, ..)
            vectors = flat.reshape((q1 - q0) * per_query, -1)
            exclude = (groups_q[q0:q1, None] == groups_b[None]) if grouped else None
            search_block = self._search_block if prefilter else self._search_block_float32
            counts = search_block(vectors, q1 - q0, per_query, exclude, exact_batch,
                                  best[q0:q1], best_index[q0:q1], best_view[q0:q1])
            if progress is not None:
                progress(q1 - q0)
            return counts

        # On the CPU, blocks are shared among torch.get_num_threads() worker threads, each
        # single-threaded inside: intra-op threads on a shared machine mostly wait for a busy
        # core (measured 10x slower at load 8 on 2 cores).
        # The precision is set here, once, so that worker threads never restore a reduced one.
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        starts = range(0, num_queries, rows)
        with full_float32_products():
            if threads <= 1:
                counts = list(map(one_block, starts))
            else:
                torch.set_num_threads(1)
                try:
                    with ThreadPoolExecutor(max_workers=threads) as pool:
                        counts = list(pool.map(one_block, starts))
                finally:
                    torch.set_num_threads(threads)
        exact_pairs, float32_pairs, float32_views = (sum(c[i] for c in counts) for i in range(3))
        return SearchResult(best.numpy(), best_index.numpy(), best_view.numpy(), exact_pairs,
                            num_queries * len(self), first.shape[1], float32_pairs,
                            float32_views)

    def _views(self, views: ViewSource, source, start: int, stop: int) -> torch.Tensor:
        block = source(slice(start, stop)) if source is not None else views(start, stop)
        if block.ndim != self.bank.ndim + 1:
            raise ValueError(f"query views must be (N, T, C, D, H, W), got {tuple(block.shape)}")
        return block.to(self.device)

    def _search_block(self, vectors: torch.Tensor, queries: int, per_query: int,
                      exclude: torch.Tensor | None, exact_batch: int, best: torch.Tensor,
                      best_index: torch.Tensor, best_view: torch.Tensor
                      ) -> tuple[int, int, int]:
        """Fill ``best*`` for ``queries`` queries of ``per_query`` views each (vectors
        (queries * per_query, D)): int8 bounds for every pair, then float32 and float64 for the
        survivors. Returns the numbers of float64 pairs, float32 pairs and float32 (view, scan)
        products."""
        lower, coded, view_mask = self.int8_lower_bounds(vectors, per_query, exclude)
        seeds = min(_SEED_SCANS, len(self))
        seed_bounds, seed_scans = torch.topk(lower, seeds, dim=1, largest=False)
        exact_pairs = float32_pairs = float32_views = 0
        scratch = self.centered.new_empty((0, self.values))     # survivors' float32 rows
        for q in range(queries):
            views = slice(q * per_query, (q + 1) * per_query)
            query_views = vectors[views]
            seed = seed_scans[q][torch.isfinite(seed_bounds[q])]
            if seed.numel() == 0:
                continue                                   # every scan excluded

            def exact(scans: torch.Tensor) -> tuple[float, int, int]:
                # Over the views whose bit is set for some of ``scans`` (all if none is): for
                # the nearest scan they include its nearest view, for any other scan the
                # minimum can only grow, so the nearest distance is unchanged.
                chosen = (self._marked_views(view_mask[q, scans], per_query)
                          if view_mask is not None else None)
                if chosen is None or chosen.numel() == 0:
                    return self._exact(query_views.to(torch.float64), scans)
                value, b_index, b_view = self._exact(
                    query_views.index_select(0, chosen).to(torch.float64), scans)
                return value, b_index, int(chosen[b_view])

            running, index, view = exact(seed)
            exact_pairs += seed.numel()
            keep = lower[q] <= running          # running may be inf (a zero scan): exclusions
            if exclude is not None:
                keep &= ~exclude[q]
            keep[seed] = False
            survivors = torch.nonzero(keep).flatten()
            # Only the views that may be nearest for some survivor: a view whose int8 bound
            # exceeds an upper bound on the nearest distance cannot reach it, so leaving it out
            # of a survivor's minimum can only drop scans that are not nearest.
            centered32, norms = coded.centered32[views], coded.norm[views]
            if view_mask is not None and survivors.numel():
                needed = self._marked_views(view_mask[q, survivors], per_query)
                if needed.numel() == 0:
                    survivors = survivors[:0]   # none can be nearest: the seeds hold it
                centered32, norms = centered32[needed], norms[needed]
                float32_views += needed.numel() * survivors.numel()
            else:
                float32_views += per_query * survivors.numel()
            # float32 bounds of the survivors, bank_chunk at a time; a survivor's upper bound
            # below the running best prunes the others further.
            ceiling, lows = running, []
            if survivors.numel() > scratch.shape[0]:
                scratch = self.centered.new_empty((min(self.bank_chunk, 2 * survivors.numel()),
                                                   self.values))
            for start in range(0, survivors.numel(), self.bank_chunk):
                low, high = self._float32_bounds(centered32, norms,
                                                 survivors[start:start + self.bank_chunk],
                                                 scratch)
                lows.append(low.amin(0))
                ceiling = min(ceiling, float(high.amin()))
            float32_pairs += survivors.numel()
            low = torch.cat(lows) if lows else lower[q, :0]
            keep = low <= ceiling
            survivors, bounds = survivors[keep], low[keep]
            order = torch.argsort(bounds)
            survivors, bounds = survivors[order], bounds[order]
            for start in range(0, survivors.numel(), exact_batch):
                if float(bounds[start]) > running:
                    break
                stop = start + exact_batch
                batch = survivors[start:stop][bounds[start:stop] <= running]
                value, b_index, b_view = exact(batch)
                exact_pairs += batch.numel()
                if value < running:
                    running, index, view = value, b_index, b_view
            best[q], best_index[q], best_view[q] = running, index, view
        return exact_pairs, float32_pairs, float32_views

    def _marked_views(self, masks: torch.Tensor, per_query: int) -> torch.Tensor:
        """The views (indices, increasing) whose bit is set in any of ``masks`` (n,) int64."""
        bits = torch.arange(per_query, device=self.device)
        return ((masks[:, None] >> bits) & 1).amax(0).nonzero().flatten()

    def _search_block_float32(self, vectors: torch.Tensor, queries: int, per_query: int,
                              exclude: torch.Tensor | None, exact_batch: int, best: torch.Tensor,
                              best_index: torch.Tensor, best_view: torch.Tensor
                              ) -> tuple[int, int, int]:
        """:meth:`_search_block` without the int8 stage: float32 bounds for every pair."""
        vectors = vectors.to(torch.float64)
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
        return exact_pairs, queries * len(self), queries * len(self) * per_query

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
