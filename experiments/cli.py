"""The ``fedsynth`` command line.

Each subcommand lives in its own module under :mod:`experiments.commands` and exposes
``register(subparsers)``; its handler returns the exit code. Heavy libraries (torch,
MONAI, Flower) are imported inside the handlers, so ``fedsynth --help`` stays fast.

Exit codes: 0 success; 1 a check ran and found a problem (``audit verify``,
``data check``); 2 bad input (usage, config, data, checkpoint); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import errno
import sys
import typing
from importlib.metadata import PackageNotFoundError, version

# One module per command group, in the order ``fedsynth --help`` lists them.
COMMAND_MODULES = [
    "experiments.commands.demo",
    "experiments.commands.config",
    "experiments.commands.cohort",
    "experiments.commands.data",
    "experiments.commands.pretrain",
    "experiments.commands.sample",
    "experiments.commands.evaluate",
    "experiments.commands.budget",
    "experiments.commands.audit",
    "experiments.commands.report",
    "experiments.commands.dossier",
    "experiments.commands.federate",
    "experiments.commands.deploy",
    "experiments.commands.site_exec",
    "experiments.commands.release",
    "experiments.commands.sweep",
    "experiments.commands.benchmark",
]

# Exceptions that mean "the user's input is wrong": printed as one line, exit 2.
USER_ERRORS = [
    ("configs.loader", "ConfigError"),
    ("experiments.preflight", "PreflightError"),
    ("experiments.demo", "DemoError"),
    ("experiments.sweep", "SweepError"),
    ("experiments.sampling", "SampleInputError"),
    ("server.tracking", "TrackingError"),
    ("client.site_data", "SiteDataError"),
    ("client.manifest", "SiteDataError"),
    ("models.checkpoint", "CheckpointError"),
    ("models.volume_io", "VolumeError"),
    ("experiments.pretrain", "PretrainError"),
    ("experiments.cohort", "CohortError"),
    ("experiments.evaluate", "EvaluationError"),
    ("models.metrics", "MetricInputError"),
    ("privacy.ledger", "LedgerError"),
    ("privacy.calibration", "CalibrationError"),
    ("privacy.budget", "BudgetExhausted"),
    ("privacy.budget", "PlanMismatch"),
    ("privacy.dp_trainer", "DPSetupError"),
    ("experiments.commands.budget", "PatientsOptionError"),
    ("server.federation", "FederationError"),
    ("server.federation", "FederationHalted"),
    ("server.round_checkpoint", "StateError"),
    ("server.public_validation", "ValidationSetError"),
    ("experiments.deployment", "DeployError"),
    ("server.reconcile", "ReconcileError"),
    ("privacy.rollback_guard", "AlarmNotResolved"),
    ("server.release", "ReleaseError"),
    ("server.server_app", "RunConfigError"),
    ("experiments.commands.release", "ReleaseWhereError"),
    ("privacy.gate", "GateError"),
    ("client.memorization", "MemorizationAuditError"),
    ("privacy.canary_audit", "CanaryAuditError"),
    ("client.membership_audit", "MembershipAuditError"),
    ("server.dossier", "DossierError"),
    ("models.device", "DeviceError"),
    ("client.site_exec", "SiteExecError"),
]

log = logging.getLogger("fedsynth")


def fedsynth_version() -> str:
    try:
        return version("fedsynth")
    except PackageNotFoundError:
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (what, where, how to fix), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"fedsynth: error: {self.prog}: {_one_line(message)}; "
                     f"see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsynth",
        description="Federated, differentially private 3D latent diffusion for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"fedsynth {fedsynth_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is (a subclass of) a USER_ERRORS class.

    Matched by the defining module and name of each class in ``err``'s MRO, or through
    ``sys.modules`` for a class registered under a module that re-exports it. Nothing is imported:
    importing the listed modules (torch, Flower, MLflow) would make every refusal take seconds.
    """
    registered = set(USER_ERRORS)
    for cls in type(err).__mro__:
        if (cls.__module__, cls.__qualname__) in registered:
            return True
        if any(cls.__name__ == name and getattr(sys.modules.get(module), name, None) is cls
               for module, name in USER_ERRORS):
            return True
    return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _environment_error(err: BaseException) -> str | None:
    """One line for a file the user named that cannot be read or written, else None."""
    if isinstance(err, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({err.reason} at byte {err.start}); "
                f"save it as UTF-8 text")
    if isinstance(err, OSError) and err.filename is not None:
        fix = {"ELOOP": "a symbolic link points back at itself; fix or remove the link",
               "EACCES": "check its permissions",
               "EISDIR": "it is a folder; name a file",
               "ENOTDIR": "a part of the path is a file; fix the path",
               "ENOSPC": "the disk is full; free space and run again"}
        code = errno.errorcode.get(err.errno or 0, "")
        return f"{err.filename}: {err.strerror or err}; {fix.get(code, 'check the path')}"
    if isinstance(err, MemoryError):
        return "out of memory; use smaller sizes or fewer samples"
    return None


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # the libraries' chatter drowns out ours
        for noisy in ("flwr", "mlflow", "alembic", "urllib3", "matplotlib", "PIL", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("fedsynth: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only known user errors are shown as one line
        if is_user_error(err):
            print(f"fedsynth {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        environment = None if args.verbose else _environment_error(err)
        if environment is not None:
            print(f"fedsynth {args.command}: error: {_one_line(environment)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
