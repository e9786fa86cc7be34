"""Supernet training methods at the same compute budget: learning curves of sampled sub-networks, step time, memory.

Every method trains the demo's supernet (small space, Fashion-MNIST) from the same initialisation for the same number
of forward-backward passes (``sandwich`` runs four passes a step, so it gets a quarter of the steps). After each
epoch the held-out accuracy of ``--samples`` uniformly sampled sub-networks, as many of any depth (``uniform_depth``'s
draws), of the largest and of the smallest is read with inherited weights and re-estimated BatchNorm statistics (what
the architecture steps will see).

    python benchmarks/bench_supernet_training.py [--passes 600] [--epochs 3] [--methods nested:uniform,...]

Prints one JSON object: per method the curve, the final mean/min/max over sampled sub-networks, the spread between
sub-networks (what ranking needs), seconds per pass, parameters, and the activation bytes one step keeps for
backward (saved tensors), which is what path binarization bounds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from proxyless_ray.config import load_experiment
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.evaluate import accuracy
from proxyless_ray.search.loop import READY_EVAL_IMAGES, SearchLoop
from proxyless_ray.search.path_sampling import largest_choices, smallest_choices, warmup_paths

METHODS = ("separate:uniform", "nested:uniform", "nested:uniform_depth", "nested:fair", "nested:sandwich",
           "nested:largest_first")


def saved_bytes_of_step(loop: SearchLoop, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one path's forward (the step's activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    paths = warmup_paths(loop.exp.train.warmup_method, loop.state.net.slots, 0, 0, 0, 1.0)
    loop.state.net.set_active(list(paths.paths[0]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(loop.state.net(x), y)
    loss.backward()
    loop.state.w_opt.zero_grad(set_to_none=True)
    return total


def read_subnets(loop: SearchLoop, epoch: int, samples: int) -> dict[str, float]:
    data = loop.exp.data
    max_batches = max(1, READY_EVAL_IMAGES // data.eval_batch_size)

    def acc(choices: list[int]) -> float:
        return accuracy(loop._inherited_child(choices), loop.splits.heldout, loop.comm, data.eval_batch_size,
                        max_batches=max_batches, channels_last=loop.cl)[0]

    from proxyless_ray.search.path_sampling import uniform_choices, uniform_depth_choices

    gen = torch.Generator().manual_seed(1234 + epoch)
    accs = [acc(uniform_choices(loop.state.net.slots, gen)) for _ in range(samples)]
    # sub-networks of every depth alike (a share of the removable layers zero, drawn uniformly): the shallow ones the
    # latency loss steers the search to, which uniform candidate draws seldom read
    depth_accs = [acc(uniform_depth_choices(loop.state.net.slots, gen)) for _ in range(samples)]
    slots = loop.state.net.slots
    return {"mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
            "any_depth_mean": sum(depth_accs) / len(depth_accs), "any_depth_min": min(depth_accs),
            "largest": acc(largest_choices(slots)), "smallest": acc(smallest_choices(slots))}


def run_method(spec: str, args: argparse.Namespace) -> dict:
    sharing, method = spec.split(":")
    passes_per_step = 4 if method == "sandwich" else 1
    steps_per_epoch = max(1, args.passes // (args.epochs * passes_per_step))
    overrides = [f"train.weight_sharing={sharing}", f"train.warmup_method={method}", f"train.epochs={args.epochs}",
                 f"train.warmup_epochs={args.epochs}", f"train.max_steps_per_epoch={steps_per_epoch}",
                 f"train.threads={args.threads}", "train.ready_samples=0", "train.ready_acc=0",
                 f"data.train_subset={args.train_subset}", "data.warmup_subset=0", f"train.warmup_lr={args.lr}"]
    exp = load_experiment(args.experiment, overrides)
    loop = SearchLoop(exp, Comm(), lambda m, c: None, progress=False)
    x, y = loop.splits.train.get_batch(torch.arange(exp.data.batch_size), True)
    saved = saved_bytes_of_step(loop, x.to(memory_format=torch.channels_last), y)
    curve, train_s = [], 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        m = loop.run(until_epoch=epoch + 1)
        train_s += time.perf_counter() - t0 - 0.0
        point = read_subnets(loop, epoch, args.samples)
        point.update({"epoch": epoch + 1, "passes": (epoch + 1) * steps_per_epoch * passes_per_step,
                      "train_loss": m["train_loss"]})
        curve.append(point)
        print(f"[bench] {spec} epoch {epoch + 1}: {json.dumps(point)}", flush=True)
    weight_s = sum(h["weight_step_s"] for h in loop.state.history)
    return {"curve": curve, "final": curve[-1], "seconds_per_pass": weight_s / (args.epochs * steps_per_epoch *
                                                                               passes_per_step),
            "steps": args.epochs * steps_per_epoch, "parameters": sum(p.numel() for p in
                                                                      loop.state.net.weight_parameters()),
            "saved_activation_bytes_per_path": saved}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/demo.yaml")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--passes", type=int, default=600, help="forward-backward passes per method")
    p.add_argument("--epochs", type=int, default=3, help="curve points")
    p.add_argument("--samples", type=int, default=6, help="random sub-networks read per point")
    p.add_argument("--train-subset", type=int, default=40000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="", help="also draw the curves into this PNG")
    args = p.parse_args()
    out = {"passes": args.passes, "experiment": args.experiment, "torch": torch.__version__, "methods": {}}
    for spec in args.methods.split(","):
        out["methods"][spec] = run_method(spec, args)
    if args.plot:
        draw(out, args.plot)
    print(json.dumps(out, indent=1))


def draw(out: dict, path: str) -> None:
    """Mean held-out accuracy of sampled sub-networks (band: min-max) against forward-backward passes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, res in out["methods"].items():
        xs = [0] + [pt["passes"] for pt in res["curve"]]
        line = ax.plot(xs, [0.1] + [pt["mean"] for pt in res["curve"]], marker="o", label=spec)[0]
        ax.fill_between(xs[1:], [pt["min"] for pt in res["curve"]], [pt["max"] for pt in res["curve"]],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("forward-backward passes (batch 64)")
    ax.set_ylabel("held-out accuracy of sampled sub-networks")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
