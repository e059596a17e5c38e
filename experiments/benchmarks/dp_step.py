"""DP-SGD step time over the non-DP step time, per Opacus grad_sample_mode, on the demo latent UNet.

One configuration (grad-sample mode, Conv3d grad sampler, trainable subset, threads, physical batch)
runs in its own subprocess, so its peak memory is its own (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). Inside it, the non-DP step and the DP step run on the
same model and batch, alternately, and the ratio of their best times is reported (the median ratio
too: the machine is shared). Each configuration also checks its per-sample gradients (or, for ghost
clipping, per-sample gradient norms) against a per-sample autograd loop on the first rows.

- non-DP step: forward, ``loss.mean().backward()``, Adam step, on the same trainable parameters.
- DP step: the privacy engine's own path (``privacy.dp_trainer``): forward, backward with per-sample
  gradients, per-patient reduction, Opacus clipping and noise, Adam step.

Demo size: ``build_latent_unet`` (concat conditioning: 3 latent + 4 map channels, channels
[32, 64, 64], attention [False, True, True], 1 res block, 16 head channels, 8 groups) on 16^3
latents, batch 8 patients of one scan each. ``quick`` runs 8^3 latents, batch 4, one repetition.

    python -m experiments.benchmarks.dp_step [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

DEMO_MODEL = {
    "unet": {"channels": [32, 64, 64], "attention_levels": [False, True, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8},
    "conditioning": {"mode": "concat"},
    "autoencoder": {"latent_channels": 3},
    "diffusion": {"train_timesteps": 1000, "beta_schedule": "scaled_linear_beta"},
}
NUM_CLASSES = 4
# (grad_sample_mode, Conv3d grad sampler): Opacus' default unfold sampler and the grouped one.
MODES = [("hooks", "unfold"), ("hooks", "grouped"), ("functorch", "grouped"), ("ew", "grouped"),
         ("ghost", "grouped")]
SUBSETS = ["all", "attention_conditioning"]
_SUMMARY = ("mode", "conv", "ratio", "ratio_median", "dp_s", "nondp_s")


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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and check one configuration in this process (see the module docstring)."""
    import copy

    import torch

    from models.diffusion import build_scheduler, diffusion_loss
    from models.latent_unet import build_latent_unet
    from privacy.dp_trainer import DPSettings, backward_per_patient, privatise
    from privacy.trainable import apply_trainable

    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch = spec["size"], spec["batch"]
    torch.manual_seed(0)
    scheduler = build_scheduler(DEMO_MODEL)
    plain = _pretrained_like(build_latent_unet(DEMO_MODEL, NUM_CLASSES, 0)).to(device)
    apply_trainable(plain, spec["trainable"])
    latents = torch.randn(batch, 3, size, size, size, device=device)
    labels = torch.nn.functional.one_hot(torch.randint(0, NUM_CLASSES, (batch, size, size, size)),
                                         NUM_CLASSES).permute(0, 4, 1, 2, 3).float().to(device)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def loss_fn(model, rows=slice(None)):
        return diffusion_loss(model, scheduler, latents[rows], labels[rows], noise=noise[rows],
                              timesteps=timesteps[rows])

    private = copy.deepcopy(plain)
    settings = DPSettings(grad_sample_mode=spec["mode"], conv_grad_sampler=spec["conv"],
                          expected_batch_size=batch, max_physical_batch_size=spec["physical"])
    plain_optimizer = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    module, optimizer = privatise(private, settings, noise_multiplier=1.0,
                                  expected_batch_size=batch)
    patient_of_row = torch.arange(batch)
    result: dict[str, Any] = {**spec, "device": str(device),
                              "trainable_parameters": sum(p.numel() for p in optimizer.params)}

    def nondp_step():
        plain_optimizer.zero_grad(set_to_none=True)
        loss_fn(plain).mean().backward()
        plain_optimizer.step()
        _sync(device)

    def dp_step():
        # Physical batches of whole patients, as BatchMemoryManager forms them.
        for start in range(0, batch, spec["physical"]):
            rows = slice(start, min(batch, start + spec["physical"]))
            last = rows.stop == batch
            optimizer.signal_skip_step(do_skip=not last)
            backward_per_patient(module, optimizer, lambda m, _: loss_fn(m, rows), None,
                                 patient_of_row[: rows.stop - rows.start], rows.stop - rows.start,
                                 spec["mode"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)

    result["check"] = _check(spec, plain, module, optimizer, loss_fn) if spec["check"] else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _peak_memory_mb(device)
    nondp_step()
    result["nondp_peak_mb"] = _peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dp_step()
    result["dp_peak_mb"] = max(_peak_memory_mb(device), result["nondp_peak_mb"]) \
        if device.type == "cpu" else _peak_memory_mb(device)
    result["baseline_mb"] = base
    times: dict[str, list[float]] = {"nondp": [], "dp": []}
    for _ in range(spec["reps"]):
        for name, step in (("nondp", nondp_step), ("dp", dp_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    result["nondp_s"], result["dp_s"] = min(times["nondp"]), min(times["dp"])
    result["ratio"] = result["dp_s"] / result["nondp_s"]
    result["ratio_median"] = statistics.median(d / n for d, n in zip(times["dp"], times["nondp"]))
    if spec["trainable"] != "all":
        full = _pretrained_like(build_latent_unet(DEMO_MODEL, NUM_CLASSES, 0)).to(device)
        full_optimizer = torch.optim.Adam(full.parameters(), lr=1e-4)

        def full_step():
            full_optimizer.zero_grad(set_to_none=True)
            loss_fn(full).mean().backward()
            full_optimizer.step()
            _sync(device)
        full_step()
        best = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            full_step()
            best.append(time.perf_counter() - start)
        result["nondp_full_s"] = min(best)
        result["ratio_vs_full_nondp"] = result["dp_s"] / result["nondp_full_s"]
    return result


def _check(spec, plain, module, optimizer, loss_fn) -> dict[str, Any]:
    """Per-sample gradients (rows 0 and 1) of the DP path against autograd on single rows."""
    import torch

    params = [p for p in plain.parameters() if p.requires_grad]
    reference = []
    for row in (0, 1):
        grads = torch.autograd.grad(loss_fn(plain, slice(row, row + 1)).sum(), params)
        reference.append([g.detach() for g in grads])
    losses = loss_fn(module)
    if spec["mode"] == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
        DPTensorFastGradientClipping(module, optimizer, losses, "sum").backward()
        norms = module.per_sample_gradient_norms[:2]
        expected = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in r)) for r in reference])
        error = ((norms - expected).abs() / expected).max().item()
        what = "per-sample gradient norms"
    else:
        losses.sum().backward()
        # Relative to the row's whole gradient: some parameters (attention key biases) have an
        # exactly zero gradient, computed as ~1e-10 either way.
        error = max((torch.sqrt(sum((p.grad_sample[row] - reference[row][j]).pow(2).sum()
                                    for j, p in enumerate(optimizer.params))) /
                     torch.sqrt(sum(g.pow(2).sum() for g in reference[row]))).item()
                    for row in (0, 1))
        what = "per-sample gradients"
    optimizer.zero_grad(set_to_none=True)
    return {"compared": what, "max_relative_error": error, "correct": error < 1e-3}


def _guarded(one, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return one(spec)
    except Exception as err:  # noqa: BLE001 - a mode that fails on this model is a result
        return {**spec, "error": f"{type(err).__name__}: {err}"[:300]}


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    process = subprocess.run([sys.executable, "-m", "experiments.benchmarks.dp_step", "--child",
                              json.dumps(spec)], capture_output=True, text=True, timeout=1800)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        message = (process.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": message[:300]}
    return json.loads(lines[-1])


def run(quick: bool) -> dict[str, Any]:
    """Measure every mode for the full UNet and the attention+conditioning subset, then the best
    configuration's sensitivity to threads and physical batch size. Returns the results and the
    fastest configuration whose per-sample gradients were verified."""
    from tqdm import tqdm

    base = {"size": 8 if quick else 16, "batch": 4 if quick else 8, "reps": 1 if quick else 5,
            "threads": 1, "check": True}
    base["physical"] = base["batch"]
    specs = [{**base, "mode": mode, "conv": conv, "trainable": subset}
             for subset in SUBSETS for mode, conv in MODES]
    # Quick runs stay in this process (peak memory is then the process' peak so far).
    one = measure if quick else _in_subprocess
    results = [_guarded(one, spec) for spec in tqdm(specs, desc="dp_step", disable=None)]
    usable = [r for r in results if "error" not in r and r["check"]["correct"]]
    fastest = {subset: min((r for r in usable if r["trainable"] == subset),
                           key=lambda r: r["ratio"], default=None) for subset in SUBSETS}
    variants = []
    if not quick and fastest["all"] is not None:
        best = {k: fastest["all"][k] for k in (*base, "mode", "conv", "trainable")}
        variants = [_in_subprocess({**best, "threads": 2, "check": False}),
                    _in_subprocess({**best, "physical": best["batch"] // 2, "check": False})]
    return {"quick": quick, "latent_size": base["size"], "batch": base["batch"],
            "results": results, "variants": variants,
            "fastest_correct": {subset: (None if r is None else {k: r[k] for k in _SUMMARY})
                                for subset, r in fastest.items()}}


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<10}{'conv':<9}{'trainable':<24}{'thr':>4}{'phys':>5}{'non-DP s':>10}"
             f"{'DP s':>9}{'ratio':>7}{'median':>8}{'vs full':>8}{'peak MB':>9}  check"]
    for r in results:
        head = (f"{r['mode']:<10}{r['conv']:<9}{r['trainable']:<24}{r['threads']:>4}"
                f"{r['physical']:>5}")
        if "error" in r:
            lines.append(f"{head}  failed: {r['error'][:70]}")
            continue
        check = r["check"]
        verdict = "-" if check is None else (
            f"{'ok' if check['correct'] else 'WRONG'} ({check['max_relative_error']:.1e})")
        versus = f"{r['ratio_vs_full_nondp']:.2f}" if "ratio_vs_full_nondp" in r else "-"
        lines.append(f"{head}{r['nondp_s']:>10.3f}{r['dp_s']:>9.3f}{r['ratio']:>7.2f}"
                     f"{r['ratio_median']:>8.2f}{versus:>8}{r['dp_peak_mb']:>9.0f}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    outcome = run(args.quick)
    print(_table(outcome["results"] + outcome["variants"]))
    print(json.dumps(outcome["fastest_correct"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
