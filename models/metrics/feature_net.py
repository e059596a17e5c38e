"""Feature networks for Frechet distances on 3D volumes, built without any download.

Two extractors, both returning globally average-pooled features ``(N, F)``:

* the **random-feature network** (:func:`build_random_feature_net`): a small MONAI 3D
  ResNet whose weights are MONAI's own initialisation drawn from a fixed seed. The same
  seed gives the same weights in every process and on every machine with the same torch
  version (the weights are drawn on the CPU, outside the caller's random stream).
  Distances on these features ("rf_fid") are only comparable with other rf_fid numbers
  computed with the same seed, architecture and volume size; they are NOT comparable
  with Inception FID or with any published FID value.
* the **MedicalNet network** (:func:`build_medicalnet_feature_net`): a MONAI ResNet with
  the MedicalNet (Med3D) layout, loaded from a weights file the user already has on disk.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, get_inplanes
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch import nn
from tqdm.auto import tqdm

from models.metrics.errors import MetricInputError

log = logging.getLogger(__name__)

RANDOM_FEATURE_SEED = 0
# Widths of the four residual stages. Narrow on purpose: few features (8+16+32+64 = 120)
# keep the covariance estimate usable with the tens of volumes an evaluation has.
RANDOM_FEATURE_WIDTHS = (8, 16, 32, 64)
RANDOM_FEATURE_DIM = sum(RANDOM_FEATURE_WIDTHS)

# MedicalNet depth -> (block, blocks per stage), as in monai.networks.nets.resnet10 ... resnet200.
_MEDICALNET_LAYOUTS: dict[int, tuple[type[nn.Module], list[int]]] = {
    10: (ResNetBlock, [1, 1, 1, 1]),
    18: (ResNetBlock, [2, 2, 2, 2]),
    34: (ResNetBlock, [3, 4, 6, 3]),
    50: (ResNetBottleneck, [3, 4, 6, 3]),
    101: (ResNetBottleneck, [3, 4, 23, 3]),
    152: (ResNetBottleneck, [3, 8, 36, 3]),
    200: (ResNetBottleneck, [3, 24, 36, 3]),
}


def _frozen(net: nn.Module) -> nn.Module:
    """Eval mode (batch norm uses its stored statistics) and no gradients."""
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


class StagePooledResNet(nn.Module):
    """A MONAI ResNet read out at every residual stage: each stage's output is globally
    average-pooled and the four are concatenated.

    The early, full-resolution stages make the features see fine texture (noise, blur),
    which the last stage of a random network averages away. ``(N, C, D, H, W)`` ->
    ``(N, sum of the stage widths)``.
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.resnet
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        pooled = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            pooled.append(x.mean(dim=tuple(range(2, x.ndim))))
        return torch.cat(pooled, dim=1)


def build_random_feature_net(seed: int = RANDOM_FEATURE_SEED) -> nn.Module:
    """A randomly initialised MONAI 3D ResNet feature extractor, identical for the same ``seed``.

    Layout: 3x3x3 stem at stride 1 without max pooling (so 16^3 volumes still reach the
    last stage at 2^3), one basic block per stage with widths ``RANDOM_FEATURE_WIDTHS``,
    MONAI's own weight initialisation, every stage globally average-pooled
    (:class:`StagePooledResNet`). Input ``(N, 1, D, H, W)`` in the site normalisation
    (~[0, 1]; not re-normalised, so intensity shifts stay visible); output
    ``(N, RANDOM_FEATURE_DIM)`` = ``(N, 120)``. Built on the CPU under its own seed: the
    caller's random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=list(RANDOM_FEATURE_WIDTHS),
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=True,
            shortcut_type="B",
            feed_forward=False,
        )
    return _frozen(StagePooledResNet(resnet))


def feature_net_fingerprint(net: nn.Module) -> str:
    """SHA-256 of the network's parameters and buffers, in state-dict order.

    Two reports whose fingerprints match used the very same feature network.
    """
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _medicalnet_depth(state: dict[str, torch.Tensor]) -> int | None:
    """The ResNet depth a MedicalNet state dict was saved from, from its block counts."""
    blocks = [len({key.split(".")[1] for key in state if key.startswith(f"layer{stage}.")})
              for stage in (1, 2, 3, 4)]
    bottleneck = any(key.endswith("conv3.weight") for key in state)
    for depth, (block, layers) in _MEDICALNET_LAYOUTS.items():
        if layers == blocks and (block is ResNetBottleneck) == bottleneck:
            return depth
    return None


def build_medicalnet_feature_net(weights: Path | str) -> nn.Module:
    """A MONAI ResNet with the MedicalNet layout, loaded from a local weights file.

    Accepts the MedicalNet release format (``{"state_dict": {"module.conv1.weight": ...}}``)
    or a plain state dict; the depth (10/18/34/50/101/152/200) is read from the file.
    Segmentation or classification head weights in the file are ignored. Input
    ``(N, 1, D, H, W)``, output ``(N, F)`` (F = 512 for depths 10-34, 2048 above), the last
    stage globally average-pooled.

    Layout: MedicalNet's stem (7^3 convolution at stride 2, max pooling) and, per depth,
    the shortcut type and downsample bias MONAI prescribes for MedicalNet weights
    (``get_medicalnet_pretrained_resnet_args``: depth 10 "B" without bias, 18/34 "A").
    MedicalNet's own code dilates stages 3-4 where MONAI's ResNet strides them: same
    weights, smaller final feature map, as in MONAI's own MedicalNet support.
    Never downloads anything: a missing or incompatible file raises
    :class:`MetricInputError`.
    """
    path = Path(weights)
    if not path.is_file():
        raise MetricInputError(f"{path}: MedicalNet weights file not found; pass the path of a "
                               f"local MedicalNet .pth file (fedsynth never downloads weights)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise MetricInputError(f"{path}: not a readable PyTorch weights file "
                               f"({type(err).__name__}); pass a MedicalNet .pth file") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricInputError(f"{path}: holds no state dict of tensors; "
                               f"pass a MedicalNet .pth file")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    depth = _medicalnet_depth(state)
    if depth is None:
        raise MetricInputError(f"{path}: not a MedicalNet ResNet (no layer1..layer4 blocks of "
                               f"depth 10/18/34/50/101/152/200); pass a MedicalNet .pth file")
    block, layers = _MEDICALNET_LAYOUTS[depth]
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    net = ResNet(block=block, layers=layers, block_inplanes=get_inplanes(), spatial_dims=3,
                 n_input_channels=1, conv1_t_stride=2, shortcut_type=shortcut_type,
                 bias_downsample=bias_downsample, feed_forward=False)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        first = (missing or wrong)[0]
        problem = "lacks" if missing else "has a wrong shape for"
        raise MetricInputError(f"{path}: {problem} '{first}' for a MedicalNet resnet{depth} "
                               f"({len(missing)} missing, {len(wrong)} mis-shaped); "
                               f"pass an original MedicalNet .pth file")
    net.load_state_dict({key: state[key] for key in expected})
    log.info("loaded MedicalNet resnet%d from %s", depth, path)
    return _frozen(net)


def zscore_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """Per-volume zero mean, unit variance, the intensity normalisation MedicalNet was trained with.

    ``(N, 1, D, H, W)`` -> same shape.
    """
    flat = volumes.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1, 1)
    std = flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
    return (volumes - mean) / std


@torch.no_grad()
def extract_features(net: nn.Module, volumes: torch.Tensor, batch_size: int = 8,
                     description: str = "features") -> torch.Tensor:
    """Run ``net`` over ``volumes`` ``(N, 1, D, H, W)`` in batches.

    Returns float64 features ``(N, F)`` on the CPU.
    """
    if volumes.ndim != 5 or volumes.shape[1] != 1:
        raise MetricInputError(f"{description}: expected volumes of shape (N, 1, D, H, W), "
                               f"got {tuple(volumes.shape)}; pass single-channel 3D volumes")
    device = next(net.parameters()).device
    chunks = []
    for start in tqdm(range(0, volumes.shape[0], batch_size), desc=description, unit="batch",
                      disable=None, leave=False):
        batch = volumes[start:start + batch_size].to(device=device, dtype=torch.float32)
        chunks.append(net(batch).flatten(1).double().cpu())
    return torch.cat(chunks)
