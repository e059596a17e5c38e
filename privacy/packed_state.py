"""A model state dict as a few arrays instead of one per tensor, for Flower messages.

Flower 1.41 moves every array of a message as its own object, with one HTTP request per object
and per hop (SuperLink -> SuperNode -> ClientApp process, and back). The demo's denoiser has 188
tensors, so one deployed round cost each site about 750 requests; packed, it is 3 objects each way
(BENCHMARKS.md, ``federation_overhead``).

Layout of a packed record: ``"packed-layout"`` holds UTF-8 JSON bytes (uint8) of
``{"version": 1, "tensors": [[name, dtype, shape], ...]}`` in packing order, and
``"packed-<dtype>"`` holds the flattened tensors of that dtype, concatenated in that order. Values
are copied bit for bit (no casts), so :func:`unpack_state` returns tensors equal to the packed
ones and every hash over them (``weights_hash``) is unchanged. What is packed is exactly what the
allow-list (:mod:`privacy.protocol`) checks: it sees the unpacked names and shapes.

Flower-free: :func:`pack_state` returns tensors (``ArrayRecord(torch_state_dict=pack_state(s))``)
and the readers take any mapping of arrays (a Flower ``ArrayRecord`` or a dict of tensors). A
mapping without the layout key (one array per tensor) is read as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from typing import Any

import numpy as np
import torch

from privacy.protocol import ProtocolViolation

LAYOUT_KEY = "packed-layout"
DATA_PREFIX = "packed-"
VERSION = 1


class PackedStateError(ProtocolViolation):
    """A packed record does not describe its own arrays (a malformed message)."""


def pack_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (name -> tensor) as one flat tensor per dtype plus the layout (see above)."""
    layout, groups = [], {}
    for name, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        dtype = str(flat.numpy().dtype)
        layout.append([name, dtype, list(tensor.shape)])
        groups.setdefault(dtype, []).append(flat)
    header = json.dumps({"version": VERSION, "tensors": layout}, separators=(",", ":"))
    packed = {LAYOUT_KEY: torch.frombuffer(bytearray(header.encode("utf-8")), dtype=torch.uint8)}
    for dtype, parts in groups.items():
        packed[DATA_PREFIX + dtype] = torch.cat(parts)
    return packed


def _numpy(value: Any) -> np.ndarray:
    """A Flower ``Array`` or a tensor as a numpy array."""
    return np.asarray(value.numpy())


def _layout(arrays: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    try:
        raw = _numpy(arrays[LAYOUT_KEY])
        header = json.loads(bytes(raw.astype(np.uint8, copy=False)).decode("utf-8"))
        if header.get("version") != VERSION:
            raise PackedStateError(f"{LAYOUT_KEY}: version {header.get('version')!r}, this site "
                                   f"reads {VERSION}")
        return [(str(name), str(dtype), tuple(int(d) for d in shape))
                for name, dtype, shape in header["tensors"]]
    except PackedStateError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise PackedStateError(f"{LAYOUT_KEY}: not a packed-state layout ({err})") from None


def is_packed(arrays: Mapping[str, Any]) -> bool:
    return LAYOUT_KEY in arrays


def packed_shapes(arrays: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the layout alone (or from an unpacked mapping's arrays)."""
    if not is_packed(arrays):
        return {name: tuple(array.shape) for name, array in arrays.items()}
    return {name: shape for name, _, shape in _layout(arrays)}


def unpack_state(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict :func:`pack_state` packed (an unpacked mapping: its arrays as tensors).

    Raises :class:`PackedStateError` when the layout and the data disagree (unknown dtype,
    sizes that do not add up, extra arrays, a name twice)."""
    if not is_packed(arrays):
        return {name: torch.from_numpy(_numpy(value).copy()) for name, value in arrays.items()}
    layout = _layout(arrays)
    expected = {DATA_PREFIX + dtype for _, dtype, _ in layout} | {LAYOUT_KEY}
    if set(arrays.keys()) != expected:
        raise PackedStateError(f"arrays {sorted(set(arrays.keys()) ^ expected)}: the packed "
                               f"layout does not name exactly the arrays present")
    data = {key: _numpy(arrays[key]) for key in expected - {LAYOUT_KEY}}
    offsets = dict.fromkeys(data, 0)
    state: dict[str, torch.Tensor] = {}
    for name, dtype, shape in layout:
        key = DATA_PREFIX + dtype
        if name in state:
            raise PackedStateError(f"{name}: packed twice")
        if data[key].dtype.name != dtype or data[key].ndim != 1:
            raise PackedStateError(f"{key}: holds {data[key].dtype.name}{list(data[key].shape)}, "
                                   f"the layout says flat {dtype}")
        count = math.prod(shape)
        start, offsets[key] = offsets[key], offsets[key] + count
        if offsets[key] > data[key].size:
            raise PackedStateError(f"{name}: runs past the end of {key}")
        state[name] = torch.from_numpy(data[key][start:offsets[key]].copy().reshape(shape))
    left = [key for key, offset in offsets.items() if offset != data[key].size]
    if left:
        raise PackedStateError(f"{left[0]}: holds values the layout does not account for")
    return state
