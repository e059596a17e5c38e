"""``fedsynth benchmark``: run every benchmark and write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.device_option import add_device_option, checked_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="run the benchmarks and write BENCHMARKS.md",
        description="Run every benchmark in experiments/benchmarks (DP vs non-DP step, latent vs "
                    "pixel sampling, federation overhead, gate throughput, ...) and write the "
                    "measured ratios with the machine they ran on.")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"),
                        help="where to write the report (default: ./BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats (a smoke run, not for quoting)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    add_device_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from experiments.preflight import check_output_file

    check_output_file(args.out)
    from experiments.benchmarks.run_all import run_all

    try:
        results = run_all(args.out, quick=args.quick, only=args.only,
                          device=checked_device(args.device))
    except ValueError as err:
        print(f"fedsynth benchmark: error: {err}", file=sys.stderr)
        return 2
    failed = [name for name, result in results.items()
              if isinstance(result, dict) and "error" in result]
    print(f"wrote {args.out} ({len(results)} benchmarks"
          f"{', failed: ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0
