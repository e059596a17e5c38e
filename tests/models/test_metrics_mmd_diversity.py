"""MMD between real and synthetic volumes; MS-SSIM diversity of a synthetic set."""

from __future__ import annotations

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from models.metrics import MetricInputError, ms_ssim_diversity, ms_ssim_settings, volume_mmd


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cubes(count: int, seed: int, size: int = 16, noise: float = 0.05,
          jitter: int = 1) -> torch.Tensor:
    """``(count, 1, size^3)``: a bright cube near the centre, its corners moved by up to
    ``jitter`` voxels (like anatomy: one structure, varying shape), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    volumes = torch.zeros(count, 1, size, size, size)
    for volume in volumes:
        moves = torch.randint(-jitter, jitter + 1, (2, 3), generator=generator)
        low = (size // 4 + moves[0]).tolist()
        high = (3 * size // 4 + moves[1]).tolist()
        volume[0, low[0]:high[0], low[1]:high[1], low[2]:high[2]] = 0.8
    return (volumes + noise * torch.randn(volumes.shape, generator=generator)).clamp(0, 1)


def test_mmd_of_a_set_with_itself_is_near_zero():
    real = cubes(16, seed=0)
    # Tolerance: MONAI's unbiased estimator on the very same set gives exactly
    # -2/n * (mean per-voxel variance), not 0; that correction is all there is.
    correction = -2 / 16 * real.double().var(dim=0).mean().item()
    same = volume_mmd(real, real.clone())
    assert same == pytest.approx(correction, rel=1e-6)
    assert abs(same) < 0.1 * volume_mmd(real, real + 0.2)


def test_mmd_is_near_zero_for_one_distribution_and_larger_for_a_shift():
    real, other = cubes(16, seed=0), cubes(16, seed=1)
    matched = volume_mmd(real, other)
    shifted = volume_mmd(real, other + 0.2)
    assert shifted > 0.02  # a 0.2 shift adds about 0.2^2 = 0.04 per voxel
    assert abs(matched) < shifted / 5


def test_mmd_uses_every_volume_when_counts_differ_and_is_seeded():
    real, synthetic = cubes(4, seed=0), cubes(9, seed=1)
    value = volume_mmd(real, synthetic, seed=3)
    assert value == volume_mmd(real, synthetic, seed=3)
    assert volume_mmd(real, synthetic + 0.3, seed=3) > value + 0.05


def test_mmd_refuses_too_few_or_mismatched_volumes():
    with pytest.raises(MetricInputError, match="at least 2 real"):
        volume_mmd(cubes(1, seed=0), cubes(3, seed=1))
    with pytest.raises(MetricInputError, match="compare volumes of one shape"):
        volume_mmd(cubes(3, seed=0, size=16), cubes(3, seed=1, size=12))


@pytest.mark.parametrize("size, scales, kernel", [(16, 3, 3), (32, 4, 3), (64, 5, 3),
                                                  (128, 5, 7), (192, 5, 11)])
def test_ms_ssim_settings_keep_the_coarsest_scale_larger_than_the_window(size, scales, kernel):
    settings = ms_ssim_settings((size, size, size))
    assert (settings.scales, settings.kernel_size) == (scales, kernel)
    assert size // 2 ** (settings.scales - 1) > settings.kernel_size
    assert sum(settings.weights) == pytest.approx(1.0)
    # MONAI accepts the set-up on a volume of that size (it checks the sizes itself)
    if size <= 32:
        volume = torch.rand(1, 1, size, size, size)
        metric = MultiScaleSSIMMetric(spatial_dims=3, kernel_size=settings.kernel_size,
                                      kernel_sigma=settings.kernel_sigma, weights=settings.weights)
        assert float(metric(volume, volume)) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_settings_refuse_volumes_too_small_for_any_window():
    with pytest.raises(MetricInputError, match="too small"):
        ms_ssim_settings((16, 16, 3))


def test_ms_ssim_diversity_is_zero_for_identical_samples_and_grows_with_difference():
    one = cubes(1, seed=0)
    assert ms_ssim_diversity(one.repeat(5, 1, 1, 1, 1)) == pytest.approx(0.0, abs=1e-5)
    varied = ms_ssim_diversity(cubes(5, seed=1))
    noise_only = ms_ssim_diversity(torch.rand(5, 1, 16, 16, 16,
                                              generator=torch.Generator().manual_seed(2)))
    assert 0.02 < varied < noise_only <= 1.5


def test_ms_ssim_diversity_subsamples_pairs_with_a_seed():
    samples = cubes(6, seed=4)  # 15 pairs
    everything = ms_ssim_diversity(samples)
    subset = ms_ssim_diversity(samples, max_pairs=5, seed=1)
    assert subset == ms_ssim_diversity(samples, max_pairs=5, seed=1)
    assert subset != everything
    assert subset == pytest.approx(everything, rel=0.5)


def test_ms_ssim_diversity_needs_two_samples():
    with pytest.raises(MetricInputError, match="at least 2 samples"):
        ms_ssim_diversity(cubes(1, seed=0))
