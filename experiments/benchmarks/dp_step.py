"""DP-SGD step time over the non-DP step time, per Opacus grad_sample_mode, on the demo latent UNet.

Timing: for each trainable set (the whole UNet; the attention and conditioning layers), one process
builds the non-DP model and one private copy per grad-sample mode, then runs their steps round-robin
(non-DP, then every mode, repeated), so every DP step is paired with a non-DP step taken moments
before it on the same model weights and batch. Reported per mode: the median of the paired ratios
(robust on a shared machine) and the ratio of the best times.

Memory and correctness: each configuration runs once more in its own process, so its peak memory is
its own (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and checks its
per-sample gradients (ghost clipping: per-sample gradient norms) against single-row autograd.

- non-DP step: forward, ``loss.mean().backward()``, Adam step, on the same trainable parameters.
- DP step: the privacy engine's path (``privacy.dp_trainer``): forward, backward with per-sample
  gradients, per-patient reduction, Opacus clipping and noise, Adam step; physical batches of
  whole patients as ``BatchMemoryManager`` forms them.

Modes: Opacus hooks with its own Conv3d grad sampler (``unfold``) and with
:mod:`privacy.grad_samplers` (``grouped``), functorch, expanded weights (ew) and ghost clipping.
Demo size: ``build_latent_unet`` (concat conditioning: 3 latent + 4 map channels, channels
[32, 64, 64], attention [False, True, True], 1 res block, 16 head channels, 8 groups) on 16^3
latents, batch 8 patients of one scan each, 1 torch thread; then the fastest correct mode with 2
threads and with physical batches of 4. ``quick``: 8^3 latents, batch 4, two repetitions, in
this process.

    python -m experiments.benchmarks.dp_step [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

DEMO_MODEL = {
    "unet": {"channels": [32, 64, 64], "attention_levels": [False, True, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8},
    "conditioning": {"mode": "concat"},
    "autoencoder": {"latent_channels": 3},
    "diffusion": {"train_timesteps": 1000, "beta_schedule": "scaled_linear_beta"},
}
NUM_CLASSES = 4
# (grad_sample_mode, Conv3d grad sampler); the sampler only matters where Opacus' hooks run.
MODES = [("hooks", "unfold"), ("hooks", "grouped"), ("functorch", "grouped"), ("ew", "grouped"),
         ("ghost", "grouped")]
SUBSETS = ["all", "attention_conditioning"]


@dataclass
class _Bench:
    """One batch, its per-sample loss and the non-DP model, on the benchmark's device."""

    spec: dict[str, Any]
    device: Any
    plain: Any
    loss_fn: Callable
    nondp_step: Callable[[], None]


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
    scheduler = build_scheduler(DEMO_MODEL)
    plain = _pretrained_like(build_latent_unet(DEMO_MODEL, NUM_CLASSES, 0)).to(device)
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


def _private(bench: _Bench, mode: str, conv: str):
    """A private copy of the bench's model: (module, optimizer, dp_step)."""
    import torch

    from privacy.dp_trainer import DPSettings, backward_per_patient, privatise
    from privacy.grad_samplers import use_conv3d_grad_sampler

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


def check(bench: _Bench, mode: str, conv: str) -> dict[str, Any]:
    """Per-sample gradients (rows 0 and 1) of the DP path against single-row autograd."""
    import torch

    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from privacy.grad_samplers import use_conv3d_grad_sampler

    module, optimizer, _ = _private(bench, mode, conv)
    use_conv3d_grad_sampler(conv)
    params = [p for p in bench.plain.parameters() if p.requires_grad]
    reference = [torch.autograd.grad(bench.loss_fn(bench.plain, slice(r, r + 1)).sum(), params)
                 for r in (0, 1)]
    losses = bench.loss_fn(module)
    if mode == "ghost":
        DPTensorFastGradientClipping(module, optimizer, losses, "sum").backward()
        norms = module.per_sample_gradient_norms[:2]
        expected = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r)) for r in reference])
        error, compared = ((norms - expected).abs() / expected).max().item(), "gradient norms"
    else:
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
    """Peak memory of one non-DP step, then of one DP step, and the correctness check."""
    import torch

    bench = _bench(spec, spec["trainable"])
    result = {"check": check(bench, spec["mode"], spec["conv"])}
    _, _, dp_step = _private(bench, spec["mode"], spec["conv"])
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bench.nondp_step()
    result["nondp_peak_mb"] = _peak_memory_mb(bench.device)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dp_step()
    peak = _peak_memory_mb(bench.device)
    # ru_maxrss only grows: on CPU the DP figure is the peak of both steps.
    result["dp_peak_mb"] = peak if bench.device.type == "cuda" else max(peak,
                                                                         result["nondp_peak_mb"])
    return result


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Round-robin timing of the non-DP step and every mode's DP step (see the module doc)."""
    bench = _bench(spec, spec["trainable"])
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for mode, conv in spec["modes"]:
        name = f"{mode}/{conv}"
        try:
            _, _, steps[name] = _private(bench, mode, conv)
            steps[name]()  # warm-up; a mode that cannot run this model fails here
        except Exception as err:  # noqa: BLE001 - a mode that fails on this model is a result
            steps.pop(name, None)
            errors[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
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
        name = f"{mode}/{conv}"
        row = {"mode": mode, "conv": conv, "trainable": spec["trainable"],
               "threads": spec["threads"], "physical": spec["physical"], **memory.get(name, {})}
        if name in timed["errors"]:
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


def run(quick: bool) -> dict[str, Any]:
    """Every mode for the whole UNet and for the attention+conditioning subset, then the fastest
    correct whole-UNet mode with 2 threads and with half-size physical batches. Returns the rows
    and the fastest verified mode per trainable set (by the median paired ratio)."""
    from tqdm import tqdm

    base = {"size": 8 if quick else 16, "batch": 4 if quick else 8, "reps": 2 if quick else 7,
            "threads": 1}
    base["physical"] = base["batch"]
    modes = [list(m) for m in MODES]
    results = []
    in_process = quick  # quick: no subprocesses (memory is then this process' peak so far)
    for subset in tqdm(SUBSETS, desc="dp_step", disable=None):
        spec = {**base, "trainable": subset, "modes": modes}
        memory = {}
        for mode, conv in modes:
            one = {**spec, "mode": mode, "conv": conv}
            try:
                measured = memory_and_check(one) if in_process else _child("memory", one)
            except Exception as err:  # noqa: BLE001 - reported with the mode's row
                measured = {"error": f"{type(err).__name__}: {err}"[:200]}
            if "error" in measured:  # the timing run reports the mode's own failure
                measured = {"memory_error": measured["error"]}
            memory[f"{mode}/{conv}"] = measured
        timed = timing(spec) if in_process else _child("timing", spec)
        results += _summarise(spec, timed, memory) if "times" in timed else [
            {**spec, "mode": "all modes", "conv": "-", "error": timed.get("error", "failed")}]
    verified = [r for r in results if "ratio" in r and r.get("check", {}).get("correct")]
    fastest = {subset: min((r for r in verified if r["trainable"] == subset),
                           key=lambda r: r["ratio_median"], default=None) for subset in SUBSETS}
    variants = []
    if not quick and fastest["all"] is not None:
        best = [[fastest["all"]["mode"], fastest["all"]["conv"]]]
        for change in ({"threads": 2}, {"physical": base["batch"] // 2}):
            spec = {**base, "trainable": "all", "modes": best, **change}
            timed = _child("timing", spec)
            if "times" in timed:
                variants += _summarise(spec, timed, {})
    summary = ("mode", "conv", "ratio_median", "ratio", "dp_s", "nondp_s")
    return {"quick": quick, "latent_size": base["size"], "batch": base["batch"],
            "repetitions": base["reps"], "results": results, "variants": variants,
            "fastest_correct": {s: (None if r is None else {k: r[k] for k in summary})
                                for s, r in fastest.items()}}


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
