"""The quality segmenter's training step with MONAI's transposed convolutions (bias fused into
the convolution) against :func:`~models.metrics.segmentation_utility.build_segmenter`'s
(:class:`~models.metrics.segmentation_utility.BiasAfterConvTranspose3d`, the bias added after),
in one run.

The step is :func:`~models.metrics.segmentation_utility.train_segmenter`'s: the default
:class:`~models.metrics.segmentation_utility.SegmenterSettings` UNet, DiceCE loss, Adam, batch
4, forward under bf16 autocast as the evaluation runs it on a CPU with native bf16 (fp32
otherwise), on one thread, as each worker of the segmenter pool trains. The two arms start
from the same weights and see the same batch; their steps alternate so that a slower or faster
moment of a shared machine falls on both. Also reported: the largest difference between the
two arms' logits (fp32, eval mode).

Run: ``python -m experiments.benchmarks.segmenter_step [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from monai.losses import DiceCELoss

from models.device import native_bf16
from models.metrics.segmentation_utility import SegmenterSettings, build_segmenter

NUM_CLASSES = 4


def _fused_bias(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with MONAI's own transposed convolutions back (the bias fused)."""
    for module in net.modules():
        if isinstance(module, torch.nn.ConvTranspose3d):
            module.__class__ = torch.nn.ConvTranspose3d
    return net


def _step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool):
    optimizer = torch.optim.Adam(net.parameters(), lr=SegmenterSettings().learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(images)
        loss_fn(logits.float(), labels).backward()
        optimizer.step()
    return step


def run(quick: bool = False) -> dict:
    """Time both arms (16^3 and 3 steps quick, the demo's 32^3 and 15 otherwise)."""
    size, repeats = (16, 3) if quick else (32, 15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16 = native_bf16("cpu")
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(4, 1, size, size, size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (4, 1, size, size, size), generator=generator)
        nets = {"bias_after": build_segmenter(NUM_CLASSES, 0),
                "fused_bias": _fused_bias(build_segmenter(NUM_CLASSES, 0))}
        with torch.no_grad():
            outputs = [net.eval()(images) for net in nets.values()]
        difference = float((outputs[0] - outputs[1]).abs().max())
        steps = {name: _step(net.train(), images, labels, bf16) for name, net in nets.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(repeats):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    fused, after = median["fused_bias"], median["bias_after"]
    return {
        "summary": f"the quality segmenter's training step {fused / after:.2f}x faster with the "
                   f"transposed convolutions' bias added after ({after * 1e3:.0f} ms against "
                   f"{fused * 1e3:.0f} ms, batch 4, {size}^3, {'bf16' if bf16 else 'fp32'}, "
                   f"1 thread); logits differ by at most {difference:.1e}.",
        "image_size": size, "batch": 4, "threads": 1, "bf16": bf16,
        "training_step_ms": {name: seconds * 1e3 for name, seconds in median.items()},
        "speedup": fused / after, "max_logit_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes, 3 steps")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
