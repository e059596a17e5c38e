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
import time

import torch

from configs import AutoencoderConfig
from models.autoencoder import build_autoencoder
from privacy.gate import NO_SHIFT, latent_views, nearest_scans, translations, views_of

CHUNK_SIZE = 64   # release.chunk_size's default


def _timed(function, repeats: int = 1) -> float:
    """The best of ``repeats`` wall-clock timings (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def run(quick: bool = False) -> dict:
    """Time every distance space at three (candidates, scans) sizes; a flat dict of results."""
    torch.set_num_threads(1)
    size = 16 if quick else 32
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
        return lambda n, m: nearest_scans(views_of(candidates[:n]), scans[:m], distance,
                                          offsets=shifts, chunk_size=CHUNK_SIZE)

    spaces = {
        "nrmse": image("nrmse"),
        "nrmse_shift1": image("nrmse", offsets),
        "latent_shift1": lambda n, m: nearest_scans(latent_candidates[:n], latent_bank[:m],
                                                    "latent", chunk_size=CHUNK_SIZE),
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
    n, m = sizes[-1]
    results["summary"] = (
        f"At {n}x{m} pairs of {size}^3 volumes the default latent distance (27 translates) checks "
        f"{results[f'latent_shift1/{n}x{m}/pairs_per_second']:.0f} pairs/s, "
        f"{results[f'ratio/nrmse_shift1_over_latent/{n}x{m}']:.1f}x faster than shift-tolerant "
        f"image NRMSE, which costs {results[f'ratio/shift1_over_plain_nrmse/{n}x{m}']:.1f}x plain "
        f"NRMSE; the server encodes each candidate's translates in "
        f"{results['encode_seconds_per_candidate']:.2f} s.")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes and smaller sets")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
