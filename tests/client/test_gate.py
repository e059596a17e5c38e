"""The site's side of the release gate (client.gate): answers, gate log, replays, refusals, DP.

The site is one demo-cohort site at 16^3 (registered brains, a few of them with a follow-up scan).
"""

from __future__ import annotations

import dataclasses

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.gate import answer_gate_message, answer_gate_query, gate_log_path, load_scans
from configs import AutoencoderConfig, SiteBudgetConfig, SiteConfig, config_to_dict
from experiments.cohort import generate_cohort
from models.autoencoder import build_autoencoder
from privacy.dp_gate import GATE_KIND, gate_charges
from privacy.gate import (GateQuery, GateRefusal, GateStatus, ThresholdPolicy, latent_views,
                          translations, views_of)
from privacy.ledger import verify_ledger
from privacy.outbox import weights_hash
from privacy.protocol import (GATE_ACCOUNTING, GATE_ACCOUNTING_KEYS, GATE_AUTOENCODER,
                              GATE_CANDIDATES, GATE_CONFIG, GATE_PASSED, GATE_STATUS,
                              GATE_STATUS_KEYS)

SIZE = 16
DATA = {"shape": [SIZE] * 3, "spacing": [192 / SIZE] * 3,
        "label_names": ["background", "csf", "grey_matter", "white_matter"],
        "intensity_percentiles": [0.5, 99.5]}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate-cohort") / "cohort"
    generate_cohort(root, sites=1, patients=5, size=SIZE, seed=11, public_patients=2)
    return root


@pytest.fixture
def site(cohort: Path, tmp_path: Path) -> SiteConfig:
    return SiteConfig(site_id="site_0", data_dir=cohort / "site_0",
                      ledger=tmp_path / "state" / "ledger.jsonl")


def candidates(site: SiteConfig) -> torch.Tensor:
    """Three planted copies (exact, rolled by a voxel, noised) then three unrelated volumes:
    (6, 1, D, H, W)."""
    images = load_scans(site, DATA).images
    generator = torch.Generator().manual_seed(5)
    noise = 0.02 * torch.randn(images[2].shape, generator=generator)
    planted = [images[0], torch.roll(images[1], 1, dims=3), images[2] + noise]
    unrelated = torch.rand((3, 1, SIZE, SIZE, SIZE), generator=generator)
    return torch.cat([torch.stack(planted), unrelated])


def query_for(views: torch.Tensor, query_id: str = "rel-0001", **overrides) -> GateQuery:
    fields = dict(query_id=query_id, distance="nrmse",
                  threshold=ThresholdPolicy("calibrated", None, 5.0), max_shift=1, chunk_size=8,
                  num_candidates=int(views.shape[0]),
                  candidates_sha256=weights_hash({"views": views}), data=DATA,
                  model_sha256="0" * 64)
    fields.update(overrides)
    return GateQuery(**fields)


def message(query: GateQuery, views: torch.Tensor, autoencoder: dict | None = None) -> RecordDict:
    records = {GATE_CONFIG: ConfigRecord(query.to_record()),
               GATE_CANDIDATES: ArrayRecord(torch_state_dict={"views": views})}
    if autoencoder is not None:
        records[GATE_AUTOENCODER] = ArrayRecord(torch_state_dict=autoencoder)
    return RecordDict(records)


def log_entries(site: SiteConfig) -> list[dict]:
    return [json.loads(line) for line in gate_log_path(site).read_text().splitlines()]


def test_only_pass_fail_and_counts_leave_the_site(site: SiteConfig) -> None:
    views = views_of(candidates(site))
    reply = answer_gate_message(site, message(query_for(views), views))
    assert set(reply.keys()) == {GATE_PASSED, GATE_ACCOUNTING, GATE_STATUS}
    assert list(reply[GATE_PASSED].keys()) == ["passed"]
    passed = reply[GATE_PASSED]["passed"].numpy()
    assert passed.dtype == np.uint8 and passed.tolist() == [0, 0, 0, 1, 1, 1]
    assert set(reply[GATE_ACCOUNTING].keys()) == GATE_ACCOUNTING_KEYS
    assert set(reply[GATE_STATUS].keys()) == GATE_STATUS_KEYS
    assert reply[GATE_ACCOUNTING]["num-passed"] == 3 and reply[GATE_STATUS]["status"] == "ok"
    # The exact distances and the threshold are in the site's own log, and nowhere in the reply.
    entry = log_entries(site)[-1]
    secrets = [c["distance"] for c in entry["candidates"]] + [entry["threshold_value"]]
    sent = list(reply[GATE_ACCOUNTING].values()) + list(reply[GATE_STATUS].values())
    assert not any(isinstance(v, float) and v > 0 and any(np.isclose(v, s) for s in secrets)
                   for v in sent)
    assert entry["threshold_value"] > 0 and entry["calibration"]["n"] >= 5
    assert all(c["distance"] < entry["threshold_value"] for c in entry["candidates"][:3])
    assert entry["candidates"][0]["nearest_patient"] == load_scans(site, DATA).patients[0]
    assert entry["candidates"][1]["offset"] == [0, 0, -1]


def test_the_same_query_gets_the_same_answer_without_new_work(site: SiteConfig) -> None:
    views = views_of(candidates(site))
    first = answer_gate_query(site, query_for(views), views)
    lines = len(log_entries(site))
    again = answer_gate_query(site, query_for(views), views)
    assert again.answer.replayed and not first.answer.replayed
    assert again.passed.tolist() == first.passed.tolist() and len(log_entries(site)) == lines
    other = answer_gate_query(site, query_for(views, "rel-0002"), views)
    assert not other.answer.replayed and len(log_entries(site)) == lines + 1


def test_a_site_never_replays_another_sites_answer_from_a_shared_log(site: SiteConfig) -> None:
    # A research sweep may give several sites one state folder, hence one gate log.
    views = views_of(candidates(site))
    first = answer_gate_query(site, query_for(views), views)
    neighbour = dataclasses.replace(site, site_id="site_neighbour")
    assert gate_log_path(neighbour) == gate_log_path(site)
    theirs = answer_gate_query(neighbour, query_for(views), views)
    assert not theirs.answer.replayed and theirs.answer.site_id == "site_neighbour"
    assert answer_gate_query(site, query_for(views), views).answer.replayed
    assert not first.answer.replayed


def test_latent_gate_embeds_the_site_scans_with_the_sent_encoder(site: SiteConfig) -> None:
    torch.manual_seed(0)
    config = AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4)
    encoder = build_autoencoder(config)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    views = latent_views(encoder, candidates(site), 0.8, translations(1))
    latent = dict(distance="latent", autoencoder=config_to_dict(config),
                  autoencoder_sha256=weights_hash(state), latent_scale_factor=0.8)
    outcome = answer_gate_query(site, query_for(views, **latent), views, state)
    assert outcome.answer.status == GateStatus.OK
    assert outcome.passed.tolist() == [False, False, False, True, True, True]
    tampered = {**state, next(iter(state)): next(iter(state.values())) + 1}
    refused = answer_gate_query(site, query_for(views, "rel-0003", **latent), views, tampered)
    assert refused.answer.reason == GateRefusal.MODEL_MISMATCH and refused.passed is None


def test_a_site_with_one_patient_cannot_calibrate(site: SiteConfig, cohort: Path,
                                                  tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    rows = list(csv.DictReader((cohort / "site_0" / "manifest.csv").open()))
    first = [r for r in rows if r["patient_id"] == rows[0]["patient_id"]]
    for row in first:
        for key in ("image", "label"):
            target = single / row[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((cohort / "site_0" / row[key]).read_bytes())
    with (single / "manifest.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(first)
    lonely = SiteConfig(site_id="lonely", data_dir=single,
                        ledger=tmp_path / "lonely" / "ledger.jsonl")
    views = views_of(candidates(site))
    refused = answer_gate_query(lonely, query_for(views), views)
    assert refused.answer.status == GateStatus.REFUSED
    assert refused.answer.reason == GateRefusal.TOO_FEW_PATIENTS
    fixed_query = query_for(views, "rel-0009", threshold=ThresholdPolicy("fixed", 0.05))
    fixed = answer_gate_query(lonely, fixed_query, views)
    assert fixed.answer.status == GateStatus.OK and not fixed.passed[0]


def test_tampered_candidates_are_refused(site: SiteConfig) -> None:
    views = views_of(candidates(site))
    query = query_for(views)
    outcome = answer_gate_query(site, query, views + 1e-3)
    assert outcome.answer.reason == GateRefusal.MODEL_MISMATCH and outcome.passed is None
    reply = answer_gate_message(site, RecordDict({GATE_CONFIG: ConfigRecord({"protocol": 1})}))
    assert reply[GATE_STATUS]["reason"] == GateRefusal.PROTOCOL_MISMATCH.value
    assert GATE_PASSED not in reply


def test_dp_gate_charges_the_site_ledger_and_refuses_past_the_cap(site: SiteConfig) -> None:
    budgeted = SiteConfig(site_id=site.site_id, data_dir=site.data_dir, ledger=site.ledger,
                          budget=SiteBudgetConfig(target_epsilon=1.5, delta=1e-5))
    views = views_of(candidates(site))
    dp = dict(dp_enabled=True, dp_epsilon=1.0, threshold=ThresholdPolicy("fixed", 0.1))
    query = query_for(views, **dp)
    first = answer_gate_query(budgeted, query, views)
    assert first.answer.status == GateStatus.OK and first.answer.epsilon_charged == 1.0
    assert first.answer.epsilon_gate == 1.0 and first.answer.epsilon_total == 1.0
    assert first.answer.target_epsilon == 1.5
    charges = gate_charges(budgeted.ledger_path)
    assert [c.query_id for c in charges] == ["rel-0001"] and charges[0].epsilon == 1.0
    entries = verify_ledger(budgeted.ledger_path).entries
    assert [e.kind for e in entries] == [GATE_KIND]
    assert (first.answer.ledger_seq, first.answer.ledger_head) == (1, entries[-1].hash)
    second = answer_gate_query(budgeted, query_for(views, "rel-0002", **dp), views)
    assert second.answer.status == GateStatus.BUDGET_EXHAUSTED and second.passed is None
    assert len(gate_charges(budgeted.ledger_path)) == 1
    replay = answer_gate_query(budgeted, query, views)
    assert replay.answer.replayed and len(gate_charges(budgeted.ledger_path)) == 1


def test_the_pruned_gate_answers_as_brute_force_and_rejects_every_copy(site: SiteConfig) -> None:
    """Exact, rolled, noised and brightened copies fail; the site's logged distances, threshold
    and answers are those of comparing every pair (latent distance, calibrated threshold)."""
    from privacy.gate import brute_force_nearest_scans, calibrated_threshold, decide

    torch.manual_seed(0)
    config = AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4)
    encoder = build_autoencoder(config)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    scans = load_scans(site, DATA)
    images = torch.cat([candidates(site), (scans.images[3] * 1.05)[None]])
    shifts = translations(1)
    views = latent_views(encoder, images, 0.8, shifts)
    latent = dict(distance="latent", autoencoder=config_to_dict(config),
                  autoencoder_sha256=weights_hash(state), latent_scale_factor=0.8)
    outcome = answer_gate_query(site, query_for(views, "rel-0009", **latent), views, state)
    assert outcome.passed.tolist() == [False, False, False, True, True, True, False]
    bank = latent_views(encoder, scans.images, 0.8)[:, 0]
    codes = {p: i for i, p in enumerate(dict.fromkeys(scans.patients))}
    groups = [codes[p] for p in scans.patients]
    calibration = brute_force_nearest_scans(latent_views(encoder, scans.images, 0.8, shifts), bank,
                                            "latent", candidate_groups=groups,
                                            bank_groups=groups).distance
    threshold = calibrated_threshold(calibration, 5.0)
    reference = brute_force_nearest_scans(views, bank, "latent").distance
    entry = log_entries(site)[-1]
    logged = np.array([c["distance"] for c in entry["candidates"]])
    assert entry["threshold_value"] == pytest.approx(threshold, rel=1e-5)
    assert np.allclose(logged, reference, rtol=1e-5, atol=1e-6)
    assert outcome.passed.tolist() == decide(reference, threshold).tolist()


def test_a_gate_query_on_a_rolled_back_ledger_is_refused_with_an_alarm(site: SiteConfig) -> None:
    from privacy.rollback_guard import alarm_path

    budgeted = SiteConfig(site_id=site.site_id, data_dir=site.data_dir, ledger=site.ledger,
                          budget=SiteBudgetConfig(target_epsilon=5.0, delta=1e-5))
    views = views_of(candidates(site))
    dp = dict(dp_enabled=True, dp_epsilon=1.0, threshold=ThresholdPolicy("fixed", 0.1))
    ledger, head = budgeted.ledger_path, budgeted.ledger_path.with_name("ledger.jsonl.head")
    answer_gate_query(budgeted, query_for(views, "rel-0001", **dp), views)
    backup = ledger.read_bytes(), head.read_bytes()
    seen = answer_gate_query(budgeted, query_for(views, "rel-0002", **dp), views).answer
    # An older, self-consistent copy is restored: the second charge is erased.
    ledger.write_bytes(backup[0])
    head.write_bytes(backup[1])
    assert verify_ledger(ledger).ok
    query = query_for(views, "rel-0003", expected_heads={"site_0": (seen.ledger_seq,
                                                                     seen.ledger_head)}, **dp)
    refused = answer_gate_query(budgeted, query, views)
    assert refused.answer.status == GateStatus.REFUSED and refused.passed is None
    assert refused.answer.reason == GateRefusal.LEDGER_ROLLBACK and alarm_path(ledger).exists()
    assert len(gate_charges(ledger)) == 1
    # The expected head travels in the query record.
    assert GateQuery.from_record(query.to_record()).expected_heads == query.expected_heads


def test_the_query_default_cap_is_locked_at_first_use(site: SiteConfig) -> None:
    from privacy.site_ledger import SiteLedger

    views = views_of(candidates(site))
    dp = dict(dp_enabled=True, dp_epsilon=1.0, threshold=ThresholdPolicy("fixed", 0.1))
    first = answer_gate_query(site, query_for(views, "rel-0001", default_target_epsilon=1.5,
                                              **dp), views)
    assert first.answer.status == GateStatus.OK and first.answer.target_epsilon == 1.5
    state = SiteLedger(site.ledger_path).state()
    assert [b.source for b in state.budgets] == ["consortium-default"] and state.cap == 1.5
    # A server that raises its default cannot buy another charge.
    raised = answer_gate_query(site, query_for(views, "rel-0002", default_target_epsilon=100.0,
                                               **dp), views)
    assert raised.answer.status == GateStatus.BUDGET_EXHAUSTED
    assert raised.answer.target_epsilon == 1.5 and len(gate_charges(site.ledger_path)) == 1


def test_a_deployed_site_without_a_budget_never_takes_the_query_default(site: SiteConfig) -> None:
    views = views_of(candidates(site))
    dp = dict(dp_enabled=True, dp_epsilon=1.0, threshold=ThresholdPolicy("fixed", 0.1))
    refused = answer_gate_query(site, query_for(views, **dp), views, deployment=True)
    assert refused.answer.reason == GateRefusal.NO_SITE_BUDGET
    assert gate_charges(site.ledger_path) == []
