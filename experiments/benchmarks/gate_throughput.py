"""Release-gate throughput: candidate-scan pairs per second, and its scaling with the set sizes.

What a site does per gate query (:func:`privacy.gate.nearest_scans`), timed side by side in one
run on the same random volumes (the cost does not depend on the content):

- ``nrmse``: relative L2 in image space, no shift tolerance;
- ``nrmse_shift1``: the same under every translation of up to one voxel (27 per pair, the default);
- ``latent_shift1``: relative L2 between public-encoder embeddings, 27 translate views per candidate
  (the default distance; the site-side cost only - the server's encoding of the translates is timed
  separately as ``encode_seconds_per_candidate``);
- ``ssim``: 1 - SSIM (MONAI), no shift tolerance (one 3D convolution per pair, ~100x the cost of
  ``nrmse``), so at two small sizes of its own: 4x16 and 8x32 pairs in the full run.

The exact search (``--search-only`` runs only this part) is timed on one thread, side by side in
one run on the same synthetic-hospital latents: brute force, the float32 GEMM search
(``prefilter=False``) and the pruned search (int8 bounds first, the default), with the largest
relative difference of their distances from brute force; then a whole synthetic hospital
(calibration + search on 2 threads, peak memory). How much the int8 stage prunes depends on the
data (how many scans lie within a few percent of a candidate's nearest distance), never the
answer: the hospital's latents are structured like the demo's (tissue mixtures, scanner contrasts,
atrophy, per-patient fields, noise), not made easy to prune.

Reported per space and size: pairs (candidates x scans) per second, and the time relative to the
smallest size divided by the growth in pairs (1.0 = linear scaling; below 1 while fixed per-call
costs dominate). Each timing is the best of 3 (ssim: 2) after a warm-up, on one torch thread (on a
shared machine a second thread mostly waits for the busy core). ``quick`` uses 16^3 volumes and
smaller sets; the full run uses the demo's 32^3.

Run: ``python -m experiments.benchmarks.gate_throughput [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from configs import AutoencoderConfig
from models.autoencoder import build_autoencoder
from privacy.gate import (NO_SHIFT, between_patient_distances, brute_force_nearest_scans,
                          latent_views, nearest_scans, translations, views_of)
from privacy.nearest_scan import ScanIndex

CHUNK_SIZE = 64   # release.chunk_size's default
LATENT_CHANNELS = 3
THREADS = 2        # the hospital run: the machine's cores


def _timed(function, repeats: int = 1) -> float:
    """The best of ``repeats`` wall-clock timings (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def exact_versus_brute_force(hospital: "Hospital", candidates: int, scans: int) -> dict:
    """One thread, one run, the same candidates x scans of a synthetic hospital (latent 3x16^3,
    27 translate views each): brute force, the float32 GEMM search (``prefilter=False``) and the
    pruned search (int8 bounds first; the default)."""
    torch.set_num_threads(1)
    views, bank = hospital.candidate_views[:candidates], hospital.bank[:scans]
    brute_force_nearest_scans(views[:1], bank[:64], "latent")          # warm-up
    ScanIndex(bank[:64]).search(views[:1], 1)
    ScanIndex(bank[:64]).search(views[:1], 1, prefilter=False)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    brute = brute_force_nearest_scans(views, bank, "latent", chunk_size=CHUNK_SIZE)
    brute_seconds = time.perf_counter() - started
    started = time.perf_counter()
    index = ScanIndex(bank)
    index_seconds = time.perf_counter() - started
    pairs = candidates * scans
    results = {"pairs": pairs, "load_average_1min": load,
               "brute_force/pairs_per_second": pairs / brute_seconds,
               "index_seconds": index_seconds}
    for name, prefilter in (("gemm", False), ("pruned", True)):
        started = time.perf_counter()
        found = index.search(views, candidates, chunk_size=CHUNK_SIZE, prefilter=prefilter)
        seconds = time.perf_counter() - started
        difference = np.abs(found.distance - brute.distance)
        results.update({
            f"{name}/pairs_per_second": pairs / seconds,
            f"{name}/speedup_over_brute_force": brute_seconds / seconds,
            f"{name}/float32_pair_fraction": found.float32_pairs / found.pairs,
            f"{name}/float64_pair_fraction": found.exact_pairs / found.pairs,
            f"{name}/max_abs_difference": float(difference.max()),
            f"{name}/max_relative_difference":
                float((difference / np.maximum(brute.distance, 1e-12)).max())})
    results["pruned/speedup_over_gemm"] = (results["pruned/pairs_per_second"]
                                           / results["gemm/pairs_per_second"])
    results["load_average_1min_after"] = os.getloadavg()[0]
    return results


def hospital_gate(hospital: "Hospital") -> dict:
    """Search + calibration for the whole synthetic hospital on ``THREADS`` threads: wall time of
    each (calibration includes embedding every scan's 27 translates with the stand-in encoder, as
    a site does; their summed per-thread time is reported too) and the process's peak resident
    memory (which includes the benchmark's own images, views and the brute-force comparison)."""
    torch.set_num_threads(THREADS)
    patients = [str(p) for p in hospital.patients]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    index = ScanIndex(hospital.bank)
    index_seconds = time.perf_counter() - started
    embedding: list[float] = []

    def scan_views(start: int, stop: int) -> torch.Tensor:
        began = time.perf_counter()
        views = hospital.scan_views(start, stop)
        embedding.append(time.perf_counter() - began)
        return views

    started = time.perf_counter()
    calibration = between_patient_distances(scan_views, index, patients, "latent",
                                            chunk_size=CHUNK_SIZE)
    calibration_seconds = time.perf_counter() - started
    threshold = float(np.percentile(calibration, 5))
    started = time.perf_counter()
    found = nearest_scans(hospital.candidate_views, index, "latent", chunk_size=CHUNK_SIZE)
    search_seconds = time.perf_counter() - started
    copies = np.array([k.startswith("copy-") for k in hospital.candidate_kinds])
    passed = found.distance >= threshold
    return {"scans": len(hospital.bank), "candidates": len(found.distance), "threads": THREADS,
            "load_average_1min": load, "load_average_1min_after": os.getloadavg()[0],
            "index_seconds": index_seconds, "calibration_seconds": calibration_seconds,
            "calibration_embedding_thread_seconds": sum(embedding),
            "search_seconds": search_seconds,
            "total_seconds": index_seconds + calibration_seconds + search_seconds,
            "planted_copies_rejected": f"{int((~passed[copies]).sum())}/{int(copies.sum())}",
            "new_candidates_passed": f"{int(passed[~copies].sum())}/{int((~copies).sum())}",
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(quick: bool = False, hospital_scans: int | None = None,
        hospital_candidates: int | None = None, search_only: bool = False,
        compare_only: bool = False) -> dict:
    """Time every distance space at three (candidates, scans) sizes, then the exact search on a
    synthetic hospital (only that with ``search_only``; only the one-thread comparison with
    ``compare_only``); a flat dict of results."""
    torch.set_num_threads(1)
    size = 16 if quick else 32
    if search_only or compare_only:
        return search_results(quick, size, hospital_scans, hospital_candidates, compare_only)
    sizes = [(4, 8), (8, 16), (16, 32)] if quick else [(8, 32), (16, 64), (32, 128)]
    ssim_sizes = sizes[:2] if quick else [(4, 16), (8, 32)]
    generator = torch.Generator().manual_seed(0)
    largest_n, largest_m = sizes[-1]
    candidates = torch.rand((largest_n, 1, size, size, size), generator=generator)
    scans = torch.rand((largest_m, 1, size, size, size), generator=generator)
    torch.manual_seed(0)
    encoder = build_autoencoder(AutoencoderConfig(channels=[16, 32], latent_channels=3,
                                                  norm_num_groups=8)).eval()   # the demo's
    offsets = translations(1)
    latent_views(encoder, candidates[:1], 1.0)   # warm-up
    encode_seconds = _timed(lambda: latent_views(encoder, candidates[:4], 1.0, offsets),
                            repeats=2)
    latent_candidates = latent_views(encoder, candidates, 1.0, offsets)
    latent_bank = latent_views(encoder, scans, 1.0)[:, 0]

    def image(distance: str, shifts=NO_SHIFT):
        return lambda n, m: brute_force_nearest_scans(views_of(candidates[:n]), scans[:m],
                                                      distance, offsets=shifts,
                                                      chunk_size=CHUNK_SIZE)

    spaces = {
        "nrmse": image("nrmse"),
        "nrmse_shift1": image("nrmse", offsets),
        "latent_shift1": lambda n, m: brute_force_nearest_scans(
            latent_candidates[:n], latent_bank[:m], "latent", chunk_size=CHUNK_SIZE),
        "ssim": image("ssim"),
    }
    results: dict = {"volume": f"{size}^3", "latent": "x".join(map(str, latent_bank.shape[1:])),
                     "translations": len(offsets), "threads": torch.get_num_threads(),
                     "encode_seconds_per_candidate": encode_seconds / 4}
    for space, measure in spaces.items():
        base = None
        measure(2, 2)   # warm-up: one-off allocations
        for n, m in (ssim_sizes if space == "ssim" else sizes):
            seconds = _timed(lambda: measure(n, m), repeats=2 if space == "ssim" else 3)
            key = f"{space}/{n}x{m}"
            results[f"{key}/pairs_per_second"] = n * m / seconds
            results[f"{key}/seconds"] = seconds
            if base is None:
                base = (seconds, n * m)
            else:
                results[f"{key}/scaling_vs_linear"] = (seconds / base[0]) / (n * m / base[1])
    for n, m in sizes:
        seconds = {space: results.get(f"{space}/{n}x{m}/seconds") for space in spaces}
        shift1 = seconds["nrmse_shift1"]
        results[f"ratio/shift1_over_plain_nrmse/{n}x{m}"] = shift1 / seconds["nrmse"]
        results[f"ratio/nrmse_shift1_over_latent/{n}x{m}"] = shift1 / seconds["latent_shift1"]
        if seconds["ssim"] is not None:
            results[f"ratio/ssim_over_nrmse/{n}x{m}"] = seconds["ssim"] / seconds["nrmse"]
    results.update(search_results(quick, size, hospital_scans, hospital_candidates))
    n, m = sizes[-1]
    results["summary"] = (
        f"At {n}x{m} pairs of {size}^3 volumes the default latent distance (27 translates) checks "
        f"{results[f'latent_shift1/{n}x{m}/pairs_per_second']:.0f} pairs/s, "
        f"{results[f'ratio/nrmse_shift1_over_latent/{n}x{m}']:.1f}x faster than shift-tolerant "
        f"image NRMSE, which costs {results[f'ratio/shift1_over_plain_nrmse/{n}x{m}']:.1f}x plain "
        f"NRMSE; the server encodes each candidate's translates in "
        f"{results['encode_seconds_per_candidate']:.2f} s. " + results["search_summary"])
    return results


def search_results(quick: bool, size: int, hospital_scans: int | None,
                   hospital_candidates: int | None, compare_only: bool = False) -> dict:
    """The exact search against brute force on one thread, then (unless ``compare_only``) the
    whole synthetic hospital."""
    scans = hospital_scans or (400 if quick else 2000)
    wanted = hospital_candidates or (20 if quick else 100)
    results: dict = {}
    started = time.perf_counter()
    hospital = synthetic_hospital(scans, wanted, size=size, seed=0)
    results["hospital/generate_seconds"] = time.perf_counter() - started
    compare = exact_versus_brute_force(hospital, min(wanted, 10 if quick else 40), scans)
    results.update({f"one_thread/{k}": v for k, v in compare.items()})
    if compare_only:
        return results
    results.update({f"hospital/{k}": v for k, v in hospital_gate(hospital).items()})
    results["search_summary"] = (
        f"Exact search on a synthetic hospital (one thread, {compare['pairs']} pairs, load "
        f"{compare['load_average_1min']:.1f}): pruned {compare['pruned/pairs_per_second']:.0f} "
        f"pairs/s, float32 GEMM {compare['gemm/pairs_per_second']:.0f}, brute force "
        f"{compare['brute_force/pairs_per_second']:.0f} (pruned "
        f"{compare['pruned/speedup_over_brute_force']:.1f}x brute force, "
        f"{compare['pruned/speedup_over_gemm']:.1f}x GEMM; "
        f"{compare['pruned/float32_pair_fraction']:.1%} of the pairs past the int8 bounds), max "
        f"relative difference {compare['pruned/max_relative_difference']:.1e}; whole hospital "
        f"({results['hospital/scans']} scans x {results['hospital/candidates']} candidates, "
        f"{THREADS} threads, load {results['hospital/load_average_1min']:.1f}): calibration "
        f"{results['hospital/calibration_seconds']:.0f} s + search "
        f"{results['hospital/search_seconds']:.0f} s, peak RSS "
        f"{results['hospital/peak_rss_gib']:.1f} GiB.")
    return results


# --- a synthetic hospital ------------------------------------------------------------------------

@dataclass(frozen=True)
class Hospital:
    """A synthetic site: images (M, 32, 32, 32), their latents (M, 3, 16, 16, 16), patient ids
    (M,), and candidates: views (N, 27, 3, 16, 16, 16) and what each candidate is."""

    images: torch.Tensor
    bank: torch.Tensor
    patients: list[int]
    candidate_views: torch.Tensor
    candidate_kinds: list[str]

    def scan_views(self, start: int, stop: int) -> torch.Tensor:
        """The 27 translates of scans [start, stop), embedded: (n, 27, 3, 16, 16, 16)."""
        return translate_views(self.images[start:stop])


def _smooth_fields(count: int, size: int, generator: torch.Generator,
                   correlation: float) -> torch.Tensor:
    """Gaussian random fields (count, S, S, S), unit std, power spectrum ~ (1 + (f/f0)^2)^-1.5
    (f0 = size / correlation): smooth at ``correlation`` voxels with a power-law tail."""
    freq = torch.fft.fftfreq(size) * size
    half = torch.fft.rfftfreq(size) * size
    radius2 = freq[:, None, None] ** 2 + freq[None, :, None] ** 2 + half[None, None, :] ** 2
    amplitude = (1 + radius2 * (correlation / size) ** 2) ** -0.75
    noise = torch.randn((count, size, size, size), generator=generator)
    fields = torch.fft.irfftn(torch.fft.rfftn(noise, dim=(1, 2, 3)) * amplitude,
                              s=(size,) * 3, dim=(1, 2, 3))
    return fields / fields.flatten(1).std(1)[:, None, None, None]


_ENCODER = torch.Generator().manual_seed(1234)
_ENCODER_WEIGHTS = torch.randn((LATENT_CHANNELS, 8), generator=_ENCODER)
_ENCODER_WEIGHTS /= _ENCODER_WEIGHTS.norm(dim=1, keepdim=True)


def stand_in_encoder(images: torch.Tensor) -> torch.Tensor:
    """A fixed linear stand-in for the public encoder: (n, S, S, S) -> (n, 3, S/2, S/2, S/2), each
    latent voxel 3 fixed random combinations of its 2x2x2 image voxels (the demo's latent grid)."""
    n, s = images.shape[0], images.shape[-1] // 2
    blocks = images.reshape(n, s, 2, s, 2, s, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(n, s, s, s, 8)
    return (blocks @ _ENCODER_WEIGHTS.T).permute(0, 4, 1, 2, 3).contiguous()


def translate_views(images: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """What the server sends for candidates: every translate embedded, (n, 27, 3, s, s, s)."""
    return torch.stack([stand_in_encoder(torch.roll(images, o, dims=(1, 2, 3)))
                        for o in translations(max_shift)], dim=1)


def synthetic_hospital(scans: int, candidates: int, size: int = 32, seed: int = 0,
                       protocols: int = 6, planted: int = 8) -> Hospital:
    """A hospital with the demo cohort's kinds of variation, as smooth random fields.

    Each scan is a tissue mixture (background, CSF, grey, white matter: a softmax of smooth logit
    fields) drawn through one of ``protocols`` scanner contrasts, plus noise, scaled so that its brightest tissue is 1.
    A patient = the template anatomy + age atrophy (CSF grows along a fixed field) + head size +
    an own smooth deformation-like field; patients have 1-3 visits (follow-ups: older, new
    noise; near duplicates). Candidates are new patients from the same model (what a generator
    trained on such patients produces) plus ``planted`` copies of scans (exact, shifted by one
    voxel, noised, brightened), all embedded by the stand-in encoder under 27 translates.
    """
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    anatomy = _smooth_fields(3, size, generator, correlation=4.0)
    atrophy = _smooth_fields(1, size, generator, correlation=6.0)[0]
    contrasts = torch.rand((protocols, 4), generator=generator) * torch.tensor([0.05, 0.6, 0.6, 0.6]) \
        + torch.tensor([0.0, 0.1, 0.3, 0.4])

    def render(count: int, patient_fields, ages, heads, protocol, noise: float) -> torch.Tensor:
        radius = (grid ** 2 * torch.tensor([1.0, 0.8, 0.9])[:, None, None, None]).sum(0).sqrt()
        brain = torch.sigmoid((0.8 * heads[:, None, None, None] - radius[None]) * 12)
        logits = torch.stack([1.5 * anatomy[0] + ages[:, None, None, None] * atrophy
                              + patient_fields[:, 0],
                              1.5 * anatomy[1] + patient_fields[:, 1],
                              1.5 * anatomy[2] + patient_fields[:, 2]], dim=1)
        tissue = torch.softmax(logits, dim=1) * brain[:, None]
        fractions = torch.cat([(1 - brain)[:, None], tissue], dim=1)       # (n, 4, S, S, S)
        image = (fractions * contrasts[protocol][:, :, None, None, None]).sum(1)
        image = image + noise * torch.randn(image.shape, generator=generator)
        return image / contrasts[protocol].amax(1)[:, None, None, None]     # brightest tissue 1

    def patients(count: int):
        fields = 0.8 * _smooth_fields(3 * count, size, generator, correlation=3.0)
        return (fields.reshape(count, 3, size, size, size),
                torch.rand(count, generator=generator) * 2.0,              # atrophy 0..2
                1 + 0.04 * torch.randn(count, generator=generator),        # head size
                torch.randint(0, protocols, (count,), generator=generator))

    visits = torch.randint(1, 4, (scans,), generator=generator)
    owner = torch.repeat_interleave(torch.arange(scans), visits)[:scans]
    num_patients = int(owner.max()) + 1
    fields, ages, heads, protocol = patients(num_patients)
    first = torch.ones(scans, dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]
    later = torch.rand(scans, generator=generator) * 0.3 * (~first)       # follow-up atrophy
    images = torch.cat([render(e - s, fields[owner[s:e]], ages[owner[s:e]] + later[s:e],
                               heads[owner[s:e]], protocol[owner[s:e]], noise=0.02)
                        for s, e in _spans(scans, 512)])
    fresh = candidates - min(planted, candidates)
    novel = render(fresh, *patients(fresh), noise=0.02) if fresh else images[:0]
    picks = torch.randint(0, scans, (candidates - fresh,), generator=generator)
    kinds = ["new"] * fresh
    copies = []
    for i, pick in enumerate(picks.tolist()):
        kind = ("exact", "shifted", "noised", "brightened")[i % 4]
        copy = images[pick]
        if kind == "shifted":
            copy = torch.roll(copy, (1, 0, -1), dims=(0, 1, 2))
        elif kind == "noised":
            copy = copy + 0.02 * torch.randn(copy.shape, generator=generator)
        elif kind == "brightened":
            copy = copy * 1.05
        copies.append(copy)
        kinds.append(f"copy-{kind}")
    everything = torch.cat([novel, *(c[None] for c in copies)])
    views = torch.cat([translate_views(everything[s:e]) for s, e in _spans(candidates, 128)])
    bank = torch.cat([stand_in_encoder(images[s:e]) for s, e in _spans(scans, 512)])
    return Hospital(images, bank, owner.tolist(), views, kinds)


def _spans(total: int, step: int):
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes and smaller sets")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the one-thread comparison of brute force, the float32 GEMM "
                             "search and the pruned search (no hospital gate)")
    parser.add_argument("--search-only", action="store_true",
                        help="skip the per-space brute-force timings: only the exact search vs "
                             "brute force and the hospital")
    parser.add_argument("--hospital-scans", type=int, default=None,
                        help="scans in the synthetic hospital (default 2000; the issue's 10000)")
    parser.add_argument("--hospital-candidates", type=int, default=None,
                        help="candidates gated against it (default 100; the issue's 1000)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.hospital_scans, args.hospital_candidates,
                         args.search_only, args.compare_only), indent=2))


if __name__ == "__main__":
    main()
