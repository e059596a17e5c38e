"""The exact pruned nearest-scan search (privacy.nearest_scan) against brute force.

Each test would fail if a bound could exceed a true distance (a nearer scan pruned): the data are
built so that pruning happens (the tests check it does) and so that the nearest scan is hard to
tell from others: near ties, exact duplicates, zero volumes, copies under a roll.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.benchmarks.gate_throughput import synthetic_hospital
from privacy.gate import (between_patient_distances, brute_force_nearest_scans,
                          calibrated_threshold, decide, nearest_scans, translations)
from privacy.nearest_scan import LowFrequencyProjection, ScanIndex, brute_force_search

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
    """Smooth random volumes (count, C, S, S, S): most of their energy is in their low frequencies,
    so the bounds are tight enough to prune."""
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


def test_bounds_never_exceed_the_true_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = smooth(30, generator, size=12)
    index = ScanIndex(bank, frequencies=(2, 4))
    queries = torch.cat([bank[:5] + 1e-6 * torch.randn(bank[:5].shape, generator=generator),
                         smooth(10, generator, size=12), torch.zeros((1, *bank.shape[1:]))])
    flat = queries.reshape(len(queries), -1).to(torch.float64)
    true = torch.cdist(flat, index.rows(torch.arange(len(bank))))
    for level in index.levels:
        norm_sq = flat.square().sum(1)
        coords, coords_sq, low, high = index._view_level(level, queries, norm_sq)
        bound = index._bound_sq(level, coords, coords_sq, low, high, slice(None)).sqrt()
        assert torch.all(bound <= true * (1 + 1e-12) + 1e-12)
        assert bound.mean() > 0.5 * true.mean()   # and they are not trivially zero


def test_low_frequency_projection_is_orthonormal_on_uneven_grids() -> None:
    projection = LowFrequencyProjection((5, 6, 7), 4, torch.device("cpu"))
    x = torch.randn((3, 2, 5, 6, 7), dtype=torch.float64)
    coords = projection(x)
    # P P^T = I: projecting the back-projected coordinates returns them, and norms never grow.
    basis = projection(torch.eye(5 * 6 * 7, dtype=torch.float64).reshape(-1, 1, 5, 6, 7))
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64))
    assert torch.all(coords.norm(dim=1) <= x.reshape(3, -1).norm(dim=1) + 1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_pruned_search_equals_brute_force_with_near_ties(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    bank, views = tied_bank(generator)
    index = ScanIndex(bank, frequencies=(2, 4))
    found = index.search(views, len(views), chunk_size=chunk_size, exact_batch=8)
    reference = brute_force_search(views, bank)
    assert np.max(np.abs(found.distance - reference)) <= TOLERANCE
    assert found.exact_pairs < 0.5 * found.pairs   # the bounds did prune
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
    torch.set_num_threads(2)   # blocks shared among two worker threads
    threaded = between_patient_distances(views, bank, patients, "latent", chunk_size=6)
    torch.set_num_threads(1)
    assert np.max(np.abs(stored - reference)) <= TOLERANCE
    assert np.array_equal(stored, on_demand) and np.array_equal(stored, threaded)
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
