"""``fedsynth report``: a site ledger's epsilon report for the privacy officer.

Spend per privacy event (DP-SGD round or DP-gate charge) and cumulative - the same figure the site
enforces, so the rows add up to it - the remaining budget, delta and accountant, an
epsilon-vs-round plot, the epsilon recomputed with an independent accountant (Google's
dp_accounting, plus the gate charges) side by side with the ledger's, and what the guarantee covers
and does not. The plot is written next to
``--out`` (``<stem>.epsilon.png``; also embedded in HTML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="epsilon report of a site ledger (md, json or html)",
        description="Build the privacy officer's report from a site ledger: spend per round and "
                    "cumulative, remaining budget, an epsilon plot, an independent recomputation "
                    "(dp_accounting) and the scope of the guarantee. Exit 1 if the ledger's chain "
                    "is broken or the independent check disagrees.")
    parser.add_argument("--ledger", type=Path, required=True, metavar="LEDGER", help="site ledger")
    parser.add_argument("--format", choices=("md", "json", "html"), default="md",
                        help="output format (default md)")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="write the report here (and the plot next to it, <stem>.epsilon.png); "
                             "default: print the report, no plot")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    if args.out is not None:
        from experiments.preflight import check_output_file

        check_output_file(args.out, inputs=(args.ledger, Path(f"{args.ledger}.head")))
        check_output_file(args.out.with_name(args.out.stem + ".epsilon.png"), option="the plot",
                          inputs=(args.ledger, Path(f"{args.ledger}.head")))
    from privacy.durable import atomic_write_bytes
    from privacy.ledger import verify_ledger
    from privacy.report import build_report, plot_png, render_html, render_json, render_markdown

    verified = verify_ledger(args.ledger)
    if not verified.ok:
        print(f"{args.ledger}: the hash chain is broken at {verified.problem.describe()}; "
              f"run 'fedsynth audit verify' - no report from an altered ledger", file=sys.stderr)
        return 1
    report = build_report(args.ledger)
    png = plot_png(report) if args.out or args.format == "html" else None
    plot_path = args.out.with_name(args.out.stem + ".epsilon.png") if args.out else None
    if args.format == "md":
        text = render_markdown(report, plot_path.name if plot_path else None)
    elif args.format == "html":
        text = render_html(report, png)
    else:
        text = render_json(report)
    if args.out:
        if plot_path is not None and png is not None:
            atomic_write_bytes(plot_path, png)
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"{args.out}: {args.format} report written (plot {plot_path})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if not report.differentially_private:
        print(f"{args.ledger}: NOT differentially private: {report.non_private_rounds} non-private "
              f"round(s), epsilon = infinity", file=sys.stderr)
    if not report.all_agree:
        print(f"{args.ledger}: the independent accountant disagrees beyond the tolerance; see the "
              f"report", file=sys.stderr)
        return 1
    return 0
