"""``fedsynth site-exec``: a hospital's own task runner for ``flower-supernode --isolation process``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from client.site_exec import DEFAULT_POLL_SECONDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site-exec", help="a site's task runner: warm ClientApp processes, approved FABs only",
        description="Run next to `flower-supernode --isolation process --port PORT` at a hospital, "
                    "in place of Flower's flower-superexec. Each message still gets a fresh "
                    "process, forked from a warm parent that imported torch, MONAI, Opacus and "
                    "this site's installed fedsynth once (no per-round import). Tasks of a FAB "
                    "whose hash is not given with --approve-fab are refused before any process "
                    "starts, and no module of any FAB is ever imported: the code that reads the "
                    "scans is the fedsynth installed here. Runtime dependency installation is "
                    "off. Runs until interrupted (Ctrl-C).")
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (its --host and --port; "
                             "e.g. 127.0.0.1:9094)")
    parser.add_argument("--approve-fab", action="append", metavar="SHA256",
                        help="a FAB hash this site approved (repeatable): `sha256sum app.fab`, or "
                             "fab-hash in `flwr ls --run-id N --format json`")
    parser.add_argument("--approve-any-fab", action="store_true",
                        help="run tasks of any FAB (still only with this site's installed code); "
                             "for a local trial")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP to the Runtime API (a SuperNode started without "
                             "--ssl-certfile, listening on loopback)")
    parser.add_argument("--root-certificates", type=Path, metavar="PEM",
                        help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--superexec-auth-secret-file", type=Path, metavar="FILE",
                        help="the shared secret the SuperNode was given with the same flag")
    parser.add_argument("--poll-seconds", type=float, default=DEFAULT_POLL_SECONDS, metavar="S",
                        help=f"how often to ask the SuperNode for a task (default "
                             f"{DEFAULT_POLL_SECONDS})")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from client.site_exec import SiteExecError, check_fab_hash, serve

    if bool(args.approve_fab) == bool(args.approve_any_fab):
        raise SiteExecError("--approve-fab / --approve-any-fab: neither or both given; pass the "
                            "FAB hash(es) this site approved with --approve-fab SHA256, or "
                            "--approve-any-fab for a local trial")
    if args.insecure == (args.root_certificates is not None):
        raise SiteExecError("--insecure / --root-certificates: neither or both given; pass "
                            "--insecure for the SuperNode's Runtime API on loopback without TLS, "
                            "or --root-certificates PEM for one with TLS")
    if not 0.01 <= args.poll_seconds <= 60:
        raise SiteExecError(f"--poll-seconds {args.poll_seconds}: out of range; pass 0.01 to 60")
    host, _, port = args.runtime_api_address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SiteExecError(f"--runtime-api-address {args.runtime_api_address!r}: not HOST:PORT; "
                            f"pass the SuperNode's --host and --port, e.g. 127.0.0.1:9094")
    for path in (args.root_certificates, args.superexec_auth_secret_file):
        if path is not None and not Path(path).is_file():
            raise SiteExecError(f"{path}: file not found; pass the path of an existing file")
    approved = (None if args.approve_any_fab
                else frozenset(check_fab_hash(value) for value in args.approve_fab))
    secret = (Path(args.superexec_auth_secret_file).read_bytes()
              if args.superexec_auth_secret_file else None)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    serve(args.runtime_api_address, approved_fabs=approved, insecure=args.insecure,
          root_certificates_path=str(args.root_certificates) if args.root_certificates else None,
          auth_secret=secret, poll_seconds=args.poll_seconds)
    return 0
