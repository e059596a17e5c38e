"""``fedsynth audit verify``: check a ledger's hash chain (site or consortium ledger).

Exit 0 when every entry is intact; 1 naming the first bad entry (line, seq and what is wrong) when
an entry was edited, deleted, inserted, moved or cut, when the ledger's ``.head`` record is missing
(so a cut tail could not be seen), or when the file is empty; 2 when the file cannot be read.
``reconcile`` covers the site's DP-SGD rounds and its DP-gate charges.
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
                    "the first bad entry (or a missing head record, or an empty file), 2 if the "
                    "file cannot be read.")
    verify.add_argument("--ledger", type=Path, required=True, metavar="LEDGER",
                        help="a ledger file (JSON lines), e.g. "
                             "<site data_dir>/.fedsynth/ledger.jsonl")
    verify.set_defaults(handler=_verify)
    reconcile = actions.add_parser(
        "reconcile", help="compare a site's ledger with the consortium's mirror of it",
        description="Check every spend the consortium ledger recorded for the site against the "
                    "site's own ledger. Exit 1 naming any ROLLBACK (the site ledger is shorter than "
                    "what the consortium saw) or DIVERGENCE (a different entry or epsilon there), 0 "
                    "when they agree, 2 if a file cannot be read. With --clear-alarm --officer NAME, "
                    "then clear the site's rollback alarm (only once the ledgers agree).")
    reconcile.add_argument("--site-ledger", type=Path, required=True, metavar="LEDGER",
                           help="the site's ledger, e.g. <site data_dir>/.fedsynth/ledger.jsonl")
    reconcile.add_argument("--consortium-ledger", type=Path, required=True, metavar="LEDGER",
                           help="RUN_DIR/federation/consortium_ledger.jsonl")
    reconcile.add_argument("--site", metavar="SITE_ID", help="the site's id (default: inferred)")
    reconcile.add_argument("--clear-alarm", action="store_true",
                           help="clear the site's rollback alarm once the ledgers agree")
    reconcile.add_argument("--officer", metavar="NAME", default="",
                           help="the privacy officer clearing the alarm (recorded with it)")
    reconcile.set_defaults(handler=_reconcile)
    from experiments.commands.release import add_memorization_action
    add_memorization_action(actions)
    from experiments.commands.empirical_audits import add_empirical_actions
    add_empirical_actions(actions)
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


def _reconcile(args: argparse.Namespace) -> int:
    from server.reconcile import clear_rollback_alarm, reconcile

    if args.site is not None:
        _check_site_is_known(args.site, args.consortium_ledger)
    report = reconcile(args.site_ledger, args.consortium_ledger, args.site)
    print("\n".join(report.lines()))
    if args.clear_alarm:
        archived = clear_rollback_alarm(args.site_ledger, report, args.officer)
        print(f"rollback alarm cleared by {args.officer}; archived as {archived}")
    return 0 if report.ok else 1


def _check_site_is_known(site_id: str, consortium_ledger: Path) -> None:
    """:class:`ReconcileError` unless the consortium ledger names ``site_id`` (in its start
    record or a site report): reconciling an unknown site would compare nothing and say ok."""
    from privacy.ledger import LedgerError
    from server.consortium_ledger import read_consortium_ledger
    from server.reconcile import ReconcileError

    try:
        view = read_consortium_ledger(consortium_ledger)
    except LedgerError as err:
        raise ReconcileError(str(err)) from None
    known = set(view.site_ids())
    for entry in view.entries:
        sites = entry.payload.get("sites") if isinstance(entry.payload, dict) else None
        if isinstance(sites, list):
            known.update(str(s) for s in sites)
    if site_id not in known:
        raise ReconcileError(f"--site {site_id}: the consortium ledger {consortium_ledger} names "
                             f"no such site (sites: {', '.join(sorted(known)) or 'none'}); pass "
                             f"one of them")
