"""Packed state dicts: bit-exact round trips, few arrays, malformed layouts refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from models.latent_unet import build_latent_unet
from privacy.outbox import weights_hash
from privacy.packed_state import (LAYOUT_KEY, PackedStateError, pack_state, packed_shapes,
                                  unpack_state)
from privacy.protocol import ProtocolViolation


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, 3, generator=generator),
            "conv.bias": torch.randn(4, generator=generator),
            "norm.num_batches_tracked": torch.tensor(7),
            "scale": torch.randn(2, 2, generator=generator, dtype=torch.float64),
            "empty": torch.zeros(0, 5)}


def _record(state) -> ArrayRecord:
    """Packed, then through Flower's own record, as a message carries it."""
    return ArrayRecord(torch_state_dict=pack_state(state))


def test_a_round_trip_is_bit_exact_and_keeps_names_shapes_dtypes_and_the_hash():
    state = _state()
    record = _record(state)
    back = unpack_state(record)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    assert weights_hash(back) == weights_hash(state)
    assert packed_shapes(record) == {name: tuple(t.shape) for name, t in state.items()}


def test_a_real_denoiser_travels_as_one_array_per_dtype_plus_the_layout():
    from configs import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
                         check_paths=False)
    unet = build_latent_unet(config.model, config.data.num_classes,
                             len(config.model.conditioning.attributes))
    state = unet.state_dict()
    record = _record(state)
    assert len(state) > 100                      # one Flower object per tensor, unpacked
    assert len(record) == 1 + len({t.dtype for t in state.values()})
    assert weights_hash(unpack_state(record)) == weights_hash(state)


def test_an_unpacked_record_is_read_as_it_is():
    state = _state()
    plain = ArrayRecord(torch_state_dict=state)
    assert weights_hash(unpack_state(plain)) == weights_hash(state)
    assert packed_shapes(plain)["conv.weight"] == (4, 3, 3, 3, 3)


def _with(record: ArrayRecord, **arrays) -> ArrayRecord:
    return ArrayRecord({**{k: record[k] for k in record.keys()}, **arrays})


def _layout(tensors) -> Array:
    header = json.dumps({"version": 1, "tensors": tensors}).encode()
    return Array(np.frombuffer(header, dtype=np.uint8).copy())


@pytest.mark.parametrize("tamper, message", [
    (lambda r: _with(r, **{"packed-float32": Array(np.zeros(3, dtype=np.float32))}), "runs past"),
    (lambda r: _with(r, **{"packed-float32": Array(np.zeros(10_000, dtype=np.float32))}),
     "does not account for"),
    (lambda r: _with(r, extra=Array(np.zeros(1, dtype=np.float32))), "does not name exactly"),
    (lambda r: ArrayRecord({LAYOUT_KEY: _layout([["a", "float32", [2]], ["a", "float32", [2]]]),
                            "packed-float32": Array(np.zeros(4, dtype=np.float32))}),
     "packed twice"),
    (lambda r: ArrayRecord({LAYOUT_KEY: Array(np.frombuffer(b"{not json", dtype=np.uint8).copy())}),
     "not a packed-state layout"),
    (lambda r: ArrayRecord({LAYOUT_KEY: _layout([["a", "float32", [2]]]),
                            "packed-float32": Array(np.zeros((1, 2), dtype=np.float32))}),
     "the layout says flat float32"),
])
def test_a_malformed_packed_record_is_a_protocol_violation(tamper, message):
    record = tamper(_record(_state()))
    with pytest.raises(PackedStateError, match=message) as caught:
        unpack_state(record)
    assert isinstance(caught.value, ProtocolViolation)
