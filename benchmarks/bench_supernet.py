"""Benchmark: what does path binarization save? Supernet step time and memory against the standalone child network.

ProxylessNAS (https://arxiv.org/abs/1812.00332, Sec. 3.1-3.2) claims that binarized paths make a supernet step cost
about what the chosen sub-network costs, while a DARTS-style supernet that runs every path pays N times the memory.
For each space (the paper's ImageNet space at 224 px batch 8, the ``small`` preset at 28 px batch 32), with
``torch.set_num_threads(2)`` and channels_last activations and weights (the search loop's default), ONE architecture
is sampled with a fixed seed (the active paths of a ``two``-mode gate sample; its zero layers are reported, not
avoided) and four steps run on one fixed random batch:

* ``a`` binarized weight step: the supernet with single-path gates fixed to that architecture; forward,
  label-smoothed CE, backward, Nesterov SGD on ``weight_parameters()`` (the optimizers of ``new_state``);
* ``b`` ``two`` arch step: ``sample_for_arch(TWO)`` (a fixed seed, with alpha reset untimed before each step, so
  the same pair is drawn every time and its active path is the architecture above), forward with
  ``weights_frozen()``, CE + ``add`` latency term on E[lat] (FLOPs latency model), backward,
  ``set_alpha_grads``, Adam on alpha, ``rescale_pairs``: the search loop's ``_arch_step``;
* ``c`` all paths: ``Forward.ALL`` (softmax(alpha)-weighted sum of every candidate, DARTS-style), forward,
  backward, SGD on every parameter;
* ``d`` child: ``ProxylessNet`` of the same architecture (zero layers dropped, supernet weights inherited) with the
  same loss and optimizer settings as ``a``: equal work, no supernet machinery.

Time: warm-up rounds, then timed rounds that run every variant once, round-robin in a rotating order, so load from
other processes on the shared machine hits all variants alike; medians in ms (wall clock, and process CPU time as a
second reading; also the lower quartile), ratios of medians, which the targets use, and medians of per-round ratios
(``targets_paired``), which a job that slows a few rounds down barely moves. ``a`` and ``d`` are also timed with
contiguous (NCHW) tensors where cheap (the small space by default; ``--nchw imagenet,small`` for both).

Memory, two measures:

1. bytes saved for backward during one forward + loss, via ``torch.autograd.graph.saved_tensors_hooks``, summing
   unique storages (deduplicated by storage ``data_ptr``); ``activations`` excludes the model's parameters and
   buffers (weights saved by convs), ``all`` includes them;
2. peak RSS of a fresh subprocess per variant (this script re-invoked with ``--child``): the RSS after building the
   model, optimizers and input (no step yet), the peak over a few steps after it, and their difference. The peak is
   ``VmHWM`` reset through ``/proc/self/clear_refs`` once the model exists, because ``ru_maxrss`` inherits the
   forking parent's high-water mark (it is reported too).

Targets: time a/d <= 1.15, activations a/d <= 1.25, activations c/a >= 3, time b/a <= 1.4. Measured here (2 shared
cores, load ~1.2, 162 s): ImageNet a/d 1.00, b/a 0.80, c/a 7.5 (time); activations a/d 1.00, c/a 6.5 (570 MiB vs
3718 MiB); small a/d 1.05, b/a 0.84, activations c/a 8.7. While other jobs load both cores, 2-thread steps stall at
every parallel region and medians swing by 10x: compare the paired ratios and ``load_1min_per_round``.

Usage: ``python benchmarks/bench_supernet.py [--spaces imagenet,small] [--repeats N] [--quick] [--no-rss]``
(about 5 minutes on 2 idle cores; several times longer while other jobs load the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from proxyless_ray.config import Experiment, LatencyConfig, TrainConfig
from proxyless_ray.latency.expected import SupernetLatency
from proxyless_ray.latency.model import FlopsLatencyModel
from proxyless_ray.nn.mixed_op import Forward, GateMode
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.nn.space import SearchSpace, space_from_preset
from proxyless_ray.nn.supernet import SuperNet
from proxyless_ray.search.objective import latency_objective
from proxyless_ray.search.state import new_state

VARIANTS = ("a", "b", "c", "d")
SPACES: dict[str, tuple[str, int]] = {"imagenet": ("proxyless_imagenet", 8), "small": ("small", 32)}  # preset, batch
TARGETS = {"time_a_over_d": ("<=", 1.15), "act_a_over_d": ("<=", 1.25), "act_c_over_a": (">=", 3.0),
           "time_b_over_a": ("<=", 1.4)}
DEFAULT_REPEATS = {"imagenet": 8, "small": 24}  # ~5 minutes in all on 2 idle cores
SEED = 0
THREADS = 2


@dataclass
class Case:
    """Models, optimizers and the fixed batch of one space in one memory format."""

    space: SearchSpace
    choices: list[int]
    channels_last: bool
    x: torch.Tensor
    y: torch.Tensor
    train: TrainConfig
    net: SuperNet | None = None
    child: ProxylessNet | None = None
    opts: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    lat: SupernetLatency | None = None
    ref_ms: float = 1.0
    alpha0: list[torch.Tensor] = field(default_factory=list)


def sample_choices(space: SearchSpace, seed: int = SEED) -> list[int]:
    """The benchmark's architecture: the active paths of a ``two`` gate sample of a freshly seeded supernet."""
    net = new_state(Experiment(space=space, train=TrainConfig(seed=seed))).net
    return net.sample_for_arch(GateMode.TWO, torch.Generator().manual_seed(seed))


def _sgd(params: list[nn.Parameter], t: TrainConfig) -> torch.optim.SGD:
    """The search loop's weight optimizer: no weight decay on BN and biases."""
    return torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": t.weight_decay},
                            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                           lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)


def build_case(space: SearchSpace, batch: int, choices: list[int], channels_last: bool,
               variants: tuple[str, ...] = VARIANTS, seed: int = SEED) -> Case:
    """Build what ``variants`` need: the supernet (a, b, c) with the search loop's optimizers, the child (d).

    Args:
        space: The search space.
        batch: Batch size of the fixed random batch.
        choices: The architecture (a candidate index per mixed layer).
        channels_last: NHWC weights and input, as the search loop's default.
        variants: Subset of ``a``-``d``.
        seed: Weights and batch seed; also the gate-sampling seed of ``b`` (must be the seed of ``choices``).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = TrainConfig(seed=seed)
    torch.manual_seed(seed)
    x = torch.randn(batch, space.in_chs, space.resolution, space.resolution).to(memory_format=fmt)
    y = torch.randint(0, space.num_classes, (batch,))
    case = Case(space, list(choices), channels_last, x, y, t)
    needs_net = any(v in variants for v in "abc")
    if needs_net:
        st = new_state(Experiment(space=space, train=t))
        case.net = st.net.to(memory_format=fmt)
        case.opts["a"], case.opts["b"] = st.w_opt, st.a_opt
        if "c" in variants:
            case.opts["c"] = _sgd(list(case.net.parameters()), t)
        case.lat = SupernetLatency(FlopsLatencyModel(), space)
        with torch.no_grad():
            case.ref_ms = float(case.lat.expected(case.net.arch_parameters()))
        case.alpha0 = [a.detach().clone() for a in case.net.arch_parameters()]
    if "d" in variants:
        child = ProxylessNet(space.arch_from_choices(case.choices).without_zeros())
        if case.net is not None:
            child.load_state_dict(case.net.derived_state_dict(case.choices))  # inherited: the very same numbers as a
        # The format is set here, not guessed from the supernet's weights as evaluate.derived_network does: with a
        # 1-channel stem every 4-D weight it looks at is both NCHW- and NHWC-contiguous.
        case.child = child.to(memory_format=fmt)
        case.opts["d"] = _sgd(list(case.child.parameters()), t)
    return case


# -- the four steps ------------------------------------------------------------------------------------------------


def _forward_loss(case: Case, variant: str) -> torch.Tensor:
    """Forward + loss of one variant, with its gates already set (see :func:`prepare`)."""
    t = case.train
    if variant == "d":
        return nn.functional.cross_entropy(case.child(case.x), case.y, label_smoothing=t.label_smoothing)
    net = case.net
    if variant == "b":
        ce = nn.functional.cross_entropy(net(case.x), case.y)
        lat_cfg = LatencyConfig()
        exp_lat = case.lat.expected(net.arch_parameters())
        return latency_objective(lat_cfg.loss, ce, exp_lat, lam=lat_cfg.lam, ref_ms=case.ref_ms)
    return nn.functional.cross_entropy(net(case.x), case.y, label_smoothing=t.label_smoothing)


def prepare(case: Case, variant: str) -> None:
    """Untimed set-up before a step: gates of a / c; for b, alpha reset so the fixed seed draws the same pair."""
    net = case.net
    if variant == "a":
        net.set_active(case.choices)
    elif variant == "c":
        net.set_forward(Forward.ALL)
    elif variant == "b":
        with torch.no_grad():
            for a, a0 in zip(net.arch_parameters(), case.alpha0):
                a.copy_(a0)


def step(case: Case, variant: str, seed: int = SEED) -> float:
    """One full step of ``variant`` (call :func:`prepare` first); returns the loss."""
    opt = case.opts[variant]
    opt.zero_grad(set_to_none=True)
    if variant != "b":
        loss = _forward_loss(case, variant)
        loss.backward()
        opt.step()
        return loss.item()
    net = case.net
    active = net.sample_for_arch(GateMode.TWO, torch.Generator().manual_seed(seed))
    with net.weights_frozen():
        loss = _forward_loss(case, "b")
        loss.backward()
    net.set_alpha_grads(GateMode.TWO)
    opt.step()
    net.rescale_pairs()
    if active != case.choices:
        raise RuntimeError("the arch step drew another pair than the benchmark's architecture (alpha not reset?)")
    return loss.item()


# -- measurements --------------------------------------------------------------------------------------------------


def saved_bytes(case: Case, variant: str) -> dict[str, int]:
    """Bytes of unique storages autograd saves for backward during one forward + loss of ``variant``.

    Returns:
        ``{"activations": ..., "all": ...}``: without / with the model's own parameters and buffers.
    """
    prepare(case, variant)
    model: nn.Module = case.child if variant == "d" else case.net
    own = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    if variant == "b":
        case.net.sample_for_arch(GateMode.TWO, torch.Generator().manual_seed(SEED))
    frozen = case.net.weights_frozen() if variant == "b" else nullcontext()
    with frozen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _forward_loss(case, variant)
    del loss  # frees the graph and its saved tensors
    return {"activations": sum(n for p, n in seen.items() if p not in own), "all": sum(seen.values())}


def time_steps(cases: dict[str, tuple[Case, str]], repeats: int, warmup: int,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time each ``name -> (case, variant)`` step ``repeats`` times, round-robin in a rotating order.

    Returns:
        ``{"wall": {name: [ms, ...]}, "cpu": {name: [ms, ...]}, "load": [...]}``: ``cpu`` is process CPU time (all
        threads), ``load`` the 1-minute load average after each timed round (other jobs on the machine).
    """
    names = list(cases)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load: list[float] = []
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate: no variant always runs right after the heavy all-paths step
            case, variant = cases[name]
            prepare(case, variant)
            c0, t0 = time.process_time(), time.perf_counter()
            step(case, variant)
            dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
            if r >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
        if r >= warmup:
            load.append(round(os.getloadavg()[0], 2))
        log(f"  round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    return {"wall": wall, "cpu": cpu, "load": load}


def child_rss(space_key: str, variant: str, choices: list[int], steps: int) -> dict[str, float]:
    """Run in a fresh process: build what ``variant`` needs, then ``steps`` steps; RSS figures in MiB.

    ``ru_maxrss`` keeps the high-water mark of the parent that forked this process (Linux preserves it across
    ``execve``), so the peak is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``) once the model,
    optimizers and input exist; ``ru_maxrss`` is reported as well.
    """
    torch.set_num_threads(THREADS)
    preset, batch = SPACES[space_key]
    case = build_case(space_from_preset(preset), batch, choices, channels_last=True, variants=(variant,))
    built = _proc_status_mib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        prepare(case, variant)
        step(case, variant)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB
    peak = _proc_status_mib()["VmHWM"] if reset else maxrss
    return {"built_mib": round(built["VmRSS"], 1), "peak_mib": round(peak, 1),
            "delta_mib": round(peak - built["VmRSS"], 1), "hwm_reset": reset, "ru_maxrss_mib": round(maxrss, 1)}


def _proc_status_mib() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def rss_in_subprocess(space_key: str, variant: str, choices: list[int], steps: int) -> dict[str, float]:
    """Peak RSS of ``variant`` measured by this script in a fresh interpreter (see :func:`child_rss`)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", space_key, variant,
           "--choices", ",".join(map(str, choices)), "--rss-steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"RSS subprocess {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report --------------------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def _paired(samples: dict[str, list[float]], num: str, den: str) -> float:
    return round(statistics.median(x / y for x, y in zip(samples[num], samples[den])), 4)


def bench_space(space: SearchSpace, batch: int, repeats: int, warmup: int, nchw: bool = True,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time and saved-bytes figures of one space (RSS is added by :func:`main`: it needs fresh processes).

    Args:
        space: The search space.
        batch: Batch size.
        repeats: Timed round-robin rounds.
        warmup: Untimed rounds before them.
        nchw: Also time ``a`` and ``d`` with contiguous (NCHW) tensors.
        log: Progress lines (stderr in :func:`main`).
    """
    choices = sample_choices(space)
    cl = build_case(space, batch, choices, channels_last=True)
    zero = [i for i, (c, m) in enumerate(zip(choices, cl.net.mixed_ops())) if c == m.zero_index]
    cl.net.sample_for_arch(GateMode.TWO, torch.Generator().manual_seed(SEED))  # b's pairs: which run a second path
    second = sum(1 for m in cl.net.mixed_ops() if not m.active_is_zero and m.pair[1] not in (m.pair[0], m.zero_index))
    mem = {v: saved_bytes(cl, v) for v in VARIANTS}
    cases: dict[str, tuple[Case, str]] = {v: (cl, v) for v in VARIANTS}
    if nchw:
        contiguous = build_case(space, batch, choices, channels_last=False, variants=("a", "d"))
        cases |= {"a_nchw": (contiguous, "a"), "d_nchw": (contiguous, "d")}
    log(f"{space.preset}: timing {list(cases)}, {warmup} + {repeats} rounds")
    samples = time_steps(cases, repeats, warmup, log)
    wall = {n: round(statistics.median(s), 3) for n, s in samples["wall"].items()}
    cpu = {n: round(statistics.median(s), 3) for n, s in samples["cpu"].items()}
    p25 = {n: round(statistics.quantiles(s, n=4)[0] if len(s) > 1 else s[0], 3) for n, s in samples["wall"].items()}
    act = {v: mem[v]["activations"] for v in VARIANTS}
    ratios = {
        "time_a_over_d": _ratio(wall["a"], wall["d"]),
        "time_b_over_a": _ratio(wall["b"], wall["a"]),
        "time_c_over_a": _ratio(wall["c"], wall["a"]),
        "act_a_over_d": _ratio(act["a"], act["d"]),
        "act_c_over_a": _ratio(act["c"], act["a"]),
        "act_b_over_a": _ratio(act["b"], act["a"]),
    }
    pairs = [("a", "d"), ("b", "a"), ("c", "a")] + ([("a_nchw", "d_nchw"), ("a_nchw", "a")] if nchw else [])
    if nchw:
        ratios["time_a_over_d_nchw"] = _ratio(wall["a_nchw"], wall["d_nchw"])
        ratios["time_a_nchw_over_a"] = _ratio(wall["a_nchw"], wall["a"])
    paired = {f"time_{n}_over_{d}": _paired(samples["wall"], n, d) for n, d in pairs}
    cpu_ratios = {f"cpu_{n}_over_{d}": _ratio(cpu[n], cpu[d]) for n, d in pairs}
    return {
        "preset": space.preset, "resolution": space.resolution, "batch": batch, "in_chs": space.in_chs,
        "num_classes": space.num_classes, "mixed_layers": len(choices), "zero_layers": len(zero),
        "zero_layer_indices": zero, "b_second_path_layers": second, "choices": choices,
        "arch": cl.net.derive(choices).arch_string(),
        "params_supernet_m": round(sum(p.numel() for p in cl.net.parameters()) / 1e6, 3),
        "params_child_m": round(sum(p.numel() for p in cl.child.parameters()) / 1e6, 3),
        "timed_rounds": repeats, "warmup_rounds": warmup, "load_1min_per_round": samples["load"],
        "time_ms": wall, "time_p25_ms": p25, "cpu_ms": cpu, "ratios": ratios, "paired_ratio_medians": paired,
        "cpu_ratios": cpu_ratios, "saved_bytes": mem, "saved_mib": {v: round(n / 2**20, 1) for v, n in act.items()},
        "targets": {k: _meets(ratios[k], op, v) for k, (op, v) in TARGETS.items()},
        # the same time targets on per-round ratios: robust to another job slowing a few rounds down
        "targets_paired": {k: _meets(paired[k], *TARGETS[k]) for k in ("time_a_over_d", "time_b_over_a")},
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _meets(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", default="imagenet,small", help="comma list of imagenet, small")
    parser.add_argument("--repeats", type=int, default=0,
                        help=f"timed rounds per space (default {DEFAULT_REPEATS}; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per space (1 with --quick)")
    parser.add_argument("--nchw", default="small", help="spaces whose a and d are also timed NCHW (comma list)")
    parser.add_argument("--rss-steps", type=int, default=2, help="steps per RSS subprocess")
    parser.add_argument("--quick", action="store_true", help="few rounds, no NCHW timing, one RSS step")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-variant RSS subprocesses")
    parser.add_argument("--child", nargs=2, metavar=("SPACE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--choices", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        space_key, variant = args.child
        choices = [int(c) for c in args.choices.split(",")]
        print(json.dumps(child_rss(space_key, variant, choices, args.rss_steps)))
        return
    torch.set_num_threads(THREADS)
    keys = _keys(args.spaces, "--spaces")
    nchw = set() if args.quick else set(_keys(args.nchw, "--nchw"))
    warmup = 1 if args.quick else args.warmup
    rss_steps = 1 if args.quick else args.rss_steps
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "bench_supernet", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "channels_last": True, "seed": SEED,
        "timing": "medians over round-robin rounds (rotating order); time_ms wall clock, cpu_ms process CPU time",
        "memory": "saved_bytes: unique storages saved for backward in one forward + loss (activations: without the "
                  "model's parameters/buffers); rss_mib: fresh process per variant, peak = VmHWM over the steps",
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "load_avg_before": [round(v, 2) for v in os.getloadavg()], "spaces": {},
    }
    for k in keys:
        preset, batch = SPACES[k]
        repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS[k])
        res = bench_space(space_from_preset(preset), batch, repeats, warmup, nchw=k in nchw, log=_log)
        if not args.no_rss:
            _log(f"{preset}: RSS subprocesses")
            res["rss_mib"] = {v: rss_in_subprocess(k, v, res["choices"], rss_steps) for v in VARIANTS}
            d = {v: res["rss_mib"][v]["delta_mib"] for v in VARIANTS}
            res["ratios"]["rss_delta_a_over_d"] = _ratio(d["a"], d["d"])
            res["ratios"]["rss_delta_c_over_a"] = _ratio(d["c"], d["a"])
        result["spaces"][k] = res
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))


def _keys(text: str, flag: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    for k in keys:
        if k not in SPACES:
            raise ValueError(f"unknown space {k!r} in {flag}; expected some of {sorted(SPACES)}")
    return keys


if __name__ == "__main__":
    main()
