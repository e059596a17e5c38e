"""``fedsynth data check``: what a site's IT team needs to know before joining.

Checks a site folder's manifest and every scan it lists, prints a summary (patients,
scans, shapes, spacings, orientations, label histogram, attribute ranges) and one line
per problem. Exit 0 when the site is ready, 1 when a problem was found, 2 when the
folder or manifest cannot be read.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="check a site's scans and manifest",
        description="Inspect a site's data folder (NIfTI images, label maps, manifest).")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    check = actions.add_parser(
        "check", help="check every file of a site and summarise it",
        description="Check a site's manifest and every scan it lists, report all problems "
                    "(one line each) and summarise the data. Exit 0 if the site is ready, "
                    "1 if a problem was found, 2 if the folder or manifest cannot be read.")
    check.add_argument("site_dir", type=Path, metavar="SITE_DIR", help="the site's data folder")
    check.add_argument("--manifest", metavar="NAME",
                       help="manifest file in SITE_DIR, .csv or .yaml (default: the config's "
                            "data.manifest, else manifest.csv)")
    check.add_argument("--config", type=Path, metavar="CONFIG",
                       help="experiment config: label names, conditioning attributes "
                            "(default: the built-in data defaults)")
    check.set_defaults(handler=_check)
    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _tally(values) -> str:
    """``"16x16x16 (3), 24x24x24 (1)"``: distinct values with their scan counts."""
    return ", ".join(f"{value} ({count})" for value, count in Counter(values).most_common())


def _grid(values) -> str:
    return "x".join(f"{round(float(v), 3):g}" for v in values)


def _attribute_range(texts: list[str]) -> str:
    present = [t for t in texts if t]
    missing = f", {len(texts) - len(present)} missing" if len(present) < len(texts) else ""
    try:
        numbers = [float(t) for t in present]
    except ValueError:
        numbers = None
    if numbers and all(math.isfinite(n) for n in numbers):
        return f"{min(numbers):g}..{max(numbers):g}{missing}"
    distinct = sorted(set(present))
    shown = ", ".join(distinct[:8]) + (", ..." if len(distinct) > 8 else "")
    return f"{{{shown}}}{missing}"


def _check(args: argparse.Namespace) -> int:
    from client.manifest import SiteDataError, inspect_manifest
    from configs import DataConfig, load_config

    if args.config is not None:
        config = load_config(args.config, check_paths=False)
        data, attributes = config.data, config.model.conditioning.attributes
    else:
        data, attributes = DataConfig(), []
    if not args.site_dir.is_dir():
        raise SiteDataError(f"{args.site_dir}: site folder not found; pass the folder that "
                            f"holds the manifest, images and labels")
    # An unreadable manifest is refused before torch and MONAI load; row problems are listed below.
    inspect_manifest(args.site_dir, args.manifest or data.manifest,
                     allow_outside=data.allow_outside_paths)
    import numpy as np

    from client.site_data import check_site

    report = check_site(args.site_dir, data, args.manifest or data.manifest, attributes)

    patients = Counter(r.patient_key for r in report.records)
    per_patient = Counter(patients.values())
    infos = [info for _, info in report.scans]
    print(f"site            {report.manifest.parent} ({report.manifest.name})")
    print(f"patients        {len(patients)}")
    print(f"scans           {len(report.records)} ("
          + ", ".join(f"{k} patient{'s' * (k > 1)} with {n} scan{'s' * (n > 1)}"
                      for n, k in sorted(per_patient.items())) + ")")
    if infos:
        counts = np.sum([info.label_counts for info in infos], axis=0)
        fractions = counts / max(int(counts.sum()), 1)
        print(f"shapes          {_tally(_grid(i.shape) for i in infos)}")
        print(f"spacings (mm)   {_tally(_grid(i.spacing) for i in infos)}")
        print(f"orientations    {_tally(i.orientation for i in infos)}")
        print("labels          " + ", ".join(f"{name} {f:.1%}" for name, f in
                                             zip(data.label_names, fractions))
              + f" (voxel fraction over {len(infos)} valid scans)")
    names = sorted({k for r in report.records for k in r.attributes})
    print("attributes      " + (", ".join(
        f"{name} {_attribute_range([r.attributes.get(name, '') for r in report.records])}"
        for name in names) or "none"))
    if attributes:
        print(f"conditioning    {', '.join(attributes)}")
    if not report.problems:
        print("no problems found: the site is ready to join")
        return 0
    print(f"{len(report.problems)} problem{'s' * (len(report.problems) > 1)} found:")
    for problem in report.problems:
        print(f"  {problem}")
    return 1
