"""Measure a hardware profile on the device it runs on: every candidate op of a space at every shape it occurs at.

Each layer is built by :func:`proxyless_ray.ops.build_op` (MBConvs inside :class:`~proxyless_ray.ops.ResidualBlock`,
so the shortcut add is priced as in the network), put in eval mode and run under ``torch.inference_mode`` on a
random input of the profile's batch size. On CPU the thread count is pinned and wall-clock time is read around each
call; on CUDA, events bracket each call and the stream is synchronised before reading them. After a warm-up, the
median of the repeats is the entry's latency and a robust spread (IQR / 1.349) its spread.

With ``ray_resources`` the measuring runs inside a Ray actor that requests exactly those resources (for example
``{"hw_xyz": 1}``), so a cluster profiles its own node types; the actor is killed afterwards.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from proxyless_ray.arch import layer_key
from proxyless_ray.latency.predictor import fit_linear
from proxyless_ray.latency.profile import Entry, Profile, space_layers, space_record
from proxyless_ray.space import SearchSpace

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
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
    statistic: str = "median"  # median | min | pNN (a low quantile resists other processes on a shared machine)

    def __post_init__(self) -> None:
        check_device(self.device)
        quantile_of(self.statistic)
        for name in ("threads", "batch_size", "repeats", "max_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"profiler {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.min_time_s < 0:
            raise ValueError(f"profiler warmup and min_time_s must be >= 0, got {self.warmup}, {self.min_time_s}")


def check_device(device: str) -> str:
    """Validate a device string; raises ValueError naming it unless it is ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def quantile_of(statistic: str) -> float:
    """``median`` -> 0.5, ``min`` -> 0, ``p10`` -> 0.1; raises ValueError naming anything else."""
    if statistic == "median":
        return 0.5
    if statistic == "min":
        return 0.0
    m = re.match(r"^p(\d{1,2})$", str(statistic))
    if not m:
        raise ValueError(f"unknown timing statistic {statistic!r}; expected 'median', 'min' or 'pNN' (e.g. 'p10')")
    return int(m.group(1)) / 100


def robust_stats(samples: Sequence[float], statistic: str = "median") -> tuple[float, float]:
    """The chosen statistic (default median) and a robust spread (IQR / 1.349, the std for normal noise)."""
    if not samples:
        raise ValueError("no timing samples")
    xs = sorted(samples)
    pos = quantile_of(statistic) * (len(xs) - 1)
    lo = int(pos)
    value = xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)
    if len(xs) < 4:
        return value, (xs[-1] - xs[0]) / 2
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return value, (q[2] - q[0]) / 1.349


def cpu_timer(fn: Callable[[], Any]) -> float:
    """One call of ``fn``, wall-clock ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def make_cuda_timer(cuda: Any) -> Callable[[Callable[[], Any]], float]:
    """A timer bracketing each call with CUDA events; ``cuda`` is ``torch.cuda`` (injectable for tests).

    Kernel launches are asynchronous, so host-side clocks would time the launch only: the end event is
    recorded on the stream and synchronised before ``elapsed_time`` is read.
    """

    def timer(fn: Callable[[], Any]) -> float:
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return timer


def time_fn(fn: Callable[[], Any], timer: Callable[[Callable[[], Any]], float], settings: ProfilerSettings,
            sync: Callable[[], None] = lambda: None) -> list[float]:
    """Warm up, then time ``fn`` at least ``repeats`` times and until ``min_time_s`` has passed (ms per call)."""
    for _ in range(settings.warmup):
        fn()
    sync()
    samples: list[float] = []
    t_end = time.perf_counter() + settings.min_time_s
    while len(samples) < settings.repeats or (time.perf_counter() < t_end and len(samples) < settings.max_repeats):
        samples.append(timer(fn))
    return samples


def measure_layer(block: str, in_chs: int, resolution: int, settings: ProfilerSettings) -> Entry:
    """Latency of one layer at ``settings.batch_size`` on ``settings.device``."""
    import torch

    from proxyless_ray.arch import parse_block
    from proxyless_ray.ops import Classifier, ResidualBlock, build_op

    device = torch.device(settings.device)
    if block.startswith("fc_c"):
        module = Classifier(in_chs, int(block[4:]))
    elif parse_block(block).kind == "mb":
        module = ResidualBlock(block, in_chs)
    else:
        module = build_op(block, in_chs)
    module = module.to(device).eval()
    x = torch.randn(settings.batch_size, in_chs, resolution, resolution, device=device)
    if device.type == "cuda":
        timer, sync = make_cuda_timer(torch.cuda), (lambda: torch.cuda.synchronize(device))
    else:
        timer, sync = cpu_timer, (lambda: None)
    with torch.inference_mode():
        samples = time_fn(lambda: module(x), timer, settings, sync)
    value, spread = robust_stats(samples, settings.statistic)
    return Entry(value, spread, len(samples))


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
        how = "torch eager, time.perf_counter around each call"
    return {
        "device": kind, "device_name": name, "runtime": "pytorch-eager", "runtime_version": str(torch.__version__),
        "cuda_version": version, "batch_size": settings.batch_size, "threads": settings.threads, "dtype": "float32",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "method": "measured",
        "source": f"{how}; {settings.warmup} warm-up runs, >= {settings.repeats} timed runs and >= "
                  f"{settings.min_time_s} s per layer; ms = {settings.statistic} of the timed runs, "
                  "spread = IQR / 1.349",
        "statistic": settings.statistic,
        "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "settings": asdict(settings),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def measure_layers(layers: Sequence[tuple[str, int, int]], settings: ProfilerSettings,
                   progress: Callable[[int, str], None] | None = None) -> dict[str, Entry]:
    """Measure ``(block, in_chs, resolution)`` triples in this process, with threads pinned (restored after)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        out = {}
        for block, in_chs, res in layers:
            key = layer_key(block, in_chs, res)
            out[key] = measure_layer(block, in_chs, res, settings)
            if progress:
                progress(1, key)
        return out
    finally:
        torch.set_num_threads(old)


class ProgressBar:
    """A one-line stderr progress bar (redrawn on a terminal; a line per 10 % in logs)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True, width: int = 30):
        self.total, self.n, self.width, self.enabled = max(total, 1), 0, width, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self._next_decile = 1

    def __call__(self, n: int, label: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        frac = self.n / self.total
        filled = int(frac * self.width)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.n}/{self.total} "
                f"{time.perf_counter() - self.t0:.0f}s {label}")
        if self.tty:
            self.stream.write("\r" + line[:118].ljust(118))
            if self.n >= self.total:
                self.stream.write("\n")
        elif frac * 10 >= self._next_decile or self.n >= self.total:
            self._next_decile = int(frac * 10) + 1
            self.stream.write(line + "\n")
        self.stream.flush()


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
    layers = list(dict.fromkeys([*space_layers(spaces), *extra_layers]))
    bar = ProgressBar(len(layers), stream, enabled=progress)
    if ray_resources is not None:
        entries, info = measure_on_ray(layers, settings, ray_resources, ray_address, ray_num_cpus, bar)
    else:
        info = device_info(settings)
        entries = measure_layers(layers, settings, bar)
    info["spaces"] = [space_record(s) for s in spaces]
    predictor = fit_linear({k: e.ms for k, e in entries.items()})
    return Profile(name, info, entries, predictor)


# -- Ray: measure on the node that has the hardware ------------------------------------------------------------------


class _ProfilerActor:
    """Runs on the node Ray places it on; measures layers there and says where it ran."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ProfilerSettings(**settings)

    def info(self) -> dict[str, Any]:
        import ray

        info = device_info(self.settings)
        info["ray_node_id"] = ray.get_runtime_context().get_node_id()
        return info

    def measure(self, layers: list[tuple[str, int, int]]) -> dict[str, tuple[float, float, int]]:
        return {k: (e.ms, e.spread, e.count) for k, e in measure_layers(layers, self.settings).items()}


def measure_on_ray(layers: Sequence[tuple[str, int, int]], settings: ProfilerSettings, resources: dict[str, float],
                   address: str | None = None, num_cpus: float | None = None,
                   progress: Callable[[int, str], None] | None = None, chunk: int = 8,
                   ) -> tuple[dict[str, Entry], dict[str, Any]]:
    """Measure ``layers`` in a Ray actor that requests exactly ``resources`` (plus ``num_cpus`` CPUs).

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
        actor = ray.remote(_ProfilerActor).options(num_cpus=cpus, resources=dict(resources)).remote(asdict(settings))
        info = ray.get(actor.info.remote())
        info["ray_resources"] = dict(resources)
        entries: dict[str, Entry] = {}
        for i in range(0, len(layers), chunk):
            part = [tuple(t) for t in layers[i:i + chunk]]
            got = ray.get(actor.measure.remote(part))
            entries.update({k: Entry(*v) for k, v in got.items()})
            if progress:
                progress(len(part), layer_key(*part[-1]))
        return entries, info
    finally:
        if actor is not None:
            ray.kill(actor)
        if started:
            ray.shutdown()
