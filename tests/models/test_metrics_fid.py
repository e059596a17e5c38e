"""rf_fid and MedicalNet FID: determinism of the feature network, distances that behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import resnet10

from models.metrics import (RANDOM_FEATURE_DIM, MetricInputError, build_medicalnet_feature_net,
                            build_random_feature_net, extract_features, feature_net_fingerprint,
                            frechet_distance, medicalnet_fid, rf_fid, zscore_volumes)

# Identical real and synthetic sets: the Frechet distance is 0 up to the matrix square
# root's round-off, which is ~1e-9 here; anything above 1e-6 would be a real difference.
IDENTICAL_TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantoms(count: int, seed: int, size: int = 16, noise: float = 0.05) -> torch.Tensor:
    """``(count, 1, size, size, size)`` balls of random radius and contrast, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = (z ** 2 + y ** 2 + x ** 2).sqrt()
    volumes = []
    for _ in range(count):
        r = 0.5 + 0.3 * torch.rand(1, generator=generator)
        contrast = 0.6 + 0.3 * torch.rand(1, generator=generator)
        volumes.append((radius < r).float() * contrast
                       + noise * torch.randn(size, size, size, generator=generator))
    return torch.stack(volumes)[:, None]


def test_random_feature_net_is_the_same_for_a_seed_whatever_the_global_rng():
    volumes = phantoms(4, seed=0)
    torch.manual_seed(123)
    first = build_random_feature_net(seed=0)
    torch.rand(1000)  # a different global random state must not matter
    second = build_random_feature_net(seed=0)
    other = build_random_feature_net(seed=1)
    assert feature_net_fingerprint(first) == feature_net_fingerprint(second)
    assert feature_net_fingerprint(first) != feature_net_fingerprint(other)
    features = extract_features(first, volumes)
    assert features.shape == (4, RANDOM_FEATURE_DIM)
    assert torch.equal(features, extract_features(second, volumes))
    assert not torch.allclose(features, extract_features(other, volumes))


def test_random_feature_net_leaves_the_callers_random_stream_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_random_feature_net(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_random_feature_net_is_the_same_in_a_fresh_process():
    code = ("import torch; torch.manual_seed(99); "
            "from models.metrics import build_random_feature_net, feature_net_fingerprint; "
            "print(feature_net_fingerprint(build_random_feature_net(0)))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == feature_net_fingerprint(build_random_feature_net(0))


def test_rf_fid_is_zero_for_identical_sets_and_grows_with_a_shift_or_noise():
    real = phantoms(12, seed=0)
    same = rf_fid(real, real.clone())
    assert 0.0 <= same < IDENTICAL_TOLERANCE
    other_draw = rf_fid(real, phantoms(12, seed=1))  # the same distribution, new samples
    shifted = rf_fid(real, real + 0.2)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(2))
    noisy = rf_fid(real, real + 0.3 * noise)
    assert shifted > 5 * other_draw
    assert noisy > 4 * other_draw
    assert rf_fid(real, real + 0.4) > shifted  # a larger shift is further away


def test_rf_fid_takes_sets_of_different_sizes():
    assert rf_fid(phantoms(6, seed=0), phantoms(9, seed=1)) > 0


def test_frechet_distance_refuses_unusable_features():
    with pytest.raises(MetricInputError, match="at least 2 samples"):
        frechet_distance(torch.rand(1, 8), torch.rand(5, 8))
    with pytest.raises(MetricInputError, match="dimensions"):
        frechet_distance(torch.rand(5, 8), torch.rand(5, 9))
    with pytest.raises(MetricInputError, match=r"\(N, 1, D, H, W\)"):
        extract_features(build_random_feature_net(), torch.rand(2, 16, 16, 16))


def medicalnet_layout_resnet10() -> torch.nn.Module:
    """MONAI resnet10 in the MedicalNet layout (depth 10: shortcut B, no downsample bias)."""
    torch.manual_seed(0)
    return resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B",
                    bias_downsample=False, feed_forward=False)


def test_medicalnet_weights_in_the_release_format_load_and_give_a_fid(tmp_path):
    net = medicalnet_layout_resnet10()
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 512, 3, 3, 3)  # MedicalNet's seg head
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": state}, weights)

    loaded = build_medicalnet_feature_net(weights)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.state_dict()["layer4.0.conv2.weight"],
                       net.state_dict()["layer4.0.conv2.weight"])
    real = phantoms(5, seed=0)
    features = extract_features(loaded, zscore_volumes(real))
    assert features.shape == (5, 512)
    assert not torch.allclose(features[0], features[1])  # the features tell volumes apart
    # one distance only: the square root of a 512 x 512 covariance takes seconds
    assert 0.0 <= medicalnet_fid(real, real.clone(), loaded) < IDENTICAL_TOLERANCE


def test_medicalnet_refuses_missing_unreadable_and_incompatible_files(tmp_path):
    with pytest.raises(MetricInputError, match="not found.*never downloads") as missing:
        build_medicalnet_feature_net(tmp_path / "absent.pth")
    assert "\n" not in str(missing.value)

    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(MetricInputError, match="not a readable PyTorch weights file"):
        build_medicalnet_feature_net(text)

    no_resnet = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, no_resnet)
    with pytest.raises(MetricInputError, match="not a MedicalNet ResNet"):
        build_medicalnet_feature_net(no_resnet)

    # one block per stage looks like depth 10, but the widths are not MedicalNet's
    narrow = tmp_path / "narrow.pth"
    torch.save(build_random_feature_net().resnet.state_dict(), narrow)
    with pytest.raises(MetricInputError, match="resnet10"):
        build_medicalnet_feature_net(narrow)
