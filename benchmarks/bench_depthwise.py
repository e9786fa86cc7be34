"""Benchmark: the depthwise conv's batched-matmul weight gradient (:mod:`proxyless_ray.nn.depthwise`) against oneDNN's.
Prints one JSON object.

1. Per shape (batch 64, channels_last, 1 thread): the weight gradient alone, PyTorch's ``convolution_backward``
   against :func:`~proxyless_ray.nn.depthwise.depthwise_weight_grad`, on the small-map shapes of the small space on
   Fashion-MNIST (32-pixel input: 4x4 and 7x7 maps) and ImageNet's last stage (7x7).
2. The product's supernet weight step (``SearchLoop.weight_step``, small space, Fashion-MNIST, 1 thread) at batch 64
   and 128 with the layer's fast path on and off, alternating every ``--steps`` steps on the same sampled paths so a
   busy machine hits both alike. Speed-up = off seconds / on seconds.

Usage: ``python benchmarks/bench_depthwise.py [--rounds 4] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch import nn

from proxyless_ray.config import Experiment
from proxyless_ray.nn import depthwise
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.evaluate import to_device
from proxyless_ray.search.loop import SearchLoop

# (channels, map size, kernel size, stride): the depthwise layers where the fast path applies
SHAPES = [(240, 4, 7, 1), (240, 4, 5, 1), (120, 4, 7, 1), (96, 7, 7, 2), (144, 7, 7, 1), (960, 7, 7, 1)]


def seconds(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def weight_grad_row(c: int, size: int, k: int, s: int, repeats: int = 5) -> dict:
    p = k // 2
    x = torch.randn(64, c, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(nn.functional.conv2d(x, w, None, s, p, 1, c))

    def onednn():
        return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], c,
                                                   [False, True, False])[1]

    def bmm():
        return depthwise.depthwise_weight_grad(x, g, k, s, p)

    ref, mine = onednn(), bmm()
    t_ref, t_mine = seconds(onednn, repeats), seconds(bmm, repeats)
    return {"shape": [64, c, size, size], "kernel_size": k, "stride": s, "onednn_ms": 1000 * t_ref,
            "bmm_ms": 1000 * t_mine, "speedup": t_ref / t_mine,
            "max_rel_err": float((mine - ref).abs().max() / ref.abs().max())}


def weight_steps(rounds: int, steps: int) -> dict:
    exp = Experiment.from_dict({
        "name": "bench-depthwise", "out_dir": tempfile.mkdtemp(prefix="bench-dw-"),
        "data": {"batch_size": 128, "heldout_size": 512, "train_subset": 0},
        "train": {"epochs": 1, "warmup_epochs": 1, "max_steps_per_epoch": rounds * steps, "threads": 1},
        "latency": {"profile": "flops"}, "tracking": {"enabled": False},
    })
    loop = SearchLoop(exp, Comm(), lambda m, f: None, progress=False)
    x, y = loop.splits.train.get_batch(torch.arange(128), True)
    x = to_device(x, loop.device, loop.cl)
    fast = depthwise.DepthwiseConv2d.forward
    totals: dict[str, float] = {}
    try:
        for r in range(rounds + 1):  # round 0 warms both arms up and is not counted
            for arm, forward in (("off", nn.Conv2d.forward), ("on", fast)):
                depthwise.DepthwiseConv2d.forward = forward
                for b in (64, 128):
                    t0 = time.perf_counter()
                    for i in range(r * steps, (r + 1) * steps):  # the same paths in both arms
                        loop.weight_step(x[:b], y[:b], 0, i)
                    if r > 0:
                        key = f"{arm}_b{b}"
                        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
    finally:
        depthwise.DepthwiseConv2d.forward = fast
    out = {}
    for b in (64, 128):
        n = rounds * steps * b
        out[f"batch_{b}"] = {"off_images_per_s": n / totals[f"off_b{b}"], "on_images_per_s": n / totals[f"on_b{b}"],
                             "speedup": totals[f"off_b{b}"] / totals[f"on_b{b}"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [weight_grad_row(*shape) for shape in SHAPES]
    print(json.dumps({"benchmark": "depthwise", "threads": 1, "weight_grad": rows,
                      "weight_step": weight_steps(args.rounds, args.steps)}))


if __name__ == "__main__":
    main()
