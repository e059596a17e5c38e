"""The release gate's distances, calibration and wire types (privacy.gate).

Planted copies of real-looking scans (the demo cohort at 16^3: registered brains that differ by a
few millimetres) must be caught in every distance space: exact copies, copies rolled by one voxel
and copies with a little Gaussian noise. A one-voxel roll is farther from its source than two
registered patients are from each other, so this also checks that the shift tolerance catches it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from client.site_data import load_site
from configs import AutoencoderConfig, DataConfig
from experiments.cohort import generate_cohort
from models.autoencoder import build_autoencoder
from privacy.gate import (NO_SHIFT, GateAnswer, GateError, GateQuery, GateRefusal, GateStatus,
                          ThresholdPolicy, between_patient_distances, calibrated_threshold,
                          check_gate_reply, decide, latent_views, nearest_scans, translations,
                          views_of)
from privacy.protocol import GATE_ACCOUNTING, GATE_PASSED, GATE_STATUS, ProtocolViolation

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def site_scans(tmp_path_factory) -> tuple[torch.Tensor, list[str]]:
    """One demo-cohort site at 16^3: images (M, 1, 16, 16, 16) in [0, 1] and their patient ids."""
    root = tmp_path_factory.mktemp("cohort") / "cohort"
    generate_cohort(root, sites=1, patients=6, size=SIZE, seed=3, public_patients=2)
    dataset = load_site(root / "site_0", DataConfig(shape=(SIZE,) * 3, spacing=(192 / SIZE,) * 3))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return images, [dataset[i]["patient_id"] for i in range(len(dataset))]


def planted(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of the scans: exact, rolled by one voxel (each axis in turn), slightly noised."""
    generator = torch.Generator().manual_seed(0)
    rolled = torch.stack([torch.roll(image, shifts=(1, -1, 1)[i % 3], dims=1 + i % 3)
                          for i, image in enumerate(images)])
    return {"exact": images.clone(), "rolled": rolled,
            "noised": images + 0.02 * torch.randn(images.shape, generator=generator)}


def brute_force(candidates: np.ndarray, scans: np.ndarray, distance: str, offsets) -> np.ndarray:
    """Reference nearest-scan distances, pair by pair in float64 numpy (image distances)."""
    from monai.metrics import SSIMMetric

    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, reduction="none")
    best = np.full(len(candidates), np.inf)
    for i, candidate in enumerate(candidates):
        for offset in offsets:
            moved = np.roll(candidate, offset, axis=(-3, -2, -1))
            for scan in scans:
                if distance == "nrmse":
                    d = np.linalg.norm(moved - scan) / np.linalg.norm(scan)
                else:
                    d = 1 - float(metric(torch.as_tensor(moved[None]).float(),
                                         torch.as_tensor(scan[None]).float()).reshape(()))
                best[i] = min(best[i], d)
    return best


def test_translations_cover_the_cube_with_no_shift_first() -> None:
    offsets = translations(1)
    assert len(offsets) == 27 and offsets[0] == (0, 0, 0) and len(set(offsets)) == 27
    assert set(offsets) == set(itertools.product((-1, 0, 1), repeat=3))
    assert translations(0) == NO_SHIFT
    with pytest.raises(GateError):
        translations(-1)


@pytest.mark.parametrize("distance", ["nrmse", "ssim"])
def test_nearest_matches_brute_force_and_ignores_chunking(distance: str) -> None:
    generator = torch.Generator().manual_seed(1)
    scans = torch.rand((5, 1, 12, 12, 12), generator=generator)
    candidates = torch.rand((3, 1, 12, 12, 12), generator=generator)
    candidates[1] = torch.roll(scans[2], 1, dims=2)
    offsets = translations(1)
    expected = brute_force(candidates.numpy(), scans.numpy(), distance, offsets)
    for chunk in (1, 4, 64):
        found = nearest_scans(views_of(candidates), scans, distance, offsets=offsets,
                              chunk_size=chunk)
        np.testing.assert_allclose(found.distance, expected, rtol=1e-5, atol=1e-6)
    found = nearest_scans(views_of(candidates), scans, distance, offsets=offsets)
    assert found.index[1] == 2 and found.offset[1] == (0, -1, 0) and found.distance[1] < 1e-6


def test_between_patient_distances_skip_the_same_patient() -> None:
    generator = torch.Generator().manual_seed(2)
    scans = torch.rand((4, 1, 8, 8, 8), generator=generator)
    scans[1] = scans[0]                       # a follow-up identical to the first visit
    patients = ["a", "a", "b", "c"]
    distances = between_patient_distances(views_of(scans), scans, patients, "nrmse")
    assert (distances > 0.1).all()            # never 0: the identical scan is the same patient's
    expected = brute_force(scans[:1].numpy(), scans[2:].numpy(), "nrmse", NO_SHIFT)
    np.testing.assert_allclose(distances[0], expected[0], rtol=1e-6)
    with pytest.raises(GateError, match="at least 2 patients"):
        between_patient_distances(views_of(scans), scans, ["a"] * 4, "nrmse")


def test_threshold_is_the_percentile_and_a_pass_is_at_or_above_it() -> None:
    distances = np.array([0.4, 0.1, 0.3, 0.2, np.inf])
    assert calibrated_threshold(distances, 50) == pytest.approx(0.25)
    expected = np.percentile([0.1, 0.2, 0.3, 0.4], 5)
    assert calibrated_threshold(distances, 5) == pytest.approx(expected)
    assert decide(np.array([0.1, 0.25, 0.3]), 0.25).tolist() == [False, True, True]
    with pytest.raises(GateError):
        ThresholdPolicy("fixed", None)
    with pytest.raises(GateError):
        ThresholdPolicy("median")


@pytest.mark.parametrize("distance", ["nrmse", "ssim"])
def test_planted_copies_fail_in_image_space(site_scans, distance: str) -> None:
    images, patients = site_scans
    offsets = translations(1)
    calibration = between_patient_distances(views_of(images), images, patients, distance,
                                            offsets=offsets)
    threshold = calibrated_threshold(calibration, 5.0)
    assert threshold > 0
    for kind, copies in planted(images).items():
        found = nearest_scans(views_of(copies), images, distance, offsets=offsets)
        assert not decide(found.distance, threshold).any(), f"{kind} copies passed ({distance})"
    # Without the shift tolerance a one-voxel roll of a registered brain looks like another patient.
    unshifted = nearest_scans(views_of(planted(images)["rolled"]), images, distance).distance
    assert np.median(unshifted) > np.median(calibration)


def test_planted_copies_fail_in_latent_space(site_scans) -> None:
    images, patients = site_scans
    torch.manual_seed(0)
    encoder = build_autoencoder(AutoencoderConfig(channels=[8, 8], latent_channels=2,
                                                  norm_num_groups=4))
    offsets = translations(1)
    bank = latent_views(encoder, images, 1.3)[:, 0]
    calibration = between_patient_distances(latent_views(encoder, images, 1.3, offsets), bank,
                                            patients, "latent")
    threshold = calibrated_threshold(calibration, 5.0)
    for kind, copies in planted(images).items():
        views = latent_views(encoder, copies, 1.3, offsets)
        assert views.shape == (len(images), 27, 2, 8, 8, 8)
        found = nearest_scans(views, bank, "latent")
        assert not decide(found.distance, threshold).any(), f"{kind} copies passed (latent)"


def test_distinct_volumes_pass(site_scans) -> None:
    images, patients = site_scans
    offsets = translations(1)
    threshold = calibrated_threshold(
        between_patient_distances(views_of(images), images, patients, "nrmse", offsets=offsets),
        5.0)
    others = torch.rand((4, 1, SIZE, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    found = nearest_scans(views_of(others), images, "nrmse", offsets=offsets)
    assert decide(found.distance, threshold).all()


def test_mismatched_views_are_refused(site_scans) -> None:
    images, _ = site_scans
    with pytest.raises(GateError, match="do not match"):
        nearest_scans(torch.zeros(2, 1, 1, 8, 8, 8), images, "nrmse")
    with pytest.raises(GateError, match="release.distance"):
        nearest_scans(views_of(images), images, "cosine")


def test_query_round_trips_through_its_record() -> None:
    query = GateQuery(query_id="r1-0001", distance="latent",
                      threshold=ThresholdPolicy("fixed", 0.2), max_shift=1, chunk_size=16,
                      num_candidates=3, candidates_sha256="ab" * 32, data={"shape": [16, 16, 16]},
                      model_sha256="cd" * 32, autoencoder={"kind": "kl"},
                      autoencoder_sha256="ef" * 32, latent_scale_factor=0.9, dp_enabled=True,
                      dp_epsilon=0.5)
    assert GateQuery.from_record(query.to_record()) == query
    record = query.to_record()
    record["protocol"] = 99
    with pytest.raises(ProtocolViolation, match="protocol"):
        GateQuery.from_record(record)


def test_answer_allow_list_refuses_distances_and_extra_keys() -> None:
    answer = GateAnswer(status=GateStatus.OK, site_id="site_0", query_id="q", num_candidates=3,
                        num_passed=2)
    layout = {GATE_PASSED: ("arrays", {"passed": (3,)}),
              GATE_ACCOUNTING: ("metrics", answer.accounting()),
              GATE_STATUS: ("config", answer.status_fields())}
    check_gate_reply(layout, 3)
    assert GateAnswer.from_records(answer.accounting(), answer.status_fields()) == answer
    with pytest.raises(ProtocolViolation, match="exactly one array"):
        check_gate_reply({**layout, GATE_PASSED: ("arrays", {"passed": (3,), "d": (3,)})}, 3)
    with pytest.raises(ProtocolViolation, match="not allowed to leave"):
        check_gate_reply({**layout, "distances": ("arrays", {"d": (3,)})}, 3)
    with pytest.raises(ProtocolViolation, match="keys not allowed"):
        leaky = {**answer.accounting(), "min-distance": 0.1}
        check_gate_reply({**layout, GATE_ACCOUNTING: ("metrics", leaky)}, 3)
    refused = GateAnswer(status=GateStatus.REFUSED, reason=GateRefusal.SITE_ERROR, site_id="s",
                         query_id="q")
    with pytest.raises(ProtocolViolation, match="must not"):
        check_gate_reply({**layout, GATE_STATUS: ("config", refused.status_fields())}, 3)
