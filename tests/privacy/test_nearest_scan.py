"""The exact nearest-scan search (privacy.nearest_scan: int8 bounds, float32 GEMM bounds,
float64 checks) against brute force.

Each test would fail if a bound could miss the true distance (a nearer scan dropped): the data
make the nearest scan hard to tell from others: near ties (some below float32 resolution), exact
duplicates, zero volumes, copies under a roll.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.benchmarks.gate_throughput import synthetic_hospital
from privacy.gate import (between_patient_distances, brute_force_nearest_scans,
                          calibrated_threshold, decide, nearest_scans, translations)
import privacy.nearest_scan as nearest_scan
from privacy.nearest_scan import (ScanIndex, brute_force_search, dot_error_factor,
                                  integer_products, quantize, relative_l2)

# Both sides use the matrix-product form of cdist in float64: a copy's distance (~0) carries its
# cancellation, sqrt(1e-16) ~ 1e-8 of the norms; any pruning error would be of the data's scale.
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth(count: int, generator: torch.Generator, channels: int = 3, size: int = 8) -> torch.Tensor:
    """Smooth random volumes (count, C, S, S, S) plus a little noise."""
    coarse = torch.randn((count, channels, size // 4, size // 4, size // 4), generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear")
    return fine + 0.05 * torch.randn(fine.shape, generator=generator)


def tied_bank(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank with near ties (copies perturbed by 1e-7), exact duplicates and zero volumes, and
    queries near some of them (views (N, 4, C, S, S, S)) including a zero query."""
    base = smooth(40, generator)
    near = base[:10] + 1e-7 * torch.randn(base[:10].shape, generator=generator)
    bank = torch.cat([base, near, base[:5].clone(), torch.zeros((2, *base.shape[1:])),
                      2 * base[10:15]]).to(torch.float64)
    queries = torch.cat([base[:6] + 1e-8 * torch.randn(base[:6].shape, generator=generator),
                         smooth(10, generator).to(torch.float64), base[20:24].to(torch.float64),
                         torch.zeros((1, *base.shape[1:]), dtype=torch.float64)])
    views = torch.stack([queries, *(queries + 0.3 * smooth(len(queries), generator)
                                    for _ in range(3))], dim=1)
    return bank, views


def test_float32_bounds_enclose_the_true_distance() -> None:
    """Lower <= true <= upper for every pair, from float64 inputs that float32 cannot hold, with
    near copies (cancellation), zero volumes, and whatever torch's global float32 matmul precision."""
    generator = torch.Generator().manual_seed(0)
    bank = smooth(30, generator, size=12).to(torch.float64) * (1 + 1e-9)
    bank = torch.cat([bank, torch.zeros((1, *bank.shape[1:]), dtype=torch.float64)])
    queries = torch.cat([bank[:5] + 1e-6 * torch.randn(bank[:5].shape, generator=generator,
                                                       dtype=torch.float64),
                         smooth(10, generator, size=12).to(torch.float64), bank[:2],
                         torch.zeros((1, *bank.shape[1:]), dtype=torch.float64)])
    index = ScanIndex(bank)
    flat = queries.reshape(len(queries), -1)
    true = relative_l2(flat, index.rows(torch.arange(len(bank))), index.norm)
    finite = torch.isfinite(true)
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):   # a reduced global setting is overridden
            torch.set_float32_matmul_precision(precision)
            low, high = index.bounds(flat)
            assert torch.get_float32_matmul_precision() == precision   # and restored
            assert torch.all(low[finite] <= true[finite] * (1 + 1e-12) + 1e-12)
            assert torch.all(high[finite] >= true[finite] * (1 - 1e-12) - 1e-12)
            # Tight enough to settle pairs that are not copies (a copy's bound is sqrt(error)
            # wide: the float64 check settles it).
            apart = finite & (true > 0.05) & (index.norm > 0)[None]
            assert float((high - low)[apart].max()) < 1e-3
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dot_error_factor_is_the_stated_bound() -> None:
    u = 2.0 ** -24
    gamma = 1000 * u / (1 - 1000 * u)
    assert dot_error_factor(1000, u) == pytest.approx(gamma * (1 + u) ** 2 + 2 * u + u * u)
    with pytest.raises(ValueError):
        dot_error_factor(2 ** 23, 2.0 ** -24)


def test_ties_below_float32_resolution_are_settled_in_float64() -> None:
    """Scans that are rolls of one volume (equal norms, equal distances to a constant query) with
    1e-9 perturbations: float32 cannot order them, so every one is checked in float64 and the
    answer (distance AND index) is brute force's; far scans are still settled by the bounds."""
    generator = torch.Generator().manual_seed(5)
    base = smooth(1, generator, channels=2).to(torch.float64)
    ties = torch.cat([torch.roll(base, (i, j, 0), dims=(2, 3, 4)) for i in range(4)
                      for j in range(4)])
    ties = ties + 1e-9 * torch.randn(ties.shape, generator=generator, dtype=torch.float64)
    far = 3.0 + smooth(20, generator, channels=2).to(torch.float64)
    bank = torch.cat([far[:10], ties, far[10:]])
    queries = torch.full((3, 1, *base.shape[1:]), float(base.mean()), dtype=torch.float64)
    queries[1] += 0.01
    queries[2] -= 0.01
    found = ScanIndex(bank, bank_chunk=7).search(queries, 3, chunk_size=1, exact_batch=4)
    flat_bank = bank.reshape(len(bank), -1)
    exact = relative_l2(queries.reshape(3, -1), flat_bank, flat_bank.norm(dim=1))
    assert np.max(np.abs(found.distance - brute_force_search(queries, bank))) <= 1e-12
    assert found.index.tolist() == exact.argmin(1).tolist()
    assert np.all((found.index >= 10) & (found.index < 26))
    assert 3 * len(ties) <= found.exact_pairs < found.pairs
    # Two worker threads under a reduced global float32 precision: the same answer, and the
    # global setting is left as it was.
    previous = torch.get_float32_matmul_precision()
    torch.set_num_threads(2)
    torch.set_float32_matmul_precision("medium")
    try:
        again = ScanIndex(bank, bank_chunk=7).search(queries, 3, chunk_size=1, exact_batch=4)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.set_num_threads(1)
    assert np.array_equal(again.distance, found.distance)
    assert np.array_equal(again.index, found.index)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_pruned_search_equals_brute_force_with_near_ties(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    bank, views = tied_bank(generator)
    index = ScanIndex(bank, bank_chunk=16)
    found = index.search(views, len(views), chunk_size=chunk_size, exact_batch=8)
    reference = brute_force_search(views, bank)
    assert np.max(np.abs(found.distance - reference)) <= TOLERANCE
    assert found.exact_pairs < 0.5 * found.pairs   # the float32 bounds settled most pairs
    # The returned index and view reach the returned distance.
    for q, (i, j) in enumerate(zip(found.index, found.view)):
        d = (views[q, j] - bank[i]).norm() / max(float(bank[i].norm()), 1e-300)
        assert abs(float(d) - found.distance[q]) <= TOLERANCE


def test_shifted_image_search_equals_brute_force_and_finds_the_roll() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = smooth(30, generator, channels=1, size=12)
    copies = torch.roll(bank[:4], (1, -1, 0), dims=(2, 3, 4))
    queries = torch.cat([copies, smooth(6, generator, channels=1, size=12)])[:, None]
    offsets = translations(1)
    result = nearest_scans(queries, bank, "nrmse", offsets=offsets, chunk_size=16)
    reference = brute_force_nearest_scans(queries, bank, "nrmse", offsets=offsets)
    assert np.max(np.abs(result.distance - reference.distance)) <= TOLERANCE
    assert result.index[:4].tolist() == [0, 1, 2, 3] and np.all(result.distance[:4] < 1e-6)
    assert result.offset[:4] == [(-1, 1, 0)] * 4


def test_calibration_equals_brute_force_from_a_tensor_or_on_demand() -> None:
    generator = torch.Generator().manual_seed(3)
    bank, _ = tied_bank(generator)
    patients = [f"p{i % 17}" for i in range(len(bank))]
    views = torch.stack([bank, bank + 0.2 * smooth(len(bank), generator)], dim=1)
    codes = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    groups = [codes[p] for p in patients]
    reference = brute_force_nearest_scans(views, bank, "latent", candidate_groups=groups,
                                          bank_groups=groups).distance
    stored = between_patient_distances(views, bank, patients, "latent", chunk_size=6)
    on_demand = between_patient_distances(lambda a, b: views[a:b], ScanIndex(bank), patients,
                                          "latent", chunk_size=6)
    torch.set_num_threads(2)   # products on two intra-op threads (another summation order)
    threaded = between_patient_distances(views, bank, patients, "latent", chunk_size=6)
    torch.set_num_threads(1)
    assert np.max(np.abs(stored - reference)) <= TOLERANCE
    assert np.array_equal(stored, on_demand)
    assert np.max(np.abs(threaded - reference)) <= TOLERANCE
    assert calibrated_threshold(stored, 5) == pytest.approx(calibrated_threshold(reference, 5),
                                                            abs=TOLERANCE)


def test_every_excluded_pair_gives_inf_and_no_index() -> None:
    bank = torch.randn((4, 1, 4, 4, 4), dtype=torch.float64)
    found = ScanIndex(bank).search(bank[:, None], 4, query_groups=[0] * 4, bank_groups=[0] * 4)
    assert np.all(np.isinf(found.distance)) and np.all(found.index == -1)


def test_planted_copies_in_a_synthetic_hospital_are_all_rejected() -> None:
    hospital = synthetic_hospital(300, 24, size=16, seed=4, planted=8)
    index = ScanIndex(hospital.bank)
    calibration = between_patient_distances(hospital.scan_views, index,
                                            [str(p) for p in hospital.patients], "latent",
                                            chunk_size=54)
    threshold = calibrated_threshold(calibration, 5)
    found = nearest_scans(hospital.candidate_views, index, "latent", chunk_size=54)
    reference = brute_force_nearest_scans(hospital.candidate_views, hospital.bank, "latent")
    assert np.max(np.abs(found.distance - reference.distance)) <= TOLERANCE
    passed = decide(found.distance, threshold)
    assert np.array_equal(passed, decide(reference.distance, threshold))
    copies = [k.startswith("copy-") for k in hospital.candidate_kinds]
    assert {k for k in hospital.candidate_kinds if k.startswith("copy-")} == {
        "copy-exact", "copy-shifted", "copy-noised", "copy-brightened"}
    assert not passed[copies].any() and passed[[not c for c in copies]].mean() > 0.8
    assert math.isfinite(threshold) and threshold > 0


def test_integer_products_are_exact_and_never_overflow(monkeypatch) -> None:
    """int8 products equal int64 ones, at +-127 over more values than int32 can sum (the
    products are sliced), and through the slicing path with short slices."""
    generator = torch.Generator().manual_seed(6)
    left = torch.randint(-127, 128, (5, 301), generator=generator, dtype=torch.int8)
    right = torch.randint(-127, 128, (7, 301), generator=generator, dtype=torch.int8)
    expected = (left.long() @ right.long().T).to(torch.float64)
    assert torch.equal(integer_products(left, right), expected)
    long = torch.full((2, 200_000), 127, dtype=torch.int8)
    long[1, :1000] = -127
    product = integer_products(long, long)
    assert product[0, 0] == 127 ** 2 * 200_000 > 2 ** 31    # would wrap in one int32 sum
    assert product[0, 1] == 127 ** 2 * (200_000 - 2000)
    monkeypatch.setattr(nearest_scan, "_INT32_SAFE_LENGTH", 16)
    assert torch.equal(integer_products(left, right), expected)

    def no_int_mm(*args):
        raise RuntimeError("_int_mm: not available on this device")

    monkeypatch.setattr(torch, "_int_mm", no_int_mm)      # the exact float64 fallback
    assert torch.equal(integer_products(left, right), expected)


def test_quantize_bounds_its_residual() -> None:
    """x = scale * codes + residual with the stated norms rounded up, one scale per group."""
    generator = torch.Generator().manual_seed(7)
    rows = torch.randn((6, 50), generator=generator, dtype=torch.float64) * 3 + 1
    rows[2] = 0
    center = torch.randn(50, generator=generator, dtype=torch.float64)
    coded = quantize(rows, group=3, center=center, keep_float32=True)
    x = rows - center
    codes = coded.codes[:, :50].to(torch.float64)
    assert coded.codes.shape == (6, 56) and not coded.codes[:, 50:].any()
    assert torch.equal(coded.scale[:3], coded.scale[:1].expand(3))   # shared per group
    assert codes.abs().max() <= 127
    residual = x - coded.scale[:, None] * codes
    assert torch.all(coded.residual_norm >= residual.norm(dim=1))
    assert torch.all(coded.residual_norm <= 0.03 * x.norm(dim=1))   # a fine grid for these
    assert torch.all(coded.code_norm >= (coded.scale[:, None] * codes).norm(dim=1))
    assert torch.allclose(coded.norm, x.norm(dim=1), rtol=1e-15)
    assert torch.equal(coded.centered32, x.to(torch.float32))


def _pair_distances(views: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """True d(query, scan) (q, M): min over the views, float64."""
    flat = bank.reshape(len(bank), -1).to(torch.float64)
    norms = flat.norm(dim=1)
    return torch.stack([relative_l2(v.reshape(len(v), -1).to(torch.float64), flat, norms).amin(0)
                        for v in views])


@pytest.mark.parametrize("far_clusters", [False, True])
def test_int8_bounds_are_lower_bounds_tight_or_loose(far_clusters: bool) -> None:
    """The int8 lower bound never exceeds the true distance. On smooth data centred near the
    scans it is within a few percent, so the float32 stage sees few pairs. When the bank is two
    clusters far apart (say two scanner contrasts), the centred vectors are large next to the
    distances within a cluster, the int8 grid is coarse next to them and the bound is loose:
    most pairs go on to the float32 stage. The search equals brute force either way."""
    generator = torch.Generator().manual_seed(8)
    bank = smooth(60, generator).to(torch.float64)
    views = torch.stack([bank[:12] + 0.3 * smooth(12, generator) for _ in range(3)], dim=1)
    if far_clusters:
        bank[30:] += 60.0
    index = ScanIndex(bank, bank_chunk=16)
    lower, _, mask = index.int8_lower_bounds(views.reshape(36, -1), 3)
    true = _pair_distances(views, bank)
    assert torch.all(lower <= true)
    # Each query's nearest scan keeps the bit of the view that reaches it.
    per_view = torch.stack([_pair_distances(views[:, j:j + 1], bank) for j in range(3)], dim=2)
    nearest = true.argmin(1)
    best_view = per_view[torch.arange(12), nearest].argmin(1)
    assert torch.all((mask[torch.arange(12), nearest] >> best_view) & 1 == 1)
    found = index.search(views, 12, exact_batch=8)
    assert np.max(np.abs(found.distance - brute_force_search(views, bank))) <= TOLERANCE
    ratio = (lower / true)[:, :30][true[:, :30] > 0.8]     # same cluster, not near copies
    if far_clusters:
        assert float(ratio.min()) < 0.5
        assert found.float32_pairs > 0.25 * found.pairs
    else:
        assert float(ratio.min()) > 0.95
        assert found.float32_pairs < 0.5 * found.pairs
        assert (mask != 0b111).sum() > 0.5 * mask.numel()      # views ruled out


@pytest.mark.parametrize("perturbation", [0.0, 1e-9, 1e-6, 1e-4, 1e-2])
def test_pruned_search_equals_brute_force_with_many_near_ties(perturbation: float) -> None:
    """Each scan duplicated 4 times with relative perturbations below, at and above the int8 and
    float32 bounds' resolution, rolls of one volume (equal norms, equal distances to a constant
    query), and queries that are perturbed copies: the pruned search, the float32 search and
    brute force agree, and the returned scan and view reach the distance."""
    generator = torch.Generator().manual_seed(9)
    base = smooth(20, generator, channels=2).to(torch.float64)
    duplicates = base.repeat(4, 1, 1, 1, 1)
    duplicates += perturbation * duplicates.abs().mean() * torch.randn(
        duplicates.shape, generator=generator, dtype=torch.float64)
    rolls = torch.cat([torch.roll(base[:1], (i, j, 0), dims=(2, 3, 4)) for i in range(4)
                       for j in range(4)])
    bank = torch.cat([duplicates, rolls])
    queries = torch.cat([base[:8] + perturbation * torch.randn(
                             base[:8].shape, generator=generator, dtype=torch.float64),
                         torch.full((2, *base.shape[1:]), float(base[0].mean()),
                                    dtype=torch.float64),
                         smooth(4, generator, channels=2).to(torch.float64)])
    views = torch.stack([queries, torch.roll(queries, 1, dims=2)], dim=1)
    index = ScanIndex(bank, bank_chunk=32)
    reference = brute_force_search(views, bank)
    pruned = index.search(views, len(views), chunk_size=4, exact_batch=8)
    gemm = index.search(views, len(views), chunk_size=4, exact_batch=8, prefilter=False)
    apart = reference > 1e-3       # a copy's ~0 is cdist's rounding (TOLERANCE), not relative
    assert np.max(np.abs(pruned.distance - reference)[apart] / reference[apart]) <= 1e-5
    assert np.max(np.abs(pruned.distance - reference)) <= TOLERANCE
    assert np.max(np.abs(gemm.distance - reference)) <= TOLERANCE
    for q, (i, j) in enumerate(zip(pruned.index, pruned.view)):
        d = (views[q, j] - bank[i]).norm() / max(float(bank[i].norm()), 1e-300)
        assert abs(float(d) - pruned.distance[q]) <= TOLERANCE
    # The constant queries tie with all 16 rolls: each roll is checked in float64 or float32.
    assert pruned.float32_pairs + pruned.exact_pairs >= 2 * len(rolls)


def test_more_than_63_effective_views_search_without_the_view_mask() -> None:
    """125 translations of one image view (max_shift 2) exceed the int8 stage's 63-bit view mask:
    every view then goes on to the float32 stage, and the search still equals brute force."""
    generator = torch.Generator().manual_seed(10)
    bank = smooth(12, generator, channels=1)
    queries = torch.cat([torch.roll(bank[:2], (2, -1, 1), dims=(2, 3, 4)),
                         smooth(3, generator, channels=1)])[:, None]
    offsets = translations(2)
    result = nearest_scans(queries, bank, "nrmse", offsets=offsets, chunk_size=16)
    reference = brute_force_nearest_scans(queries, bank, "nrmse", offsets=offsets)
    assert len(offsets) == 125
    assert np.max(np.abs(result.distance - reference.distance)) <= TOLERANCE
    assert result.index[:2].tolist() == [0, 1] and np.all(result.distance[:2] < 1e-6)
