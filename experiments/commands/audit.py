"""``fedsynth audit verify``: check a ledger's hash chain (site or consortium ledger).

Exit 0 when every entry is intact; 1 naming the first bad entry (line, seq and what is wrong) when an
entry was edited, deleted, inserted, moved or cut; 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit", help="verify a ledger's hash chain",
        description="Audit tools for the privacy officer.")
    actions = parser.add_subparsers(dest="audit_command", metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check that a ledger was not altered",
        description="Recompute every entry's hash and its link to the previous entry, and compare "
                    "the end of the file with the ledger's head record. Exit 0 if intact, 1 naming "
                    "the first bad entry, 2 if the file cannot be read.")
    verify.add_argument("--ledger", type=Path, required=True, metavar="LEDGER",
                        help="a ledger file (JSON lines), e.g. <site data_dir>/.fedsynth/ledger.jsonl")
    verify.set_defaults(handler=_verify)
    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _verify(args: argparse.Namespace) -> int:
    from privacy.ledger import verify_ledger

    result = verify_ledger(args.ledger)
    kinds = Counter(entry.kind for entry in result.entries)
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "no entries"
    if result.ok:
        head = result.entries[-1].hash[:16] if result.entries else "-"
        print(f"{args.ledger}: intact, {len(result.entries)} entries ({summary}), head {head}")
        return 0
    print(f"{args.ledger}: BROKEN at {result.problem.describe()}")
    print(f"  the {len(result.entries)} entries before it are intact ({summary})")
    return 1
