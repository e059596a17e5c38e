"""``fedsynth dossier``: the privacy officer's one-page dossier of a release (HTML + JSON twin)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dossier", help="one self-contained HTML page (+ JSON) for signing off a release",
        description="Gather, for one release: per site the epsilon and delta, accountant, sigma, "
                    "C, q, steps and rounds recomputed from its ledger, the ledger head and the "
                    "reconcile result; the empirical audits (canaries, membership, "
                    "memorization); the gate's policy, counts and caveat; the model and code "
                    "hashes. Writes OUT (HTML, PNGs embedded), OUT with .json, and OUT.sha256 "
                    "(the SHA-256 of the HTML bytes). Exit 1 when a ledger is broken, a recheck "
                    "or reconcile fails, or a canary bound exceeds its accountant epsilon.")
    parser.add_argument("--release", type=Path, required=True, metavar="DIR",
                        help="the output folder of `fedsynth release` (release_report.json)")
    parser.add_argument("--site-ledger", action="append", default=[], metavar="SITE=PATH",
                        help="a site's ledger, e.g. site_0=<data_dir>/.fedsynth/ledger.jsonl "
                             "(repeat per site)")
    parser.add_argument("--consortium-ledger", type=Path, metavar="LEDGER",
                        help="RUN_DIR/federation/consortium_ledger.jsonl (enables reconcile)")
    parser.add_argument("--audits", action="append", type=Path, default=[], metavar="PATH",
                        help="an audit folder or file (canary_audit.json, membership_audit.json, "
                             "memorization_audit.json + .png); repeatable")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.html",
                        help="the dossier page")
    parser.set_defaults(handler=_dossier)


def _site_ledgers(values: list[str]) -> dict[str, Path]:
    from server.dossier import DossierError

    ledgers: dict[str, Path] = {}
    for value in values:
        site_id, sep, path = value.partition("=")
        if not sep or not site_id or not path:
            raise DossierError(f"--site-ledger {value!r}: expected SITE=PATH; pass e.g. "
                               f"site_0=data/site_0/.fedsynth/ledger.jsonl")
        if site_id in ledgers:
            raise DossierError(f"--site-ledger: site {site_id!r} given twice; pass each site once")
        ledgers[site_id] = Path(path)
    return ledgers


def _check_outputs(args: argparse.Namespace, ledgers: dict[str, Path]) -> None:
    """The page, its JSON twin and checksum follow the output-file rule (experiments.preflight)."""
    from experiments.preflight import check_output_file

    inputs = [args.release, args.consortium_ledger, *ledgers.values(), *args.audits]
    for path in (args.out, args.out.with_suffix(".json"), Path(f"{args.out}.sha256")):
        check_output_file(path, option="--out" if path == args.out else "the dossier's",
                          inputs=inputs)


def _dossier(args: argparse.Namespace) -> int:
    ledgers = _site_ledgers(args.site_ledger)
    _check_outputs(args, ledgers)
    from server.dossier import build_dossier, write_dossier

    dossier = build_dossier(args.release, ledgers,
                            args.consortium_ledger, args.audits)
    page, twin, checksum = write_dossier(dossier, args.out)
    print(f"wrote {page} ({len(dossier.sites)} site(s), "
          f"{sum(len(v) for v in dossier.audits.values())} audit(s))")
    print(f"  JSON twin {twin}; SHA-256 of the page in {checksum}")
    problems = [s["site_id"] for s in dossier.sites if not s["chain_intact"]
                or not s["recheck_agrees"] or s["reconcile"]["ok"] is False]
    problems += [f"canary audit {a['file']}" for a in dossier.audits.get("canary_audit", [])
                 if a.get("exceeds_accountant")]
    if problems:
        print(f"  PROBLEM: {', '.join(problems)}")
        return 1
    return 0
