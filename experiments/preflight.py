"""Checks every ``fedsynth`` command runs on its inputs and outputs before any heavy work.

One rule for where a command may write, checked before anything is read or made.

An output FILE (``report --out``, ``evaluate --out``, ``benchmark --out``) is refused when it is an
input of the same command, a folder, or a file fedsynth must never overwrite: a ledger (JSON lines
whose entries carry a hash chain), a ledger's ``.head`` record, or a release manifest (the
``manifest.csv`` beside a ``release_report.json``).

An output FOLDER (``--out`` of cohort, sample, pretrain, federate, release, deploy, sweep) may be
absent, empty, or the command's own earlier output (it holds one of the command's ``own`` marker
files, e.g. a resumable state). Anything else "exists and is foreign" and is refused, as is a folder
that is, or holds, one of the command's input folders (a config file inside a run folder is fine).
Nothing is created here: callers create the folder only after every input has been validated.

Pure standard library, so a refusal never waits for torch or Flower to import.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

LEDGER_HEAD_SUFFIX = ".head"
RELEASE_REPORT = "release_report.json"
# What fedsynth writes into a run folder (pretrain, federate, release defaults, demo).
RUN_FOLDER_MARKERS = ("checkpoint.pt", "pretrain_state.pt", "federation", "mlflow.db", "previews",
                      "public_validation")


class PreflightError(ValueError):
    """Bad command-line input found before any work started. One line: ``where: what; fix``."""


class OutputPathError(PreflightError):
    """An output path that would overwrite an input, a ledger, a release or someone else's files."""


def _resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def _looks_like_ledger(path: Path) -> bool:
    """A JSON-lines file whose first entry carries a hash chain (``seq``, ``hash``)."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(1 << 16)
        entry = json.loads(first.decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and "hash" in entry and "seq" in entry


def protected_kind(path: Path | str) -> str | None:
    """What ``path`` is if fedsynth must never overwrite it (e.g. ``"a privacy ledger"``), else
    None."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.name.endswith(LEDGER_HEAD_SUFFIX):
        owner = path.with_name(path.name[: -len(LEDGER_HEAD_SUFFIX)])
        if owner.exists() or path.parent.name == ".fedsynth":
            return "a ledger's head record"
    if _looks_like_ledger(path):
        return "a privacy ledger"
    if path.name == "manifest.csv" and (path.parent / RELEASE_REPORT).exists():
        return "a release manifest"
    if path.parent.name == ".fedsynth":
        return "a site's privacy record"
    return None


def _same_or_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_file(out: Path | str, *, option: str = "--out",
                      inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse ``out`` as a file to write (see the module docstring): :class:`OutputPathError`."""
    target = _resolved(out)
    where = f"{option} {out}"
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if target == source or (source.is_dir() and _same_or_inside(target, source)
                                and target.exists()):
            raise OutputPathError(f"{where}: is an input of this command ({given}); "
                                  f"write the output to a new file")
    if target.is_dir():
        raise OutputPathError(f"{where}: is an existing folder; name a file inside it, "
                              f"e.g. {Path(out) / 'report.out'}")
    kind = protected_kind(target)
    if kind is not None:
        raise OutputPathError(f"{where}: is {kind}, which fedsynth never overwrites; "
                              f"write the output to a new file")
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputPathError(f"{where}: its parent {target.parent} is a file; "
                              f"choose a path in a folder")


def check_output_folder(out: Path | str, *, option: str = "--out", own: Sequence[str] = (),
                        inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse ``out`` as a folder to write (see the module docstring).

    ``own`` names the files or folders whose presence shows that ``out`` is this command's own
    earlier (resumable or reusable) output. Raises :class:`OutputPathError`.
    """
    target = _resolved(out)
    where = f"{option} {out}"
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if source == target or (source.is_dir() and target in source.parents):
            raise OutputPathError(f"{where}: is or holds an input folder of this command "
                                  f"({given}); choose a new output folder")
    if not target.exists():
        parent = next((p for p in target.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputPathError(f"{where}: {parent} is a file; choose a folder path")
        return
    if not target.is_dir():
        raise OutputPathError(f"{where}: exists and is a file; choose a folder path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries or any((target / name).exists() for name in own):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise OutputPathError(f"{where}: exists and holds files fedsynth did not write ({shown}); "
                          f"choose a new or empty folder")


@contextlib.contextmanager
def removed_if_failed(out: Path | str, keep: Sequence[str] = ()) -> Iterator[None]:
    """Remove ``out`` again if the command fails with an error and ``out`` did not exist before.

    A folder that holds one of ``keep`` (a resumable state) stays, and so does everything after an
    interruption (Ctrl-C): ``--resume`` continues from it.
    """
    out = Path(out)
    existed = out.exists() or out.is_symlink()
    try:
        yield
    except Exception:
        if not existed and out.is_dir() and not any((out / name).exists() for name in keep):
            shutil.rmtree(out, ignore_errors=True)
        raise
