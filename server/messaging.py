"""Send messages over a Flower ``Grid`` and take the replies one by one, as they arrive.

``Grid.send_and_receive`` holds every reply until the last one is in (and polls every 3 s in
deployment). :class:`ReplyStream` pushes the messages, then pulls what has arrived every
``poll`` seconds and yields each reply at once, so the caller can check it, record it, fold it
into a running sum and drop it: the server never holds more than one round's pull at a time.

Every reply is attributed to the node the message was SENT to, found through the reply's
``reply_to_message_id``: an error reply made by the SuperLink (e.g. for a node that went
offline) carries the SuperLink's own node id as its source, not the site's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.2


class ReplyStream:
    """Iterate ``(destination node id, reply)`` pairs as the replies arrive, for at most
    ``timeout`` seconds; afterwards :attr:`missing` lists the nodes that did not answer."""

    def __init__(self, grid: Grid, messages: Iterable[Message], timeout: float,
                 poll: float = POLL_SECONDS):
        self.grid, self.timeout, self.poll = grid, float(timeout), float(poll)
        self.messages = list(messages)
        self.missing: list[int] = []

    def __iter__(self) -> Iterator[tuple[int, Message]]:
        destinations = [int(m.metadata.dst_node_id) for m in self.messages]
        ids = list(self.grid.push_messages(self.messages))
        self.messages = []   # the payloads are on their way; do not keep them
        pending = {mid: node for mid, node in zip(ids, destinations) if mid}
        self.missing = [node for mid, node in zip(ids, destinations) if not mid]
        deadline = time.monotonic() + self.timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        self.missing += sorted(pending.values())
