"""An in-process Flower ``Grid``: every message goes straight to a ClientApp in this process.

No SuperLink, no Ray, no network: each node is a ``Context`` (its node config, e.g. ``partition-id``)
and ``send_and_receive`` calls the ClientApp on each message in turn. The ServerApp's round loop
runs unchanged on top of it. Used to measure Flower's own overhead (the simulation engine's and a
deployment's round time against this one) and to test the round loop quickly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's SuperLink node id, the source of the server's messages


class LoopbackGrid(Grid):
    """Nodes ``2..n+1`` with the given node configs, served by ``client_app`` in this process."""

    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None, run_id: int = 1):
        self.client_app = client_app
        self.contexts = {node: Context(run_id=run_id, node_id=node, node_config=dict(config),
                                       state=RecordDict(), run_config=dict(run_config or {}))
                         for node, config in enumerate(node_configs, start=SERVER_NODE_ID + 1)}
        self._run = Run.create_empty(run_id=run_id)
        self._replies: dict[str, Message] = {}
        # Messages take their run and source from the process's task identity, which Flower's own
        # runtimes set; this process acts as the ServerApp's task.
        try:
            TaskIdentity.run_id
        except RuntimeError:
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, message: Message) -> Message:
        """The ClientApp's reply to one message (an error reply if it raised, as Flower does)."""
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as err:  # noqa: BLE001 - a failing ClientApp becomes an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            # As Flower's own grids do: the message id is set on push, and the reply points to it.
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self._replies[message_id] = self.deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
