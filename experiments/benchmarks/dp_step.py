"""DP-SGD step time over the non-DP step time, per Opacus grad_sample_mode, on the latent UNet.

Timing: for each trainable set (the whole UNet; the attention and conditioning layers), one process
builds the non-DP model and one private copy per grad-sample mode, then runs their steps round-robin
(non-DP, then every mode, repeated), so every DP step is paired with a non-DP step taken moments
before it on the same model weights and batch. Reported per mode: the median of the paired ratios
(robust on a shared machine) and the ratio of the best times.

Memory and correctness: each configuration runs once more in its own process (not timed, so as
many at once as there are cores), so its peak memory is its own (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA): one non-DP step, then one DP step (``ru_maxrss``
only grows, so the DP figure is the peak of both), then a check of its per-sample gradients (ghost
clipping: per-sample gradient norms) of two rows against single-row autograd.

- non-DP step: forward, ``loss.mean().backward()``, Adam step, on the same trainable parameters.
- DP step: the privacy engine's path (``privacy.dp_trainer``): forward, backward with per-sample
  gradients, per-patient reduction, Opacus clipping and noise, Adam step; physical batches of
  whole patients as ``BatchMemoryManager`` forms them.

Modes: Opacus hooks with its own Conv3d grad sampler (``unfold``) and with
:mod:`privacy.grad_samplers` (``grouped``), functorch and expanded weights (ew), which compute
every layer themselves (no Conv3d sampler: ``-``), and ghost clipping (per-sample norms; Conv3d
through the registered ``grouped`` sampler). A mode that fails on this model is reported with its
error. Size: the default UNet of ``configs/default.yaml`` (``build_latent_unet``, concat
conditioning: 3 latent + 4 map channels, channels [32, 64, 64], attention [False, True, True], 1 res
block, 16 head channels, 8 groups) on the demo's 16^3 latent grid, batch 8 patients of one scan
each (the default ``expected_batch_size``), 1 torch thread, 5 repetitions; then the fastest correct
mode with physical batches of 4. One thread throughout: on a shared machine a second thread mostly
measures the other processes (on 2 busy cores it made both steps ~5x slower). About 5-6 minutes on 2
busy CPU cores. ``quick``: 8^3 latents, batch 4, two repetitions, in this process.

    python -m experiments.benchmarks.dp_step [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MODEL = {  # configs/default.yaml's latent UNet
    "unet": {"channels": [32, 64, 64], "attention_levels": [False, True, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8},
    "conditioning": {"mode": "concat"},
    "autoencoder": {"latent_channels": 3},
    "diffusion": {"train_timesteps": 1000, "beta_schedule": "scaled_linear_beta"},
}
NUM_CLASSES = 4
# (grad_sample_mode, Conv3d grad sampler); the sampler only matters where Opacus' hooks run.
MODES = [("hooks", "unfold"), ("hooks", "grouped"), ("functorch", None), ("ew", None),
         ("ghost", "grouped")]
SUBSETS = ["all", "attention_conditioning"]
GOAL = 1.5  # the project's target for the DP step over the non-DP step


@dataclass
class _Bench:
    """One batch, its per-sample loss and the non-DP model, on the benchmark's device."""

    spec: dict[str, Any]
    device: Any
    plain: Any
    loss_fn: Callable
    nondp_step: Callable[[], None]


def _name(mode: str, conv: str | None) -> str:
    return mode if conv in (None, "-") else f"{mode}/{conv}"


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device) -> float:
    import resource

    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pretrained_like(model):
    """Perturb every weight: MONAI zero-initialises the output and attention projections, so at
    initialisation only the last layer has a gradient; fine-tuning starts from pretrained
    weights."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def _bench(spec: dict[str, Any], trainable: str) -> _Bench:
    import torch

    from models.diffusion import build_scheduler, diffusion_loss
    from models.latent_unet import build_latent_unet
    from privacy.trainable import apply_trainable

    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch = spec["size"], spec["batch"]
    torch.manual_seed(0)
    scheduler = build_scheduler(MODEL)
    plain = _pretrained_like(build_latent_unet(MODEL, NUM_CLASSES, 0)).to(device)
    apply_trainable(plain, trainable)
    latents = torch.randn(batch, 3, size, size, size, device=device)
    labels = torch.nn.functional.one_hot(torch.randint(0, NUM_CLASSES, (batch, size, size, size)),
                                         NUM_CLASSES).permute(0, 4, 1, 2, 3).float().to(device)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def loss_fn(model, rows=slice(None)):
        """Per-sample noise-prediction MSE (rows,), fixed noise and timesteps."""
        return diffusion_loss(model, scheduler, latents[rows], labels[rows], noise=noise[rows],
                              timesteps=timesteps[rows])

    optimizer = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def nondp_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(plain).mean().backward()
        optimizer.step()
        _sync(device)

    return _Bench(spec, device, plain, loss_fn, nondp_step)


def _private(bench: _Bench, mode: str, conv: str | None):
    """A private copy of the bench's model: (module, optimizer, dp_step)."""
    import torch

    from privacy.dp_trainer import DPSettings, backward_per_patient, privatise
    from privacy.grad_samplers import use_conv3d_grad_sampler

    conv = conv or "grouped"  # functorch and ew never call it
    batch, physical = bench.spec["batch"], bench.spec["physical"]
    settings = DPSettings(grad_sample_mode=mode, conv_grad_sampler=conv, expected_batch_size=batch,
                          max_physical_batch_size=physical)
    module, optimizer = privatise(copy.deepcopy(bench.plain), settings, noise_multiplier=1.0,
                                  expected_batch_size=batch)

    def dp_step():
        use_conv3d_grad_sampler(conv)  # a process-wide registry: set it for this mode's step
        for start in range(0, batch, physical):
            rows = slice(start, min(batch, start + physical))
            count = rows.stop - rows.start
            optimizer.signal_skip_step(do_skip=rows.stop < batch)
            backward_per_patient(module, optimizer, lambda m, _: bench.loss_fn(m, rows), None,
                                 torch.arange(count), count, mode)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(bench.device)

    return module, optimizer, dp_step


@contextlib.contextmanager
def _first_layer_warning_off():
    """As in privacy.dp_trainer: the first layer's input needs no gradient, Opacus' hooks still
    get the output gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def check(bench: _Bench, mode: str, conv: str | None) -> dict[str, Any]:
    """Per-sample gradients (rows 0 and 1) of the DP path against single-row autograd."""
    import torch

    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from privacy.grad_samplers import use_conv3d_grad_sampler

    module, optimizer, _ = _private(bench, mode, conv)
    use_conv3d_grad_sampler(conv or "grouped")
    params = [p for p in bench.plain.parameters() if p.requires_grad]
    reference = [torch.autograd.grad(bench.loss_fn(bench.plain, slice(r, r + 1)).sum(), params)
                 for r in (0, 1)]
    losses = bench.loss_fn(module, slice(0, 2))
    if mode == "ghost":
        with _first_layer_warning_off():
            DPTensorFastGradientClipping(module, optimizer, losses, "sum").backward()
        norms = module.per_sample_gradient_norms[:2]
        expected = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r)) for r in reference])
        error, compared = ((norms - expected).abs() / expected).max().item(), "gradient norms"
    else:
        with _first_layer_warning_off():
            losses.sum().backward()
        # Relative to the row's whole gradient: some parameters (attention key biases) have an
        # exactly zero gradient, computed as ~1e-10 either way.
        error = max((torch.sqrt(sum((p.grad_sample[r] - reference[r][j]).pow(2).sum()
                                    for j, p in enumerate(optimizer.params))) /
                     torch.sqrt(sum(g.pow(2).sum() for g in reference[r]))).item()
                    for r in (0, 1))
        compared = "per-sample gradients"
    optimizer.zero_grad(set_to_none=True)
    return {"compared": compared, "max_relative_error": error, "correct": error < 1e-3}


def memory_and_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one non-DP step, then of one DP step, then the correctness check."""
    import torch

    bench = _bench(spec, spec["trainable"])
    _, _, dp_step = _private(bench, spec["mode"], spec["conv"])
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bench.nondp_step()
    result: dict[str, Any] = {"nondp_peak_mb": _peak_memory_mb(bench.device)}
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dp_step()
    peak = _peak_memory_mb(bench.device)
    # ru_maxrss only grows: on CPU the DP figure is the peak of both steps.
    result["dp_peak_mb"] = peak if bench.device.type == "cuda" else max(peak,
                                                                         result["nondp_peak_mb"])
    result["check"] = check(bench, spec["mode"], spec["conv"])
    return result


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Round-robin timing of the non-DP step and every mode's DP step (see the module doc)."""
    bench = _bench(spec, spec["trainable"])
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for mode, conv in spec["modes"]:
        name = _name(mode, conv)
        try:
            _, _, steps[name] = _private(bench, mode, conv)
            steps[name]()  # warm-up; a mode that cannot run this model fails here
        except Exception as err:  # noqa: BLE001 - a mode that fails on this model is a result
            steps.pop(name, None)
            errors[name] = _failure(err)
    full = _bench(spec, "all") if spec["trainable"] != "all" else None
    bench.nondp_step()
    if full is not None:
        full.nondp_step()
    times: dict[str, list[float]] = {"nondp": [], "nondp_full": [], **{n: [] for n in steps}}
    for _ in range(spec["reps"]):
        for name, step in [("nondp", bench.nondp_step)] + list(steps.items()) + (
                [("nondp_full", full.nondp_step)] if full is not None else []):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {"times": times, "errors": errors, "device": str(bench.device)}


def _failure(err: Exception) -> str:
    """The error's first line and where it was raised (often inside torch or Opacus)."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    message = (str(err).splitlines() or [""])[0]
    return (f"{type(err).__name__} in {'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} "
            f"({frame.name}): {message}")[:300]


def _child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    process = subprocess.run([sys.executable, "-m", "experiments.benchmarks.dp_step", "--child",
                              kind, json.dumps(spec)], capture_output=True, text=True,
                             timeout=3600)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        message = (process.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": message[:300]}
    return json.loads(lines[-1])


def _summarise(spec: dict[str, Any], timed: dict[str, Any], memory: dict[str, dict]) -> list[dict]:
    times, rows = timed["times"], []
    nondp = times["nondp"]
    for mode, conv in spec["modes"]:
        name = _name(mode, conv)
        row = {"mode": mode, "conv": conv or "-", "trainable": spec["trainable"],
               "threads": spec["threads"], "physical": spec["physical"], **memory.get(name, {})}
        if name in timed["errors"]:
            row.pop("memory_error", None)  # the same failure, said once
            row["error"] = timed["errors"][name]
        else:
            dp = times[name]
            row.update(nondp_s=min(nondp), dp_s=min(dp), ratio=min(dp) / min(nondp),
                       ratio_median=statistics.median(d / n for d, n in zip(dp, nondp)))
            if times.get("nondp_full"):
                row["ratio_vs_full_nondp"] = statistics.median(
                    d / n for d, n in zip(dp, times["nondp_full"]))
        rows.append(row)
    return rows


def _memory_and_checks(spec: dict[str, Any], in_process: bool) -> dict[str, dict[str, Any]]:
    """:func:`memory_and_check` of every mode, by mode name; in child processes, several at once
    (nothing is timed meanwhile and each peak is its own process')."""
    def measure(mode_conv: list) -> dict[str, Any]:
        one = {**spec, "mode": mode_conv[0], "conv": mode_conv[1]}
        try:
            measured = memory_and_check(one) if in_process else _child("memory", one)
        except Exception as err:  # noqa: BLE001 - reported with the mode's row
            measured = {"error": f"{type(err).__name__}: {err}"[:200]}
        # The timing run reports the mode's own failure.
        return {"memory_error": measured["error"]} if "error" in measured else measured

    workers = 1 if in_process else max(1, min(len(spec["modes"]), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return {_name(*m): r for m, r in zip(spec["modes"], pool.map(measure, spec["modes"]))}


def run(quick: bool) -> dict[str, Any]:
    """Every mode for the whole UNet and for the attention+conditioning subset, then the fastest
    correct whole-UNet mode with half-size physical batches. Returns the rows
    and the fastest verified mode per trainable set (by the median paired ratio)."""
    from tqdm import tqdm

    base = {"size": 8 if quick else 16, "batch": 4 if quick else 8, "reps": 2 if quick else 5,
            "threads": 1}
    base["physical"] = base["batch"]
    modes = [list(m) for m in MODES]
    results = []
    in_process = quick  # quick: no subprocesses (memory is then this process' peak so far)
    for subset in tqdm(SUBSETS, desc="dp_step", disable=None):
        spec = {**base, "trainable": subset, "modes": modes}
        memory = _memory_and_checks(spec, in_process)
        timed = timing(spec) if in_process else _child("timing", spec)
        results += _summarise(spec, timed, memory) if "times" in timed else [
            {**spec, "mode": "all modes", "conv": "-", "error": timed.get("error", "failed")}]
    verified = [r for r in results if "ratio" in r and r.get("check", {}).get("correct")]
    fastest = {subset: min((r for r in verified if r["trainable"] == subset),
                           key=lambda r: r["ratio_median"], default=None) for subset in SUBSETS}
    variants = []
    if not quick and fastest["all"] is not None:
        best = fastest["all"]
        modes = [[best["mode"], None if best["conv"] == "-" else best["conv"]]]
        spec = {**base, "trainable": "all", "modes": modes, "physical": base["batch"] // 2}
        timed = _child("timing", spec)
        variants = _summarise(spec, timed, {}) if "times" in timed else [
            {**spec, "mode": best["mode"], "conv": best["conv"], "error": timed.get("error")}]
    keys = ("mode", "conv", "ratio_median", "ratio", "ratio_vs_full_nondp", "dp_s", "nondp_s")
    return {"summary": _summary_line(results, fastest), "quick": quick,
            "latent_size": base["size"], "batch": base["batch"], "repetitions": base["reps"],
            "results": results, "variants": variants,
            "fastest_correct": {s: (None if r is None else {k: r[k] for k in keys if k in r})
                                for s, r in fastest.items()}}


def _summary_line(results: list[dict[str, Any]], fastest: dict[str, dict | None]) -> str:
    """One line: the fastest verified mode per trainable set, and every mode that failed."""
    parts = []
    for subset, row in fastest.items():
        if row is None:
            parts.append(f"{subset}: no mode both ran and passed the gradient check")
            continue
        versus = (f", {row['ratio_vs_full_nondp']:.2f}x the whole-UNet non-DP step"
                  if "ratio_vs_full_nondp" in row else "")
        verdict = "meets" if row["ratio_median"] <= GOAL else "misses"
        parts.append(f"{subset}: {_name(row['mode'], row['conv'])} at {row['ratio_median']:.2f}x "
                     f"its non-DP step ({verdict} the goal){versus}")
    failed = [f"{_name(r['mode'], r['conv'])} ({r['trainable']})" for r in results if "error" in r]
    wrong = [f"{_name(r['mode'], r['conv'])} ({r['trainable']})" for r in results
             if r.get("check") and not r["check"]["correct"]]
    return (f"Fastest correct DP step (median paired DP/non-DP step time; goal <= {GOAL}x): "
            + "; ".join(parts) + "."
            + (f" Failed: {', '.join(failed)}." if failed else "")
            + (f" Wrong gradients: {', '.join(wrong)}." if wrong else ""))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<10}{'conv':<8}{'trainable':<23}{'thr':>4}{'phys':>5}{'non-DP s':>9}"
             f"{'DP s':>8}{'median':>7}{'best':>6}{'vs full':>8}{'peak MB':>8}  check"]
    for r in rows:
        head = (f"{r['mode']:<10}{r['conv']:<8}{r['trainable']:<23}{r['threads']:>4}"
                f"{r['physical']:>5}")
        if "error" in r:
            lines.append(f"{head}  failed: {r['error'][:70]}")
            continue
        check = r.get("check")
        verdict = "-" if check is None else (
            f"{'ok' if check['correct'] else 'WRONG'} ({check['max_relative_error']:.1e})")
        versus = f"{r['ratio_vs_full_nondp']:.2f}" if "ratio_vs_full_nondp" in r else "-"
        peak = f"{r['dp_peak_mb']:.0f}" if "dp_peak_mb" in r else "-"
        lines.append(f"{head}{r['nondp_s']:>9.3f}{r['dp_s']:>8.3f}{r['ratio_median']:>7.2f}"
                     f"{r['ratio']:>6.2f}{versus:>8}{peak:>8}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, two repetitions")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps((memory_and_check if kind == "memory" else timing)(json.loads(spec))))
        return 0
    outcome = run(args.quick)
    print(_table(outcome["results"] + outcome["variants"]))
    print(json.dumps(outcome["fastest_correct"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
