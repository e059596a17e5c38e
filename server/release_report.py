"""The release report (``release_report.json`` + ``.md``): what the privacy officer signs.

It states the model released from (content hash), how the gate decided (distance space, shift
tolerance, threshold policy, DP gate), what happened (candidates, passes and rejections per site,
empty slots), the epsilon each site has spent, and the gate's caveat in plain words.

Epsilon per site, from the most authoritative source available to the server:

1. the site's own ledger, when its file is readable from here (a simulation on one machine):
   :func:`privacy.spend.site_spend`, the figure the site enforces (DP-SGD rounds replayed with
   Opacus plus DP-gate charges);
2. else the accounting figures of the site's last gate answer, which the site computed from its
   own ledger with the same function (accounting figures only, allowed to leave the site);
3. else the consortium ledger's mirror: the newest total the site reported (train replies and gate
   answers both carry the site's DP-SGD + DP-gate total).

The consortium ledger's figure is shown next to it as a cross-check whenever it exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from privacy.dp_gate import CLOSENESS_THRESHOLD, MECHANISM
from privacy.durable import atomic_write_bytes
from privacy.gate import ThresholdPolicy
from privacy.ledger import LedgerError
from privacy.site_ledger import SiteLedger, utc_timestamp
from privacy.spend import site_spend

REPORT_JSON = "release_report.json"
REPORT_MARKDOWN = "release_report.md"


@dataclass(frozen=True)
class SiteSpendRow:
    """One site's spend as the report states it; ``None`` where no source knows the figure."""

    site_id: str
    dp_sgd_epsilon: float | None
    gate_epsilon: float | None
    total_epsilon: float | None
    delta: float | None
    cap: float | None
    source: str
    # The newest total (DP-SGD + DP gate) the consortium ledger mirrored for the site.
    consortium_dp_sgd_epsilon: float | None = None
    gate_queries: int = 0
    passed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class ReleaseReport:
    generated: str
    out: str
    checkpoint: str
    model_sha256: str
    distance: str
    max_shift: int
    threshold: dict[str, Any]
    threshold_description: str
    dp_gate: dict[str, Any]
    counts: dict[str, int]
    sites: list[SiteSpendRow] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def caveats(dp_enabled: bool, dp_epsilon: float, policy: str) -> list[str]:
    """The gate's privacy caveat, in plain words."""
    lines = [
        "The gate's answers are computed from each site's PRIVATE scans and are outside the "
        "DP-SGD guarantee: the DP-SGD epsilon covers the model weights (and anything sampled from "
        "them), not which candidates were released or rejected. Which samples appear in this "
        "release was decided with private data.",
        "A rejection says that some site holds a scan close to that candidate. Only pass/fail per "
        "candidate and counts left the sites; the exact distances, thresholds and nearest "
        "patients stay in each site's local gate log (gate_log.jsonl next to its ledger).",
    ]
    if dp_enabled:
        lines.append(
            f"The DP gate was on: each gate query was answered with {MECHANISM} (sparse vector, "
            f"noisy threshold on closeness = clip(1 - distance / threshold, 0, 1), test level "
            f"{CLOSENESS_THRESHOLD:g}) at epsilon {dp_epsilon:g} per query, charged to every "
            f"site's ledger and included in the totals above (basic composition with the DP-SGD "
            f"epsilon).")
        if policy == "calibrated":
            lines.append(
                "The threshold was calibrated at each site from its own scans; the DP gate's "
                "epsilon covers the answers GIVEN that threshold, not the calibration itself. "
                "Only a fixed threshold makes the gate's answers differentially private end to "
                "end.")
    else:
        lines.append("The DP gate was off: the gate's answers are not covered by any epsilon.")
    lines.append("The gate is a heuristic defence against copies (nearest-neighbour distance "
                 "with a shift tolerance), not a proof that no sample reveals a patient.")
    return lines


def _consortium_epsilons(run_dir: Path | None) -> dict[str, float]:
    if run_dir is None:
        return {}
    from server.consortium_ledger import read_consortium_ledger
    from server.federation import LEDGER_FILE, federation_dir

    path = federation_dir(run_dir) / LEDGER_FILE
    if not path.exists():
        return {}
    try:
        return read_consortium_ledger(path).latest_epsilon()
    except (LedgerError, KeyError, ValueError):
        return {}


def _site_row(plan: Any, site_id: str, gate: Mapping[str, Any],
              consortium: Mapping[str, float]) -> SiteSpendRow:
    config = plan.config
    counts = dict(gate_queries=int(gate.get("queries", 0)), passed=int(gate.get("passed", 0)),
                  failed=int(gate.get("failed", 0)),
                  consortium_dp_sgd_epsilon=consortium.get(site_id))
    site = next((s for s in config.federation.sites if s.site_id == site_id), None)
    budget = config.site_budget(site) if site is not None else None
    if site is not None and Path(site.ledger_path).exists():
        try:
            state = SiteLedger(site.ledger_path).state()
        except (LedgerError, ValueError) as err:
            return SiteSpendRow(site_id, None, None, None, None, None,
                                f"site ledger unreadable ({str(err)[:120]})", **counts)
        spend = site_spend(state)
        return SiteSpendRow(site_id, spend.dp_sgd, spend.gate, spend.total,
                            spend.delta if spend.delta is not None else budget.delta,
                            spend.cap if spend.cap is not None else budget.target_epsilon,
                            f"site ledger {site.ledger_path}", **counts)
    answer = gate.get("last_answer")
    if answer and answer.get("target_epsilon", 0) > 0:
        total, gate_total = float(answer["epsilon_total"]), float(answer["epsilon_gate"])
        return SiteSpendRow(site_id, total - gate_total, gate_total, total,
                            float(answer["delta"]), float(answer["target_epsilon"]),
                            "the site's gate answer (accounting figures from its own ledger)",
                            **counts)
    if site_id in consortium:
        return SiteSpendRow(site_id, None, None, consortium[site_id],
                            budget.delta if budget else None,
                            budget.target_epsilon if budget else None,
                            "consortium ledger (the newest total the site reported)", **counts)
    return SiteSpendRow(site_id, None, None, None, None, None, "no ledger available", **counts)


def site_rows(plan: Any, state: Mapping[str, Any]) -> list[SiteSpendRow]:
    """Per site: its spend (see the module docstring for the sources) and its gate counts."""
    consortium = _consortium_epsilons(plan.run_dir)
    return [_site_row(plan, site_id, state["gate"].get(site_id, {}), consortium)
            for site_id in sorted(set(plan.sites) | set(state["gate"]))]


def release_counts(plan: Any, state: Mapping[str, Any]) -> dict[str, int]:
    slots = state["slots"]
    gated = [r for r in state["rounds"] if r["stage"] in ("decided", "written")]
    candidates = sum(len(r["slots"]) for r in gated)
    released = sum(s["status"] == "released" for s in slots)
    per_site = {f"failed_at_{site}": int(g.get("failed", 0))
                for site, g in sorted(state["gate"].items())}
    return {"requested": int(plan.num), "released": int(released),
            "candidates": int(candidates), "rejections": int(candidates - released),
            "exhausted": int(sum(s["status"] == "exhausted" for s in slots)),
            "gate_rounds": len(gated), **per_site}


def build_release_report(plan: Any, state: Mapping[str, Any]) -> ReleaseReport:
    """The report of a release (``plan``: a :class:`server.release.ReleasePlan`; its state)."""
    release = plan.config.release
    policy = ThresholdPolicy.from_config(release.threshold)
    return ReleaseReport(
        generated=utc_timestamp(), out=str(plan.out), checkpoint=str(plan.checkpoint_path),
        model_sha256=plan.checkpoint.content_hash, distance=release.distance,
        max_shift=release.max_shift, threshold=policy.to_json(),
        threshold_description=policy.describe(),
        dp_gate={"enabled": release.dp_gate.enabled, "epsilon_per_query": release.dp_gate.epsilon,
                 "mechanism": MECHANISM if release.dp_gate.enabled else None},
        counts=release_counts(plan, state), sites=site_rows(plan, state),
        caveats=caveats(release.dp_gate.enabled, release.dp_gate.epsilon, policy.policy))


def _number(value: float | None, spec: str = ".4f") -> str:
    return "unknown" if value is None else format(value, spec)


def render_markdown(report: ReleaseReport) -> str:
    counts, dp = report.counts, report.dp_gate
    dp_text = f"on, {dp['mechanism']}, epsilon {dp['epsilon_per_query']:g} per query" \
        if dp["enabled"] else "off"
    lines = ["# Release report", "", f"Generated {report.generated}.", "", "| | |", "|---|---|",
             f"| Output | {report.out} |", f"| Model (sha256) | `{report.model_sha256}` |",
             f"| Checkpoint | {report.checkpoint} |",
             f"| Distance | {report.distance} (shift tolerance {report.max_shift} voxel(s) "
             f"per axis) |",
             f"| Threshold | {report.threshold_description} |", f"| DP gate | {dp_text} |",
             f"| Requested | {counts['requested']} |", f"| Released | {counts['released']} |",
             f"| Candidates gated | {counts['candidates']} in {counts['gate_rounds']} gate "
             f"round(s) |",
             f"| Rejections | {counts['rejections']} |",
             f"| Slots left empty (out of attempts) | {counts['exhausted']} |",
             "", "## Sites", "",
             "| site | epsilon DP-SGD | epsilon DP gate | epsilon total | delta | cap | "
             "consortium ledger (total) | gate queries | passed | failed | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.sites:
        lines.append(
            f"| {row.site_id} | {_number(row.dp_sgd_epsilon)} | {_number(row.gate_epsilon)} | "
            f"{_number(row.total_epsilon)} | {_number(row.delta, 'g')} | {_number(row.cap, 'g')} "
            f"| {_number(row.consortium_dp_sgd_epsilon)} | {row.gate_queries} | {row.passed} | "
            f"{row.failed} | {row.source} |")
    lines += ["", "## The gate's privacy caveat", ""] + [f"- {line}" for line in report.caveats]
    return "\n".join(lines) + "\n"


def write_release_report(folder: Path, report: ReleaseReport) -> tuple[Path, Path]:
    """Write both files atomically; returns (json path, markdown path)."""
    folder = Path(folder)
    json_path, markdown_path = folder / REPORT_JSON, folder / REPORT_MARKDOWN
    text = json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(json_path, text.encode())
    atomic_write_bytes(markdown_path, render_markdown(report).encode())
    return json_path, markdown_path
