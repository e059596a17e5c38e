"""The site's outbox: the weights of the last committed round, kept until the next one.

A round's weights are written here (atomically, fsync'd) just before the round is committed to the
ledger. If the process dies after the commit but before the weights are sent, the restarted site
sends these same weights again (their hash is in the ledger entry) instead of training and charging
the round a second time.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import torch

from privacy.durable import atomic_write

log = logging.getLogger(__name__)


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class OutboxItem:
    round: int
    model_hash_before: str
    model_hash_after: str
    weights: dict[str, torch.Tensor]


def outbox_path(ledger_path: Path) -> Path:
    """``<ledger>.outbox.pt`` next to the site's ledger."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".outbox.pt")


def write_outbox(path: Path, item: OutboxItem) -> None:
    """Replace the outbox by ``item`` (durable when this returns)."""
    payload = {"round": item.round, "model_hash_before": item.model_hash_before,
               "model_hash_after": item.model_hash_after, "weights": item.weights}
    atomic_write(Path(path), lambda stream: torch.save(payload, stream))


def read_outbox(path: Path) -> OutboxItem | None:
    """The outbox content; None if it is missing, unreadable, or its weights do not match their
    hash."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        item = OutboxItem(int(payload["round"]), str(payload["model_hash_before"]),
                          str(payload["model_hash_after"]), dict(payload["weights"]))
    except Exception as err:  # noqa: BLE001 - any unreadable outbox is simply not reusable
        log.warning("%s: unreadable outbox (%s); it will not be reused", path, err)
        return None
    if weights_hash(item.weights) != item.model_hash_after:
        log.warning("%s: the outbox weights do not match their recorded hash; not reused", path)
        return None
    return item


class CommittedRelease(Protocol):
    """A ledger entry naming released weights (a ``round`` or ``non-private-round`` record)."""

    round: int
    model_hash_before: str
    model_hash_after: str


def committed_weights(ledger_path: Path, round: int, model_hash_before: str,
                      last: CommittedRelease | None) -> OutboxItem | None:
    """The weights to resend when ``round`` is asked again from the same starting weights and
    ``last`` (the newest release entry of that kind in the ledger) already committed it; None when
    this is a new release, or when the outbox lost the committed weights (then the round is trained
    and recorded again, as a new release)."""
    if last is None or last.round != round or last.model_hash_before != model_hash_before:
        return None
    item = read_outbox(outbox_path(ledger_path))
    if item is None or item.round != round or item.model_hash_after != last.model_hash_after:
        log.warning("%s: round %d is committed but its weights are not in the outbox; training it "
                    "again and recording it as a new release", ledger_path, round)
        return None
    log.info("%s: round %d was already committed; resending its weights (not recorded again)",
             ledger_path, round)
    return item
