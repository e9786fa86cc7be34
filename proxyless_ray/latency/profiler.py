"""Measure a hardware profile on the device it runs on: every candidate op of a space at every shape it occurs at.

Two contexts:

* ``network`` (default): a few *cover networks* of each space are built (network ``j`` takes candidate
  ``j mod n`` at every mixed layer, so together they hold every candidate at every position, plus stem and head)
  and every layer is timed inside the running network. Entries then include what a layer costs among its
  neighbours (cold weights, the previous layer's output in cache), so they add up to the network's latency.
* ``isolated``: each layer alone, run again and again on the same input (the classic per-layer table; a little
  optimistic because its weights and input stay in cache).

Layers come from :mod:`~proxyless_ray.nn.ops` (MBConvs inside :class:`~.nn.ops.ResidualBlock`, so the shortcut
add is priced as in the network), in eval mode under ``torch.inference_mode``, at the profile's batch size. On CPU
the thread count is pinned and wall-clock time is read between calls; on CUDA, events are recorded between calls
and the stream is synchronised before reading them. After a warm-up, the chosen statistic of the repeats (median
by default) is the entry's latency and a robust spread (IQR / 1.349) its spread.

With ``ray_resources`` the measuring runs inside a Ray actor that requests exactly those resources (for example
``{"hw_xyz": 1}``), so a cluster profiles its own node types; the actor is killed afterwards.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

from proxyless_ray.latency.fingerprint import machine_fingerprint
from proxyless_ray.latency.predictor import fit_linear
from proxyless_ray.latency.profile import Entry, Profile, space_layers, space_record
from proxyless_ray.latency.timing import Stamps, check_device, quantile_of, quantile_window, robust_stats
from proxyless_ray.nn.arch import layer_key, parse_block
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.nn.ops import Classifier, ResidualBlock, build_op
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.progress import Progress
from proxyless_ray.runtime import tune_allocator

# Threading settings that change CPU timings (e.g. OMP_WAIT_POLICY=PASSIVE stops spinning threads from burning a
# container's CPU quota, which otherwise stalls multi-threaded runs for a whole 100 ms quota period).
_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS",
               "OMP_PROC_BIND", "OMP_PLACES")


@dataclass(frozen=True)
class ProfilerSettings:
    """How each layer is timed (plain data: crosses the Ray boundary as a dict)."""

    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int = 1  # torch intra-op threads on CPU
    batch_size: int = 1
    warmup: int = 10  # untimed runs first (allocator, caches, cuDNN autotuning)
    repeats: int = 30  # timed runs at least
    min_time_s: float = 0.1  # keep timing fast layers until this much time is spent (more samples, less noise)
    max_repeats: int = 500
    rounds: int = 1  # passes over all layers, each timing a share of the repeats (evens out a drifting machine)
    context: str = "network"  # network: time layers inside cover networks of the space | isolated: each alone
    clock: str = "wall"  # wall | thread: CPU time of the timing thread (1 CPU thread only; ignores other processes)
    statistic: str = "median"  # median | min | pNN (a low quantile resists other processes on a shared machine)

    def __post_init__(self) -> None:
        check_device(self.device)
        quantile_of(self.statistic)
        if self.context not in ("network", "isolated"):
            raise ValueError(f"unknown profiling context {self.context!r}; expected 'network' or 'isolated'")
        if self.clock not in ("wall", "thread"):
            raise ValueError(f"unknown clock {self.clock!r}; expected 'wall' or 'thread'")
        if self.clock == "thread" and (self.device != "cpu" or self.threads != 1):
            raise ValueError(f"clock 'thread' counts the CPU time of one thread: it needs device 'cpu' and threads 1, "
                             f"got device {self.device!r} and threads {self.threads}")
        for name in ("threads", "batch_size", "repeats", "max_repeats", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"profiler {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.min_time_s < 0:
            raise ValueError(f"profiler warmup and min_time_s must be >= 0, got {self.warmup}, {self.min_time_s}")


def build_layer(block: str, in_chs: int, resolution: int, settings: ProfilerSettings) -> Callable[[], Any]:
    """A no-argument callable running one layer (eval mode) on a fixed random input on ``settings.device``."""
    import torch


    device = torch.device(settings.device)
    if block.startswith("fc_c"):
        module = Classifier(in_chs, int(block[4:]))
    elif parse_block(block).kind == "mb":
        module = ResidualBlock(block, in_chs)
    else:
        module = build_op(block, in_chs)
    module = module.to(device).eval()
    x = torch.randn(settings.batch_size, in_chs, resolution, resolution, device=device)
    return lambda: module(x)


def cover_archs(space: SearchSpace) -> list[Any]:
    """Networks that together place every candidate of every mixed layer: network ``j`` takes candidate
    ``j mod n`` at each layer (``n`` its candidate count), so ``max n`` networks cover the space."""
    slots = space.slots()
    n = max(len(s.candidates) for s in slots)
    return [space.arch_from_choices([j % len(s.candidates) for s in slots], name=f"cover_{j}") for j in range(n)]


class Bench:
    """What a profile measures, built lazily and timed in rounds of steps.

    A step is ``("net", space_index, j)`` (cover network ``j`` of a space, every layer timed in context) or
    ``("layer", block, in_chs, resolution)`` (one layer alone). Every round runs every step for a share of the
    repeats, so slow drifts of a shared machine hit all entries alike.

    Args:
        settings: Device, threads, repeats, statistic, context.
        spaces: Search spaces (plain dicts or :class:`SearchSpace`).
        extra_layers: ``(block, in_chs, resolution)`` triples to measure as well (always isolated).
        events: Event source for :class:`Stamps` (default: ``torch.cuda`` on a CUDA device, else the host clock).
    """

    def __init__(self, settings: ProfilerSettings, spaces: Sequence[Any] = (),
                 extra_layers: Sequence[tuple[str, int, int]] = (), events: Any = None):
        import torch

        self.settings = settings
        self.spaces = [s if isinstance(s, SearchSpace) else SearchSpace(**s) for s in spaces]
        share = -(-settings.repeats // settings.rounds)  # ceil
        self.round_settings = replace(settings, repeats=share, min_time_s=settings.min_time_s / settings.rounds,
                                      max_repeats=max(share, settings.max_repeats // settings.rounds))
        if settings.context == "network":
            self.steps: list[tuple] = [("net", i, j) for i, sp in enumerate(self.spaces)
                                       for j in range(len(cover_archs(sp)))]
            covered = {layer_key(*t) for t in space_layers(self.spaces)}
            isolated = [t for t in extra_layers if layer_key(*t) not in covered]
        else:
            isolated = list(dict.fromkeys([*space_layers(self.spaces), *extra_layers]))
            self.steps = []
        self.steps += [("layer", *t) for t in isolated]
        self.device = torch.device(settings.device)
        self.events = events if events is not None else (torch.cuda if self.device.type == "cuda" else None)
        self.built: dict[tuple, tuple[list[Callable[[Any], Any]], list[str], Any]] = {}
        self.runs: dict[tuple, list[list[float]]] = {}  # step -> per-run layer times (ms), in the step's key order

    def _build(self, step: tuple) -> tuple[list[Callable[[Any], Any]], list[str], Any]:
        import torch


        bsz = self.settings.batch_size
        if step[0] == "layer":
            _, block, in_chs, res = step
            fn = build_layer(block, in_chs, res, self.settings)
            return [lambda _x: fn()], [layer_key(block, in_chs, res)], None
        arch = cover_archs(self.spaces[step[1]])[step[2]]
        net = ProxylessNet(arch).to(self.device).eval()
        mods = [net.stem, *net.blocks] + ([net.feature_mix] if arch.feature_mix else []) + [net.classifier]
        keys = [layer.key for layer in arch.layers() if layer.block != "zero"]
        if len(mods) != len(keys):
            raise RuntimeError(f"cover network has {len(mods)} modules but {len(keys)} priced layers")
        return mods, keys, torch.randn(bsz, arch.in_chs, arch.resolution, arch.resolution, device=self.device)

    def run(self, step: tuple) -> str:
        """One round's share of timed runs of a step (the first round warms up fully); returns its last key."""
        import torch

        first = step not in self.built
        if first:
            self.built[step] = self._build(step)
        mods, keys, x = self.built[step]
        stamps = Stamps(self.events, self.settings.clock)

        def forward() -> list[float]:
            stamps.start()
            h = x
            for m in mods:
                h = m(h)
                stamps.mark()
            return stamps.durations_ms()

        st = self.round_settings
        with torch.inference_mode():
            for _ in range(self.settings.warmup if first else min(self.settings.warmup, 2)):
                forward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            runs = self.runs.setdefault(step, [])
            n, t_end = 0, time.perf_counter() + st.min_time_s
            while n < st.repeats or (time.perf_counter() < t_end and n < st.max_repeats):
                runs.append(forward())
                n += 1
        return keys[-1]

    def entries(self) -> dict[str, Entry]:
        """One entry per layer key. A network step's value for a layer is its mean time over the runs whose
        *network total* sits at the chosen statistic (:func:`quantile_window`), so that a cover network's entries
        add up to its latency; a key seen at several positions or networks averages them."""
        values: dict[str, list[float]] = {}
        samples: dict[str, list[float]] = {}
        for step, runs in self.runs.items():
            keys = self.built[step][1]
            order = sorted(range(len(runs)), key=lambda i: sum(runs[i]))
            chosen = order[quantile_window(len(runs), self.settings.statistic)]
            for j, key in enumerate(keys):
                values.setdefault(key, []).append(statistics.fmean(runs[i][j] for i in chosen))
                samples.setdefault(key, []).extend(r[j] for r in runs)
        return {key: Entry(statistics.fmean(values[key]), robust_stats(samples[key])[1], len(samples[key]))
                for key in values}


def device_info(settings: ProfilerSettings) -> dict[str, Any]:
    """Metadata describing where and how the measuring ran."""
    import torch

    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {settings.device!r} requested but torch.cuda.is_available() is False here")
        name, kind, version = torch.cuda.get_device_name(torch.device(settings.device)), "gpu", torch.version.cuda
        how = "torch eager, CUDA events around each call, stream synchronised"
    else:
        name, kind, version = _cpu_name(), "cpu", None
        clock = "CPU time of the timing thread (time.thread_time)" if settings.clock == "thread" else "perf_counter"
        how = f"torch eager, {clock} between calls"
    return {
        "device": kind, "device_name": name, "runtime": "pytorch-eager", "runtime_version": str(torch.__version__),
        "cuda_version": version, "batch_size": settings.batch_size, "threads": settings.threads, "dtype": "float32",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "method": "measured",
        "source": f"{how}; {settings.warmup} warm-up runs, >= {settings.repeats} timed runs and >= "
                  f"{settings.min_time_s} s per layer in {settings.rounds} round(s) over all layers; "
                  f"ms = {settings.statistic} of the timed runs, "
                  "spread = IQR / 1.349",
        "statistic": settings.statistic, "clock": settings.clock,
        "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "allocator": "glibc, mmap threshold 32 MiB (proxyless_ray.runtime.tune_allocator)" if _tuned() else "default",
        "settings": asdict(settings),
        "fingerprint": machine_fingerprint(settings.device, settings.threads),
    }


def _tuned() -> bool:

    return tune_allocator()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def run_bench(bench: Bench, progress: Callable[[int, str], None] | None = None) -> dict[str, Entry]:
    """Run every step of ``bench`` in ``rounds`` passes with the thread count pinned (restored after)."""
    import torch


    tune_allocator()  # the allocator the search and the exported networks run with
    old = torch.get_num_threads()
    torch.set_num_threads(bench.settings.threads)
    try:
        order, shuffle = list(bench.steps), random.Random(0)
        for _ in range(bench.settings.rounds):
            for step in order:
                key = bench.run(step)
                if progress:
                    progress(1, key)
            shuffle.shuffle(order)  # periodic load from other jobs should not hit the same steps every round
        return bench.entries()
    finally:
        torch.set_num_threads(old)


def measure_layers(layers: Sequence[tuple[str, int, int]], settings: ProfilerSettings,
                   progress: Callable[[int, str], None] | None = None) -> dict[str, Entry]:
    """Measure ``(block, in_chs, resolution)`` triples, each alone, in this process."""
    return run_bench(Bench(replace(settings, context="isolated"), extra_layers=layers), progress)


def profile_spaces(spaces: Iterable[SearchSpace], settings: ProfilerSettings, name: str,
                   ray_resources: dict[str, float] | None = None, ray_address: str | None = None,
                   ray_num_cpus: float | None = None, progress: bool = True, stream: TextIO | None = None,
                   extra_layers: Sequence[tuple[str, int, int]] = ()) -> Profile:
    """Measure every layer shape of ``spaces`` (plus ``extra_layers``) and fit the profile's predictor.

    Args:
        spaces: Search spaces whose candidates, stem and head are measured.
        settings: Device, threads, batch size and repeat counts.
        name: Profile name.
        ray_resources: When given, measure inside a Ray actor requesting exactly these custom resources.
        ray_address: Ray cluster to join (``None``: an existing connection, ``RAY_ADDRESS``, or a local start).
        ray_num_cpus: CPUs the actor reserves (default: ``settings.threads``, so nothing shares its cores).
        progress: Show a progress bar on ``stream`` (stderr).

    Returns:
        The measured :class:`Profile` (not yet saved).
    """
    spaces = list(spaces)
    bench = Bench(settings, spaces, extra_layers)
    bar = Progress(len(bench.steps) * settings.rounds, f"profiling {name}", stream, enabled=progress)
    if ray_resources is not None:
        entries, info = measure_on_ray(spaces, extra_layers, settings, ray_resources, ray_address, ray_num_cpus,
                                       lambda n, key: bar.update(n, layer=key))
    else:
        info = device_info(settings)
        entries = run_bench(bench, lambda n, key: bar.update(n, layer=key))
    bar.close()
    info["context"] = settings.context
    info["spaces"] = [space_record(s) for s in spaces]
    predictor = fit_linear({k: e.ms for k, e in entries.items()})
    return Profile(name, info, entries, predictor)


# -- Ray: measure on the node that has the hardware ------------------------------------------------------------------


class _ProfilerActor:
    """Runs on the node Ray places it on; measures there and says where it ran."""

    def __init__(self, settings: dict[str, Any], spaces: list[dict[str, Any]], extra_layers: list[tuple]):
        import torch

        self.settings = ProfilerSettings(**settings)
        torch.set_num_threads(self.settings.threads)
        self.bench = Bench(self.settings, spaces, [tuple(t) for t in extra_layers])

    def info(self) -> dict[str, Any]:
        import ray

        info = device_info(self.settings)
        info["ray_node_id"] = ray.get_runtime_context().get_node_id()
        return info

    def steps(self) -> list[tuple]:
        return self.bench.steps

    def run(self, steps: list[tuple]) -> str:
        return [self.bench.run(tuple(step)) for step in steps][-1]

    def entries(self) -> dict[str, tuple[float, float, int]]:
        return {k: (e.ms, e.spread, e.count) for k, e in self.bench.entries().items()}


def measure_on_ray(spaces: Sequence[SearchSpace], extra_layers: Sequence[tuple[str, int, int]],
                   settings: ProfilerSettings, resources: dict[str, float], address: str | None = None,
                   num_cpus: float | None = None, progress: Callable[[int, str], None] | None = None,
                   ) -> tuple[dict[str, Entry], dict[str, Any]]:
    """Measure in a Ray actor that requests exactly ``resources`` (plus ``num_cpus`` CPUs).

    Connects to ``address`` (or ``RAY_ADDRESS``, or starts a local instance) unless Ray is already initialised,
    and kills the actor afterwards, so its custom resources are free for training.

    Raises:
        ValueError: when no node of the cluster offers a requested resource (naming it and what the cluster has).
    """
    import ray

    if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in resources.values()):
        raise ValueError(f"Ray resources must be a mapping of name -> positive amount, got {resources!r}")
    started = False
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        started = True
    actor = None
    try:
        have = ray.cluster_resources()
        for res, amount in resources.items():
            if have.get(res, 0) < amount:
                raise ValueError(f"no node of the Ray cluster offers resource {res!r} x {amount} (cluster resources: "
                                 f"{ {k: v for k, v in sorted(have.items()) if not k.startswith('node:')} })")
        cpus = float(settings.threads if num_cpus is None else num_cpus)
        actor = ray.remote(_ProfilerActor).options(num_cpus=cpus, resources=dict(resources)).remote(
            asdict(settings), [s.to_dict() for s in spaces], [list(t) for t in extra_layers])
        info = ray.get(actor.info.remote())
        info["ray_resources"] = dict(resources)
        steps, shuffle = ray.get(actor.steps.remote()), random.Random(0)
        for _ in range(settings.rounds):
            shuffle.shuffle(steps)
            for step in steps:  # one call per step: progress on the driver, little overhead next to the timing
                key = ray.get(actor.run.remote([step]))
                if progress:
                    progress(1, key)
        entries = {k: Entry(*v) for k, v in ray.get(actor.entries.remote()).items()}
        return entries, info
    finally:
        if actor is not None:
            ray.kill(actor)
        if started:
            ray.shutdown()
