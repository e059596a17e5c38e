"""fedsynth's log lines where a Flower deployment shows them (no Flower import: only its logger's name)."""

from __future__ import annotations

import logging

PACKAGES = ("server", "client", "privacy", "models")


def show_in_flower_log(names: tuple[str, ...] = PACKAGES) -> None:
    """Send fedsynth's INFO lines through the ``flwr`` logger's handlers, so that they reach the
    SuperNode's log and the SuperLink's (hence ``flwr run --stream``): Python's default drops INFO."""
    handlers = logging.getLogger("flwr").handlers
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
