"""A site's manifest: one row per scan, naming its patient, image, label and attributes.

The manifest is CSV (header row) or YAML (a list of mappings), chosen by the file's
extension. Image and label paths are relative to the site folder. Every problem is one
:class:`SiteDataError` line: ``<file or row>: <problem>; <fix>``.

Patient ids are compared case- and whitespace-insensitively (:func:`patient_key`): "P1", "p1"
and "P 1" name one patient, and the normalised key is what groups, samples and counts patients.
Two spellings of one key in a manifest are refused, naming both rows: a person split into two
"patients" would be clipped twice, doubling their sensitivity.
"""

from __future__ import annotations

import csv
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from configs.strict_yaml import YamlFileError, read_yaml

REQUIRED_COLUMNS = ("patient_id", "image", "label")
_REQUIRED_TEXT = ", ".join(REQUIRED_COLUMNS)


class SiteDataError(ValueError):
    """Site data that cannot be used. One line: ``<file or manifest row>: <problem>; <fix>``."""


def patient_key(patient_id: str) -> str:
    """The identity of a patient id: Unicode-normalised (NFKC), case-folded, without any
    whitespace. Ids with the same key are the same patient."""
    return "".join(unicodedata.normalize("NFKC", patient_id).casefold().split())


@dataclass(frozen=True)
class ScanRecord:
    """One manifest row. ``attributes`` holds the optional columns as raw text."""

    patient_id: str
    image: Path
    label: Path
    attributes: dict[str, str]
    # Where the row is written ("manifest.csv line 3"), for messages only.
    where: str = field(default="", compare=False, repr=False)

    @property
    def patient_key(self) -> str:
        """The normalised patient id (:func:`patient_key`) that groups this row's patient."""
        return patient_key(self.patient_id)


def _cell(column: str, text: str) -> str:
    # patient_id keeps its spaces until the collision check, so "P1 " next to "P1" is reported.
    return text if column == "patient_id" else text.strip()


def _read_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The manifest's rows as ``(where, {column: text})``; raises if it cannot be read at all."""
    if not path.is_file():
        raise SiteDataError(f"{path}: manifest not found; create it with columns {_REQUIRED_TEXT} "
                            f"(one row per scan) or name the right manifest file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv_rows(path)
    elif suffix in (".yaml", ".yml"):
        try:
            data = read_yaml(path, "manifest", allow_empty=True)
        except YamlFileError as err:
            raise SiteDataError(f"{err} (a list of mappings with keys {_REQUIRED_TEXT})") from None
        data = [] if data is None else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SiteDataError(f"{path}: must be a list of mappings (one per scan); write "
                                f"'- {{patient_id: ..., image: ..., label: ...}}' entries")
        rows = [(f"{path} entry {i}",
                 {str(k): "" if v is None else _cell(str(k), str(v)) for k, v in row.items()})
                for i, row in enumerate(data, start=1)]
    else:
        raise SiteDataError(f"{path}: unsupported manifest type {path.suffix!r}; "
                            f"use .csv, .yaml or .yml")
    if not rows:
        raise SiteDataError(f"{path}: the manifest has no rows; add one row per scan with "
                            f"columns {_REQUIRED_TEXT}")
    columns = set().union(*(row for _, row in rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing and suffix == ".csv" and any(";" in c or "\t" in c for c in columns):
        separator = "semicolons" if any(";" in c for c in columns) else "tabs"
        raise SiteDataError(f"{path}: the columns are separated by {separator}; save the "
                            f"manifest comma-separated (columns {_REQUIRED_TEXT})")
    if missing:
        raise SiteDataError(f"{path}: missing column {', '.join(map(repr, missing))}; "
                            f"the required columns are {_REQUIRED_TEXT}")
    return rows


def _read_csv_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """A CSV manifest's rows; one :class:`SiteDataError` line for binary or non-UTF-8 files."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise SiteDataError(f"{path}: is a binary file, not a CSV manifest; name the manifest "
                            f"with columns {_REQUIRED_TEXT}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SiteDataError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                            f"save the manifest as UTF-8") from None
    try:
        reader = csv.DictReader(text.splitlines(), skipinitialspace=True)
        return [(f"{path} line {reader.line_num}",
                 {k.strip(): _cell(k.strip(), v or "") for k, v in row.items()
                  if k is not None})
                for row in reader]
    except csv.Error as err:
        raise SiteDataError(f"{path}: not a readable CSV file ({err}); save the manifest "
                            f"as plain comma-separated text") from None


def _resolve_in_site(site_dir: Path, written: str, role: str, where: str,
                     allow_outside: bool) -> tuple[Path | None, str | None]:
    """``written`` (a manifest path) resolved against the site folder, or a problem line.

    The resolved path (``..`` and symbolic links followed) must lie inside ``site_dir`` unless
    ``allow_outside`` (``data.allow_outside_paths``).
    """
    try:
        resolved = (site_dir / written).resolve()
    except (OSError, RuntimeError):
        return None, (f"{where}: {role} {written!r} is a symbolic link loop; fix or remove the "
                      f"link in the site folder")
    if not allow_outside and site_dir != resolved and site_dir not in resolved.parents:
        return None, (f"{where}: {role} {written!r} resolves to {resolved}, outside the site "
                      f"folder {site_dir}; move the file into the site folder (or set "
                      f"data.allow_outside_paths: true)")
    return resolved, None


def inspect_manifest(site_dir: Path, manifest: str = "manifest.csv", *,
                     allow_outside: bool = False) -> tuple[list[ScanRecord], list[str]]:
    """Read a manifest, collecting every row problem instead of stopping at the first.

    Image and label paths must resolve inside ``site_dir`` unless ``allow_outside``.

    Returns the usable records (bad and duplicated rows left out) and one line per problem.
    Raises :class:`SiteDataError` only when the manifest cannot be read at all.
    """
    site_dir = Path(site_dir).resolve()
    records: list[ScanRecord] = []
    problems: list[str] = []
    seen_rows: dict[tuple, str] = {}
    seen_images: dict[Path, str] = {}
    spellings: dict[str, tuple[str, str]] = {}   # patient key -> (first spelling, its row)
    for where, row in _read_rows(site_dir / manifest):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        empty = [c for c in REQUIRED_COLUMNS if c in row and not row[c].strip()]
        if missing:
            problems.append(f"{where}: missing column {', '.join(map(repr, missing))}; every row "
                            f"needs the required columns {_REQUIRED_TEXT}")
            continue
        if empty:
            problems.append(f"{where}: empty {', '.join(empty)}; fill it in (patient_id groups "
                            f"a patient's scans; image and label are paths in the site folder)")
            continue
        key = tuple(sorted({**row, "patient_id": row["patient_id"].strip()}.items()))
        image, problem = _resolve_in_site(site_dir, row["image"], "image", where, allow_outside)
        label, label_problem = _resolve_in_site(site_dir, row["label"], "label", where,
                                                allow_outside)
        if problem or label_problem:
            problems.append(problem or label_problem)
            continue
        if image == label:
            problems.append(f"{where}: image and label are the same file ({row['image']}); "
                            f"point label at the scan's label map")
            continue
        if key in seen_rows:
            problems.append(f"{where}: repeats {seen_rows[key]} exactly; remove the duplicate row")
            continue
        if image in seen_images:
            problems.append(f"{where}: image {row['image']} is already listed at "
                            f"{seen_images[image]}; list each scan once")
            continue
        pid = row["patient_id"]
        first = spellings.setdefault(patient_key(pid), (pid, where))
        if first[0] != pid:
            problems.append(f"{where}: patient_id {pid!r} and {first[1]}: patient_id "
                            f"{first[0]!r} are the same patient when case and spaces are "
                            f"ignored; spell one patient's id the same way in every row (or give "
                            f"two patients distinct ids)")
            continue
        seen_rows[key], seen_images[image] = where, where
        attributes = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS}
        records.append(ScanRecord(pid.strip(), image, label, attributes, where))
    return records, problems


def read_manifest(site_dir: Path, manifest: str = "manifest.csv", *,
                  allow_outside: bool = False) -> list[ScanRecord]:
    """The manifest's rows as records; :class:`SiteDataError` on the first problem."""
    records, problems = inspect_manifest(site_dir, manifest, allow_outside=allow_outside)
    if problems:
        raise SiteDataError(problems[0])
    return records


def inspect_attributes(records: Sequence[ScanRecord], names: Sequence[str]
                       ) -> tuple[np.ndarray, list[str]]:
    """The requested attributes as numbers, collecting one problem line per bad value.

    Returns a float32 array (N, A), ``A = len(names)``, with NaN where a value is bad.
    """
    values = np.full((len(records), len(names)), np.nan, dtype=np.float32)
    problems = []
    fix = "or drop it from model.conditioning.attributes"
    for i, record in enumerate(records):
        for j, name in enumerate(names):
            text = record.attributes.get(name, "")
            if not text:
                problems.append(f"{record.where}: attribute {name!r} requested for conditioning "
                                f"is missing; give it a value in every row {fix}")
                continue
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                problems.append(f"{record.where}: attribute {name!r} is {text!r}, not a finite "
                                f"number; encode it numerically (e.g. sex as 0/1) {fix}")
                continue
            values[i, j] = number
    return values, problems


def attribute_matrix(records: Sequence[ScanRecord], names: Sequence[str]) -> np.ndarray:
    """The requested attributes, float32 (N, A); :class:`SiteDataError` on the first bad value."""
    values, problems = inspect_attributes(records, names)
    if problems:
        raise SiteDataError(problems[0])
    return values
