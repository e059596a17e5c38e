"""The privacy officer's dossier: ONE self-contained HTML page (PNGs embedded as base64, no
external resource) plus a JSON twin, for one release.

It gathers what an officer signs off, each figure recomputed from its source:

- per site, from the site's own ledger (:func:`privacy.report.build_report`): epsilon spent, delta,
  the accountant, sigma, C, q, steps and rounds, the independent recheck, the chain check, the
  ledger head; and the reconcile result against the consortium ledger
  (:func:`server.reconcile.reconcile`) when that ledger is given;
- the empirical audits when present: ``canary_audit.json`` (one-run lower bound next to the
  accountant's epsilon), ``membership_audit.json`` (AUC, TPR at low FPR),
  ``memorization_audit.json`` with its histogram ``memorization_audit.png``;
- the release gate's policy, counts and caveat (``release_report.json`` of the release folder);
- the model hash (the release report's) and the code hash: SHA-256 over the sorted
  (relative path, SHA-256 of the content) of every ``.py`` file of fedsynth's packages (configs,
  models, privacy, client, server, experiments) that produced the dossier.

The dossier's own SHA-256 is the SHA-256 of the HTML file's bytes exactly as written. A file cannot
contain its own hash, so it is written beside it: in the JSON twin (``dossier_sha256``) and in
``<name>.html.sha256`` (``sha256sum`` format: check with ``sha256sum -c``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from privacy.dp_gate import GATE_KIND
from privacy.durable import atomic_write_bytes
from privacy.ledger import LedgerError, verify_ledger
from privacy.site_ledger import fedsynth_version, utc_timestamp

CODE_PACKAGES = ("configs", "models", "privacy", "client", "server", "experiments")
AUDIT_FILES = ("canary_audit.json", "membership_audit.json", "memorization_audit.json")


class DossierError(ValueError):
    """Dossier inputs that cannot be used. One line: what, where, and the fix."""


@dataclass
class Dossier:
    """Everything the page shows (``to_json`` is the JSON twin, less the page's own hash)."""

    generated: str
    release: str
    release_report: dict[str, Any]
    sites: list[dict[str, Any]] = field(default_factory=list)
    audits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"generated": self.generated, "release": self.release,
                "release_report": self.release_report, "sites": self.sites,
                "audits": self.audits, "hashes": self.hashes,
                "images": sorted(self.images)}


def code_sha256(root: Path | None = None) -> str:
    """SHA-256 over the sorted (relative path, content SHA-256) of the packages' ``.py`` files."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            digest.update(f"{relative}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _finite(value: Any) -> Any:
    """JSON-safe numbers: inf/nan as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def site_section(site_id: str, ledger: Path, consortium: Path | None) -> tuple[dict[str, Any],
                                                                              bytes | None]:
    """One site's figures from its own ledger (and the reconcile result), and its epsilon plot."""
    from privacy.report import build_report, plot_png
    from server.reconcile import ReconcileError, reconcile

    verified = verify_ledger(ledger)
    report = build_report(ledger)
    plan = report.plan
    head = verified.entries[-1].hash if verified.entries else ""
    row: dict[str, Any] = {
        "site_id": site_id, "ledger": str(ledger), "chain_intact": verified.ok,
        "chain_problem": verified.problem.describe() if verified.problem else "",
        "ledger_seq": len(verified.entries), "ledger_head": head,
        "epsilon": report.spent, "delta": report.delta, "cap": report.cap,
        "accountant": report.accountant, "noise_multiplier": plan.get("noise_multiplier"),
        "max_grad_norm": plan.get("max_grad_norm"), "sample_rate": plan.get("sample_rate"),
        "clipping": plan.get("clipping"),
        "steps": sum(r.steps for r in report.rows), "rounds": len(report.rows),
        "independent_rdp": report.independent_total_rdp,
        "independent_pld": report.independent_total_pld,
        "recheck_agrees": report.all_agree, "other_entries": report.other_entries,
        "gate_charges": int(report.other_entries.get(GATE_KIND, 0)),
        "differentially_private": report.differentially_private,
    }
    if consortium is not None:
        try:
            result = reconcile(ledger, consortium, site_id)
            row["reconcile"] = {"ok": result.ok, "lines": result.lines()}
        except (ReconcileError, LedgerError) as err:
            row["reconcile"] = {"ok": False, "lines": [f"could not reconcile: {err}"]}
    else:
        row["reconcile"] = {"ok": None, "lines": ["not checked (no consortium ledger given)"]}
    plot = plot_png(report) if report.rows else None
    return _finite(row), plot


def _find_audits(paths: Sequence[Path]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {name: [] for name in AUDIT_FILES}
    for path in paths:
        candidates = [path / name for name in AUDIT_FILES] if path.is_dir() else [path]
        hits = [c for c in candidates if c.is_file() and c.name in AUDIT_FILES]
        if not path.exists() or (not path.is_dir() and not hits):
            raise DossierError(f"--audits {path}: not an audit file or folder; pass a folder or "
                               f"one of {', '.join(AUDIT_FILES)}")
        for hit in hits:
            found[hit.name].append(hit)
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DossierError(f"{path}: unreadable JSON ({type(err).__name__}); restore the "
                           f"file") from None


def audit_chart(canaries: Sequence[Mapping[str, Any]]) -> bytes:
    """Canary audits: empirical lower bound next to the accountant's epsilon (PNG bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [f"{a.get('site_id', '?')} seed {a.get('seed', '?')}" for a in canaries]
    bounds = [float(a["epsilon_lower_bound"]) for a in canaries]
    claimed = [float(a["accountant_epsilon"]) if a["accountant_epsilon"] != "inf" else math.nan
               for a in canaries]
    x = range(len(canaries))
    axes.bar([i - 0.2 for i in x], bounds, width=0.4, label="empirical lower bound (95%)")
    axes.bar([i + 0.2 for i in x], claimed, width=0.4, label="accountant epsilon")
    axes.set_xticks(list(x), labels, fontsize=7)
    axes.set_ylabel("epsilon")
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def build_dossier(release: Path, site_ledgers: Mapping[str, Path],
                  consortium_ledger: Path | None = None,
                  audits: Sequence[Path] = ()) -> Dossier:
    """Gather the dossier's figures (see the module doc)."""
    from server.release_report import REPORT_JSON

    report_path = Path(release) / REPORT_JSON
    if not report_path.is_file():
        raise DossierError(f"{report_path}: not found; pass the output folder of "
                           f"`fedsynth release` as --release")
    release_report = _read_json(report_path)
    if consortium_ledger is not None and not Path(consortium_ledger).is_file():
        raise DossierError(f"{consortium_ledger}: no such consortium ledger; pass "
                           f"RUN_DIR/federation/consortium_ledger.jsonl")
    dossier = Dossier(generated=utc_timestamp(), release=str(release),
                      release_report=release_report)
    for site_id, ledger in sorted(site_ledgers.items()):
        if not Path(ledger).is_file():
            raise DossierError(f"--site-ledger {site_id}={ledger}: no such file; pass the site's "
                               f"<data_dir>/.fedsynth/ledger.jsonl")
        row, plot = site_section(site_id, Path(ledger), consortium_ledger)
        dossier.sites.append(row)
        if plot is not None:
            dossier.images[f"epsilon_{site_id}"] = plot
    found = _find_audits([Path(p) for p in audits])
    for name, paths in found.items():
        key = name.removesuffix(".json")
        dossier.audits[key] = [{**_read_json(p), "file": str(p)} for p in paths]
        if key == "memorization_audit":
            for i, path in enumerate(paths):
                png = path.with_suffix(".png")
                if png.is_file():
                    dossier.images[f"memorization_{i}"] = png.read_bytes()
            for entry in dossier.audits[key]:  # the raw distances stay in the site's own file
                entry.pop("synthetic", None)
                entry.pop("heldout", None)
    if dossier.audits.get("canary_audit"):
        dossier.images["canary_audit"] = audit_chart(dossier.audits["canary_audit"])
    checkpoint_hash = str(release_report.get("model_sha256", ""))
    dossier.hashes = {"model_sha256": checkpoint_hash, "code_sha256": code_sha256(),
                      "fedsynth_version": fedsynth_version(),
                      "release_report_sha256": hashlib.sha256(report_path.read_bytes())
                      .hexdigest()}
    return dossier


# ---------------------------------------------------------------- HTML

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #111; background: #fff; max-width: 1100px; }
h1 { border-bottom: 3px solid #234; } h2 { color: #234; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
td, th { border: 1px solid #999; padding: 0.25em 0.6em; text-align: left; }
th { background: #dde4ee; } .ok { color: #075; font-weight: bold; }
.bad { color: #b00; font-weight: bold; } .note { color: #555; font-size: 0.85em; }
code { font-size: 0.85em; word-break: break-all; } img { max-width: 100%; border: 1px solid #ccc; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return _e(value if value is not None else "-")


def _verdict(ok: bool | None, good: str = "yes", bad: str = "NO") -> str:
    if ok is None:
        return '<span class="note">not checked</span>'
    return f'<span class="ok">{good}</span>' if ok else f'<span class="bad">{bad}</span>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(images: Mapping[str, bytes], key: str, alt: str) -> str:
    data = base64.b64encode(images[key]).decode()
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _sites_html(dossier: Dossier) -> str:
    if not dossier.sites:
        return "<p class='note'>No site ledger given (--site-ledger SITE=PATH).</p>"
    rows = [[_e(s["site_id"]), _number(s["epsilon"]), _number(s["delta"], "g"),
             _number(s["cap"], "g"), _e(s["accountant"]), _number(s["noise_multiplier"]),
             _number(s["max_grad_norm"], "g"), _number(s["sample_rate"]), _e(s["steps"]),
             _e(s["rounds"]), _e(s["gate_charges"]),
             f"{_number(s['independent_rdp'])} / {_number(s['independent_pld'])}",
             _verdict(s["recheck_agrees"]), _verdict(s["chain_intact"], "intact", "BROKEN"),
             f"<code>{_e(s['ledger_seq'])}: {_e(s['ledger_head'][:16])}</code>",
             _verdict(s["reconcile"]["ok"], "consistent", "MISMATCH")] for s in dossier.sites]
    parts = [_table(["site", "epsilon", "delta", "cap", "accountant", "sigma", "C", "q", "steps",
                     "rounds", "DP-gate charges", "independent RDP / PLD", "recheck", "chain", "ledger head",
                     "reconcile"], rows)]
    for s in dossier.sites:
        parts.append(f"<p class='note'>{_e(s['site_id'])}: "
                     + "<br>".join(_e(line) for line in s["reconcile"]["lines"]) + "</p>")
        key = f"epsilon_{s['site_id']}"
        if key in dossier.images:
            parts.append(_image(dossier.images, key, f"epsilon per round, {s['site_id']}"))
    return "".join(parts)


def _with_interval(figure: Mapping[str, Any]) -> str:
    low, high = figure["ci95"]
    return f"{_number(figure['value'], '.3f')} [{_number(low, '.3f')}, {_number(high, '.3f')}]"


def _audits_html(dossier: Dossier) -> str:
    parts = []
    canaries = dossier.audits.get("canary_audit", [])
    if canaries:
        rows = [[_e(a.get("site_id", "-")), _e(a["seed"]), _e(a["canaries"]),
                 _number(a["epsilon_lower_bound"], ".3f"), _number(a["accountant_epsilon"], ".3f"),
                 _verdict(not a["exceeds_accountant"], "yes", "NO: EXCEEDS")] for a in canaries]
        parts.append("<h3>One-run canary audit (Steinke, Nasr, Jagielski 2023)</h3>")
        parts.append(_table(["site", "seed", "canaries", "empirical epsilon lower bound (95%)",
                             "accountant epsilon", "bound within accountant"], rows))
        parts.append(_image(dossier.images, "canary_audit", "canary lower bound vs accountant"))
    membership = dossier.audits.get("membership_audit", [])
    if membership:
        rows = []
        for audit in membership:
            for name, figures in audit["attacks"].items():
                rows.append([_e(audit["site_id"]), _e(name)] + [
                    _with_interval(figures[k])
                    for k in ("auc", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr")] +
                    [f"{_e(audit['members'])} / {_e(audit['nonmembers'])}"])
        parts.append("<h3>Membership inference (members vs held-out patients)</h3>")
        parts.append(_table(["site", "attack", "AUC [95% CI]", "TPR at 1% FPR",
                             "TPR at 0.1% FPR", "members / non-members"], rows))
    if not parts:
        parts.append("<p class='note'>No empirical audit given (--audits).</p>")
    return "".join(parts)


def _dp_gate_text(dp: Mapping[str, Any]) -> str:
    if not dp.get("enabled"):
        return "off (the gate's answers are covered by no epsilon)"
    return f"on: {dp.get('mechanism')}, epsilon {dp.get('epsilon_per_query')} per query"


def _gate_html(report: Mapping[str, Any]) -> str:
    threshold = report.get("threshold", {})
    policy = [["distance", _e(report.get("distance", "-"))],
              ["shift tolerance (voxels)", _e(report.get("max_shift", "-"))],
              ["threshold", _e(report.get("threshold_description") or threshold)],
              ["DP gate", _e(_dp_gate_text(report.get("dp_gate", {})))]]
    counts = [[_e(k), _e(v)] for k, v in report.get("counts", {}).items()]
    caveats = "".join(f"<li>{_e(c)}</li>" for c in report.get("caveats", []))
    return (_table(["policy", "value"], policy) + _table(["count", "value"], counts)
            + f"<h3>Caveat</h3><ul id='caveat'>{caveats}</ul>")


def _memorization_html(dossier: Dossier) -> str:
    audits = dossier.audits.get("memorization_audit", [])
    if not audits:
        return "<p class='note'>No memorization audit given (memorization_audit.json).</p>"
    rows = [[_e(a["site_id"]), _e(a["num_synthetic"]), _e(a["num_patients"]),
             _number(a["fraction_below_heldout_p5"], ".3f"), _number(a["mann_whitney_p"], ".3g"),
             _e(len(a["near_copies"])), _verdict(not a.get("problem"), "no", "YES")]
            for a in audits]
    parts = [_table(["site", "synthetic", "patients", "share below held-out p5",
                     "Mann-Whitney p", "near copies", "problem"], rows)]
    for i in range(len(audits)):
        if f"memorization_{i}" in dossier.images:
            parts.append(_image(dossier.images, f"memorization_{i}", "memorization histogram"))
    return "".join(parts)


def render_html(dossier: Dossier) -> str:
    """The page: inline CSS and base64 PNGs only, so it renders offline from one file."""
    hashes = _table(["what", "SHA-256"], [[_e(k), f"<code>{_e(v)}</code>"]
                                          for k, v in dossier.hashes.items()])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedsynth privacy dossier</title>
<style>{_STYLE}</style></head><body>
<h1>Privacy dossier</h1>
<p>Release <code>{_e(dossier.release)}</code>, model <code>{_e(dossier.hashes.get(
        'model_sha256', ''))}</code></p>
<p class="note">Generated {_e(dossier.generated)} by fedsynth {_e(dossier.hashes.get(
        'fedsynth_version', ''))}. Every epsilon below is recomputed from the site's own
hash-chained ledger and rechecked with an independent accountant (Google dp_accounting).
Neighbouring relation: add or remove one patient.</p>
<section id="sites"><h2>Per-site privacy spend</h2>{_sites_html(dossier)}</section>
<section id="audits"><h2>Empirical audits</h2>{_audits_html(dossier)}</section>
<section id="gate"><h2>Release gate</h2>{_gate_html(dossier.release_report)}</section>
<section id="memorization"><h2>Memorization audit</h2>{_memorization_html(dossier)}</section>
<section id="hashes"><h2>Model and code</h2>{hashes}
<p class="note">code_sha256: SHA-256 over the sorted (path, SHA-256 of content) of every .py file
of {', '.join(CODE_PACKAGES)}.</p></section>
<section id="integrity"><h2>This dossier's own hash</h2>
<p>The SHA-256 of this HTML file's bytes is written beside it, in
<code>&lt;name&gt;.html.sha256</code> and in the JSON twin (<code>dossier_sha256</code>):
a file cannot contain its own hash.
Check it with <code>sha256sum -c &lt;name&gt;.html.sha256</code>.</p></section>
</body></html>
"""


def write_dossier(dossier: Dossier, out: Path) -> tuple[Path, Path, Path]:
    """``out`` (HTML), ``out`` with ``.json`` (the twin, with the page's SHA-256) and
    ``out.sha256``; each written atomically, the HTML first."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise DossierError(f"--out {out}: must end in .html; e.g. dossier.html")
    page = render_html(dossier).encode()
    digest = hashlib.sha256(page).hexdigest()
    twin = out.with_suffix(".json")
    checksum = out.with_name(out.name + ".sha256")
    atomic_write_bytes(out, page)
    atomic_write_bytes(twin, (json.dumps({**dossier.to_json(), "dossier_sha256": digest,
                                          "dossier_sha256_of": out.name}, indent=2,
                                         sort_keys=True) + "\n").encode())
    atomic_write_bytes(checksum, f"{digest}  {out.name}\n".encode())
    return out, twin, checksum
