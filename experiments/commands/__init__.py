"""One module per ``fedsynth`` subcommand group; each exposes ``register(subparsers)``."""
