"""The privacy officer's epsilon report for one site ledger (Markdown, JSON or HTML; PNG plot).

For every privacy event (a DP-SGD round or a DP release-gate charge, in ledger order): the
cumulative epsilon the site recorded, the total replayed from the ledger with the site's own spend
function (:func:`privacy.spend.site_spend`: DP-SGD with Opacus plus the gate charges), the increase
(the rows add up to the spend), and an independent recomputation: Google's ``dp_accounting`` (RDP
for an ``rdp`` ledger, PLD for a ``prv`` ledger) for the DP-SGD part plus the gate charges, with the
stated tolerance. Then the remaining budget, and a plain statement of what the guarantee covers and
what it does not.

A ledger with ``non-private-round`` entries (a site that opted in to non-private training) is
reported as NOT differentially private: spent = infinity, the non-private rounds are counted and
listed, and the independent recomputation is stated to cover the DP-SGD rounds only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from privacy.accounting import (INDEPENDENT_METHOD, INDEPENDENT_TOLERANCE, history_of,
                                independent_curve, independent_epsilon, merge_history)
from privacy.ledger import LedgerError, verify_ledger
from privacy.site_ledger import (GateChargeRecord, NonPrivateRoundRecord, PlanRecord, RoundRecord,
                                 SiteLedger, SiteLedgerState, state_of, utc_timestamp)
from privacy.spend import site_spend

# Rounds to look ahead when counting how many more rounds of the current plan fit under the cap.
_MAX_LOOKAHEAD_ROUNDS = 10_000


def coverage_statement(plan: PlanRecord) -> tuple[list[str], list[str]]:
    """What the site's (epsilon, delta) covers, and what it does not, in plain words."""
    covers = [
        "The model weights this site sent to the server in the rounds listed in this ledger, "
        "and anything computed from them afterwards (post-processing, including the EMA of the "
        "weights, aggregation by the server and synthetic images sampled from the model). WHICH "
        "sampled images are released is decided by the release gate, whose answers depend on "
        "private scans: that choice is covered only by a DP gate's charges in this ledger, never "
        "by the DP-SGD epsilon alone.",
        "At the level of a patient (the neighbouring relation: add or remove all scans of one "
        "patient, with the number of patients N treated as public): the distribution of those "
        "weights changes by at most the stated (epsilon, delta).",
        f"Under the training that was run: Poisson sampling of patients at rate q = "
        f"{plan.sample_rate:.4g}, each patient's gradient (over all its scans and noise draws) "
        f"clipped to norm {plan.max_grad_norm:g} ({plan.clipping}), Gaussian noise with multiplier "
        f"sigma = {plan.noise_multiplier:.4g}, composed over every DP-SGD step recorded here "
        f"({plan.accountant.upper()} accountant).",
    ]
    not_covered = [
        "Release-gate answers without the DP gate: the pass/fail of each candidate is computed "
        "from the site's private scans and is not protected by this epsilon (see the release "
        "report's gate caveat), and so neither is the choice of which synthetic images are "
        "released.",
        f"The number of patients (N = {plan.num_patients}) and the sample count: public metadata, "
        "used to set q.",
        "Anything outside the DP-SGD steps: a training loss or other statistic computed on "
        "private data and shared, data preprocessing decisions, and training runs recorded in "
        "another ledger.",
        "Hyper-parameter tuning on private data (choosing sigma, the clipping norm, learning rate "
        "or schedule after looking at results on this site's data) spends privacy not accounted "
        "here.",
        "Side channels of the implementation (timing, floating-point attacks on the noise: Opacus' "
        "secure mode is off), and other sites' data, which their own ledgers account for.",
        "Rounds missing from this file: the hash chain proves the entries were not altered, cut or "
        "reordered, not that the file was never replaced as a whole; reconcile with the server's "
        "consortium ledger.",
    ]
    return covers, not_covered


def non_private_statement(records: list[NonPrivateRoundRecord], dp_rounds: int
                          ) -> tuple[list[str], list[str]]:
    """What a ledger with non-private releases covers (nothing), and what it does not."""
    rounds = ", ".join(str(r.round) for r in records)
    covers = [
        f"Nothing. This site released model weights trained WITHOUT differential privacy in "
        f"{len(records)} round(s) (round {rounds}; the site's own opt-in, allow_non_private, for "
        f"research or demo data only). Its epsilon is infinite: no (epsilon, delta) guarantee "
        f"covers its data, the weights it sent, the global model or synthetic images sampled from "
        f"it.",
    ]
    if dp_rounds:
        covers.append(f"The {dp_rounds} DP-SGD round(s) in the table, taken alone, spend the "
                      f"epsilon shown there; composed with the non-private rounds the site's total "
                      f"is infinite. The independent recomputation covers those DP-SGD rounds only.")
    not_covered = [
        "The non-private rounds: plain (non-noisy, unclipped) training on every patient's scans; "
        "their weights may reveal anything about this site's data, including whole scans.",
        "Release-gate answers, the number of patients, and anything else computed from the "
        "site's data.",
    ]
    return covers, not_covered


@dataclass(frozen=True)
class ReportRow:
    """One privacy event of the ledger, in ledger order: a DP-SGD ``round`` or a ``dp-gate``
    charge. ``epsilon`` is the cumulative total the site recorded with it, ``replayed_epsilon`` the
    total :func:`privacy.spend.site_spend` computes from the ledger up to it, ``spend`` the
    increase of that total (so the rows add up to the spend), ``independent_epsilon`` the total
    recomputed with dp_accounting (DP-SGD) plus the gate charges."""

    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float
    spend: float
    replayed_epsilon: float
    independent_epsilon: float
    agrees: bool
    timestamp: str
    model_hash_after: str
    kind: str = RoundRecord.kind
    query_id: str = ""
    gate_epsilon: float = 0.0


@dataclass(frozen=True)
class PrivacyReport:
    ledger: str
    generated: str
    chain_intact: bool
    entries: int
    accountant: str
    delta: float
    cap: float
    spent: float
    remaining: float
    rounds_remaining: int
    plan: dict[str, Any]
    independent_method: str
    independent_total_rdp: float
    independent_total_pld: float
    tolerance: str
    all_agree: bool
    other_entries: dict[str, int] = field(default_factory=dict)
    rows: list[ReportRow] = field(default_factory=list)
    covers: list[str] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)
    # False once the ledger records a non-private release: ``spent`` is then infinite.
    differentially_private: bool = True
    non_private_rounds: int = 0
    non_private: list[dict[str, Any]] = field(default_factory=list)
    # The spend split: DP-SGD (replayed) and DP-gate charges; spent = dp_sgd_spent + gate_spent.
    dp_sgd_spent: float = 0.0
    gate_spent: float = 0.0
    gate_queries: int = 0
    cap_source: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rounds_remaining(plan: PlanRecord, state: SiteLedgerState) -> int:
    """How many more rounds of the plan in force fit under its cap (bisection on the count)."""
    cap = state.cap

    def fits(extra: int) -> bool:
        return site_spend(state, extra_steps=plan.steps_per_round * extra).total <= cap

    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
        if high > _MAX_LOOKAHEAD_ROUNDS:
            return _MAX_LOOKAHEAD_ROUNDS
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _agrees_exactly(recorded: float, replayed: float) -> bool:
    # The site wrote the figure with the same function: equal up to float summation order.
    return math.isclose(recorded, replayed, rel_tol=1e-9, abs_tol=1e-12)


def _event_rows(entries: list, path: Path, plan: PlanRecord, method: str,
                tolerance) -> list[ReportRow]:
    """One row per ``round`` and ``dp-gate`` entry, with the totals of the ledger up to it."""
    state = state_of(entries, path)
    independent_sgd = independent_curve([history_of([r]) for r in state.rounds], plan.delta,
                                        method)
    rows: list[ReportRow] = []
    previous, rounds_seen, gates_seen = 0.0, 0, []
    for index, entry in enumerate(entries):
        if entry.kind not in (RoundRecord.kind, GateChargeRecord.kind):
            continue
        replayed = site_spend(state_of(entries[:index + 1], path)).total
        if entry.kind == RoundRecord.kind:
            record = state.rounds[rounds_seen]
            rounds_seen += 1
        else:
            record = state.gate_charges[len(gates_seen)]
            gates_seen.append(record.epsilon)
        independent = (independent_sgd[rounds_seen - 1] if rounds_seen else 0.0) + \
            math.fsum(gates_seen)
        if isinstance(record, RoundRecord):
            rows.append(ReportRow(
                round=record.round, steps=record.steps, noise_multiplier=record.noise_multiplier,
                sample_rate=record.sample_rate, epsilon=record.epsilon,
                spend=replayed - previous, replayed_epsilon=replayed,
                independent_epsilon=independent,
                agrees=_agrees_exactly(record.epsilon, replayed) and
                tolerance.agrees(replayed, independent),
                timestamp=record.timestamp, model_hash_after=record.model_hash_after))
        else:
            rows.append(ReportRow(
                round=state.rounds[rounds_seen - 1].round if rounds_seen else 0, steps=0,
                noise_multiplier=0.0, sample_rate=0.0, epsilon=record.total_epsilon,
                spend=replayed - previous, replayed_epsilon=replayed,
                independent_epsilon=independent,
                agrees=_agrees_exactly(record.total_epsilon, replayed) and
                tolerance.agrees(replayed, independent),
                timestamp=record.timestamp, model_hash_after="", kind=GateChargeRecord.kind,
                query_id=record.query_id, gate_epsilon=record.epsilon))
        previous = replayed
    return rows


def build_report(ledger_path: Path | str) -> PrivacyReport:
    """Read and verify a site ledger and recompute every figure. :class:`LedgerError` if it is
    broken (an officer first runs ``fedsynth audit verify``) or holds no plan.

    The spend is :func:`privacy.spend.site_spend` (DP-SGD rounds plus DP-gate charges), the same
    figure the site enforces; the rows (rounds and gate charges in ledger order) add up to it."""
    path = Path(ledger_path)
    verified = verify_ledger(path)
    entries = SiteLedger(path).ledger.entries()
    state = state_of(entries, path)
    plan = state.plan
    if plan is None and state.non_private:
        return _non_private_only(path, verified.ok, len(verified.entries), state)
    if plan is None:
        raise LedgerError(f"{path}: holds no plan entry, so it is not a site privacy ledger; "
                          f"pass the site's ledger (<data_dir>/.fedsynth/ledger.jsonl)")
    method = INDEPENDENT_METHOD[plan.accountant]
    tolerance = INDEPENDENT_TOLERANCE[plan.accountant]
    rows = _event_rows(entries, path, plan, method, tolerance)
    spend = site_spend(state)
    history = merge_history(history_of(state.rounds))
    covers, not_covered = coverage_statement(plan)
    if spend.gate_queries:
        covers.append(f"The {spend.gate_queries} DP release-gate answer(s) charged to this ledger "
                      f"(pure epsilon {spend.gate:.4g} in all, AboveThreshold), composed with the "
                      f"DP-SGD epsilon by basic composition: the spend is their sum.")
    if state.non_private:
        covers, extra = non_private_statement(state.non_private, len(state.rounds))
        not_covered = extra + not_covered
    source = state.locked_budget.source if state.locked_budget else "plan"
    cap = state.cap
    return PrivacyReport(
        ledger=str(path), generated=utc_timestamp(), chain_intact=verified.ok,
        entries=len(verified.entries), accountant=plan.accountant, delta=plan.delta,
        cap=cap, spent=spend.total, remaining=max(0.0, cap - spend.total),
        rounds_remaining=0 if state.non_private else _rounds_remaining(plan, state),
        plan=asdict(plan), independent_method=method,
        independent_total_rdp=independent_epsilon(history, plan.delta, "rdp") + spend.gate,
        independent_total_pld=independent_epsilon(history, plan.delta, "pld") + spend.gate,
        tolerance=tolerance.describe(), all_agree=all(row.agrees for row in rows),
        other_entries=dict(Counter(entry.kind for entry in state.other)),
        rows=rows, covers=covers, not_covered=not_covered,
        differentially_private=not state.non_private, non_private_rounds=len(state.non_private),
        non_private=[asdict(record) for record in state.non_private],
        dp_sgd_spent=spend.dp_sgd, gate_spent=spend.gate, gate_queries=spend.gate_queries,
        cap_source=source)


def _non_private_only(path: Path, intact: bool, entries: int, state) -> PrivacyReport:
    """The report of a ledger with non-private rounds and no DP-SGD plan: nothing is covered."""
    covers, not_covered = non_private_statement(state.non_private, 0)
    return PrivacyReport(
        ledger=str(path), generated=utc_timestamp(), chain_intact=intact, entries=entries,
        accountant="none", delta=0.0, cap=math.inf, spent=math.inf, remaining=0.0,
        rounds_remaining=0, plan={}, independent_method="none", independent_total_rdp=0.0,
        independent_total_pld=0.0, tolerance="not applicable (no DP-SGD round)", all_agree=True,
        other_entries=dict(Counter(entry.kind for entry in state.other)), rows=[],
        covers=covers, not_covered=not_covered, differentially_private=False,
        non_private_rounds=len(state.non_private),
        non_private=[asdict(record) for record in state.non_private])


def plot_png(report: PrivacyReport) -> bytes:
    """Epsilon vs round (ledger, independent, cap) as PNG bytes (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 3.6), dpi=100)
    axes = figure.add_subplot()
    # A gate charge is drawn half-way after the round it followed.
    rounds = [row.round + (0.5 if row.kind == GateChargeRecord.kind else 0.0)
              for row in report.rows]
    axes.plot(rounds, [row.epsilon for row in report.rows], "o-",
              label=f"ledger ({report.accountant})")
    axes.plot(rounds, [row.independent_epsilon for row in report.rows], "x--",
              label=f"independent ({report.independent_method}, dp_accounting)")
    if math.isfinite(report.cap):
        axes.axhline(report.cap, color="crimson", linestyle=":", label=f"cap {report.cap:g}")
    if not report.differentially_private:
        axes.set_title(f"NOT differentially private: {report.non_private_rounds} non-private "
                       f"round(s), epsilon = infinity", color="crimson", fontsize=9)
    axes.set_xlabel("round")
    axes.set_ylabel(f"cumulative epsilon (delta {report.delta:g})")
    finite = [v for v in [report.cap] + [row.epsilon for row in report.rows] if math.isfinite(v)]
    axes.set_ylim(0, 1.1 * max(finite + [1.0]))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _non_private_summary(report: PrivacyReport) -> list[tuple[str, str]]:
    rounds = ", ".join(str(r["round"]) for r in report.non_private)
    dp_rounds = len(report.rows)
    lines = [
        ("Ledger", report.ledger),
        ("Hash chain", f"intact ({report.entries} entries)" if report.chain_intact else "BROKEN"),
        ("Differentially private", f"NO: non-private weights were released in "
                                   f"{report.non_private_rounds} round(s) (round {rounds})"),
        ("Spent", "infinite (epsilon = infinity): not differentially private"),
        ("DP-SGD rounds", f"{dp_rounds}" + (" (their figures below do not bound the total)"
                                            if dp_rounds else "")),
    ]
    if dp_rounds:
        lines.append(("Independent total", f"RDP {report.independent_total_rdp:.4f}, PLD "
                                           f"{report.independent_total_pld:.4f} (dp_accounting) "
                                           f"over the DP-SGD rounds only; it does NOT cover the "
                                           f"non-private rounds"))
    return lines


def _summary(report: PrivacyReport) -> list[tuple[str, str]]:
    plan = report.plan
    if not report.differentially_private:
        return _non_private_summary(report)
    return [
        ("Ledger", report.ledger),
        ("Hash chain", f"intact ({report.entries} entries)" if report.chain_intact else "BROKEN"),
        ("Accountant", f"{report.accountant} (Opacus)"),
        ("Delta", f"{report.delta:g}"),
        ("Cap (target epsilon)", f"{report.cap:g}" + (f" ({report.cap_source})"
                                                       if report.cap_source else "")),
        ("Spent", f"{report.spent:.4f} = DP-SGD {report.dp_sgd_spent:.4f} + DP gate "
                  f"{report.gate_spent:.4f} ({report.gate_queries} charge(s)), as the site "
                  f"enforces it"),
        ("Remaining", f"{report.remaining:.4f} (about {report.rounds_remaining} more rounds of "
                      f"{plan['steps_per_round']} steps)"),
        ("Noise multiplier sigma", f"{plan['noise_multiplier']:.4f}"),
        ("Sampling", f"q = {plan['sample_rate']:.4g} ({plan['expected_batch_size']} of "
                     f"{plan['num_patients']} patients per step, Poisson)"),
        ("Clipping", f"{plan['clipping']}, per-patient norm C = {plan['max_grad_norm']:g}"),
        ("Independent total", f"RDP {report.independent_total_rdp:.4f}, PLD "
                              f"{report.independent_total_pld:.4f} (dp_accounting for DP-SGD, "
                              f"plus the gate charges)"),
        ("Agreement", ("every round and gate charge agrees" if report.all_agree
                       else "DISAGREEMENT, see the table")
         + f"; tolerance {report.tolerance}"),
    ] + ([("Other entries", ", ".join(f"{n} {kind}" for kind, n in report.other_entries.items())
           + ": not privacy events, not in the epsilon above")]
         if report.other_entries else [])


_COLUMNS = ("event", "steps", "sigma", "q", "spend", "epsilon (ledger)", "epsilon (replayed)",
            "epsilon (independent)", "agrees")


def _cells(row: ReportRow) -> list[str]:
    if row.kind == GateChargeRecord.kind:
        return [f"DP gate {row.query_id} (epsilon {row.gate_epsilon:g})", "-", "-", "-",
                f"{row.spend:.4f}", f"{row.epsilon:.4f}", f"{row.replayed_epsilon:.4f}",
                f"{row.independent_epsilon:.4f}", "yes" if row.agrees else "NO"]
    return [f"round {row.round}", str(row.steps), f"{row.noise_multiplier:.4f}",
            f"{row.sample_rate:.4g}", f"{row.spend:.4f}", f"{row.epsilon:.4f}",
            f"{row.replayed_epsilon:.4f}", f"{row.independent_epsilon:.4f}",
            "yes" if row.agrees else "NO"]


_NON_PRIVATE_COLUMNS = ("round", "steps", "patients", "batch", "timestamp", "weights after")


def _non_private_cells(record: dict[str, Any]) -> list[str]:
    return [str(record["round"]), str(record["steps"]), str(record["num_patients"]),
            str(record["batch_size"]), record["timestamp"], record["model_hash_after"][:16]]


def _warning(report: PrivacyReport) -> list[str]:
    if report.differentially_private:
        return []
    return [f"**NOT DIFFERENTIALLY PRIVATE.** This site released non-private weights in "
            f"{report.non_private_rounds} round(s): its epsilon is infinite.", ""]


def render_markdown(report: PrivacyReport, plot_name: str | None = None) -> str:
    lines = ["# Privacy report", "", f"Generated {report.generated}.", ""] + _warning(report) + [
             "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _summary(report)]
    lines += ["", "## Privacy events (DP-SGD rounds and DP-gate charges)", "",
              "| " + " | ".join(_COLUMNS) + " |",
              "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    if not report.rows:
        lines.append("| (no round yet) |" + " |" * (len(_COLUMNS) - 1))
    if report.non_private:
        lines += ["", "## Non-private rounds (no DP: epsilon = infinity)", "",
                  "| " + " | ".join(_NON_PRIVATE_COLUMNS) + " |",
                  "|" + "---|" * len(_NON_PRIVATE_COLUMNS)]
        lines += ["| " + " | ".join(_non_private_cells(r)) + " |" for r in report.non_private]
    if plot_name:
        lines += ["", f"![epsilon per round]({plot_name})"]
    lines += ["", "## What the guarantee covers", ""] + [f"- {item}" for item in report.covers]
    lines += ["", "## What it does not cover", ""] + [f"- {item}" for item in report.not_covered]
    return "\n".join(lines) + "\n"


def render_html(report: PrivacyReport, png: bytes | None = None) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>Privacy report</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
             "</style></head><body>", "<h1>Privacy report</h1>",
             f"<p>Generated {esc(report.generated)}.</p>"]
    parts += [f"<p style='color:crimson'>{esc(line.replace('**', ''))}</p>"
              for line in _warning(report) if line]
    parts.append("<table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary(report)]
    parts += ["</table>", "<h2>Privacy events (DP-SGD rounds and DP-gate charges)</h2>",
              "<table><tr>"
              + "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(row)) + "</tr>"
              for row in report.rows]
    parts.append("</table>")
    if png:
        parts.append("<p><img alt='epsilon per round' src='data:image/png;base64,"
                     + base64.b64encode(png).decode("ascii") + "'></p>")
    for title, items in (("What the guarantee covers", report.covers),
                         ("What it does not cover", report.not_covered)):
        parts += [f"<h2>{esc(title)}</h2>", "<ul>"]
        parts += [f"<li>{esc(item)}</li>" for item in items] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_json(report: PrivacyReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n"
