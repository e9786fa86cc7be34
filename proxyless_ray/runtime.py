"""Process-level settings that make CPU training and latency measurement fast and steady: the allocator, and how
OpenMP threads wait.

glibc hands every allocation above 128 KiB back to the kernel on free (``mmap``/``munmap``), so each large
activation tensor of a forward or backward pass page-faults afresh: forward passes and training steps slow down and
latency measurements jitter (figures: docs/benchmarks.md). Raising the mmap and trim thresholds keeps freed memory
in the heap for reuse.

Between two parallel regions (every op of a step is one) torch's OpenMP threads wait for the next, either spinning
or asleep. Asleep (``OMP_WAIT_POLICY=PASSIVE``) every op pays for waking them, and two threads step no faster than
one; spinning, a thread whose core another process needs burns that core's time. So the policy follows the
placement (:func:`choose_wait_policy`, ``train.wait_policy``): a process whose threads have cores to themselves
spins a bounded while, processes that together run more threads than the node has CPUs sleep at once, and so does a
run in this process that starts beside another busy process (:func:`other_processes_cores`). libgomp reads
the policy once, when torch loads it, so it must be in the environment before ``import torch``: Ray workers get it
through their runtime environment, and the command line re-executes itself when torch came too early
(:func:`ensure_thread_env`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import time

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 * 1024 * 1024

# For processes started later (Ray workers): glibc reads these at start-up.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap (see the module docstring); idempotent. Returns whether it applied."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("PROXYLESS_RAY_DEFAULT_MALLOC"):
        return _tuned  # opt out, e.g. to measure the difference
    name = ctypes.util.find_library("c")
    if not name:
        return _tuned
    try:
        libc = ctypes.CDLL(name)
        settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
        ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return _tuned
    _tuned = bool(ok)
    return _tuned


def apply_process_defaults(shares_cores: bool = False) -> None:
    """Driver and worker start-up, before torch loads: the tuned allocator now, the same settings for the processes
    it starts, and the wait policy of a process that owns its cores (``shares_cores=False``) unless the
    environment already names one."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if not any(k in os.environ for k in THREAD_ENV_KEYS):
        os.environ.update(thread_env(shares_cores))
    tune_allocator()


# -- OpenMP wait policy ----------------------------------------------------------------------------------------

WAIT_POLICIES = ("auto", "spin", "passive")  # train.wait_policy: auto picks spin or passive from the placement
THREAD_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = 300_000  # libgomp's own default spin before sleeping (a few ms); set explicitly so workers get it too
_REEXEC_GUARD = "PROXYLESS_RAY_THREAD_ENV_SET"
_BUSY_ENV = "PROXYLESS_RAY_BUSY_CORES"  # what the process measured before it re-executed itself


def thread_env(shares_cores: bool) -> dict[str, str]:
    """The wait-policy variables for a process that shares its cores with others, or owns them.

    Both variables are always set: a Ray worker inherits the environment of whoever started the cluster, and
    ``GOMP_SPINCOUNT`` overrides whatever ``OMP_WAIT_POLICY`` says there.
    """
    if shares_cores:
        return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)}


def choose_wait_policy(setting: str, threads: int, processes: int, node_cpus: int,
                       busy_cores: float = 0.0) -> tuple[str, str]:
    """``spin`` or ``passive``, and why, for ``processes`` processes of ``threads`` torch threads on one node.

    Args:
        setting: ``train.wait_policy`` (one of :data:`WAIT_POLICIES`).
        threads: Torch threads per process.
        processes: How many of them may run on one node at once.
        node_cpus: CPUs of that node.
        busy_cores: Cores of that node other processes keep busy (:func:`other_processes_cores`); rounded, they
            are not the threads' to spin on.
    """
    if setting not in WAIT_POLICIES:
        raise ValueError(f"train.wait_policy {setting!r} is unknown; expected one of {list(WAIT_POLICIES)}")
    taken = round(busy_cores)
    placement = f"{processes} process(es) x {threads} thread(s) on {node_cpus} CPUs"
    if taken:
        placement += f", {busy_cores:.1f} of them busy with other processes"
    if setting != "auto":
        return setting, f"train.wait_policy: {setting}; {placement}"
    if threads * processes > node_cpus - taken:
        return "passive", f"auto: {placement}: they share cores"
    return "spin", f"auto: {placement}, each thread has a core"


def _busy_and_own_s() -> tuple[float, float]:
    """Seconds all CPUs have been busy (``/proc/stat``) and this process's CPU seconds."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_processes_cores(window_s: float = 0.2) -> float:
    """Cores that processes other than this one kept busy over the next ``window_s`` seconds (Linux
    ``/proc/stat``; 0.0 where it cannot be read)."""
    try:
        (busy_0, own_0), t0 = _busy_and_own_s(), time.perf_counter()
        time.sleep(window_s)
        (busy_1, own_1), t1 = _busy_and_own_s(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(busy_1 - busy_0 - (own_1 - own_0), 0.0) / (t1 - t0)


def ray_worker_policy(exp, node_cpus: int, concurrent: int = 1) -> tuple[str, int, str]:
    """Wait policy, torch threads per worker and the reason, for the Ray Train workers of ``exp``.

    Args:
        exp: The experiment (``train.threads``, ``train.wait_policy``, ``dist.workers``, ``dist.cpus_per_worker``).
        node_cpus: CPUs of the nodes the workers run on (the smallest that fits one).
        concurrent: Trainers of this shape that may run at once (a sweep's concurrent trials).
    """
    d = exp.dist
    threads = exp.train.threads or max(int(d.cpus_per_worker), 1)
    fit = max(int(node_cpus // d.cpus_per_worker), 1) if d.cpus_per_worker > 0 else node_cpus
    processes = max(min(max(d.workers, 1) * concurrent, fit), 1)
    policy, why = choose_wait_policy(exp.train.wait_policy, threads, processes, node_cpus)
    return policy, threads, why


def local_policy(exp, busy_cores: float | None = None) -> tuple[str, int, str]:
    """Wait policy, torch threads and the reason for a search or retraining in this process (``dist.workers: 0``).

    The threads are ``train.threads``, else torch's default (one per core it sees). ``auto`` also counts the cores
    other processes keep busy (``busy_cores``; by default measured now, :func:`other_processes_cores`): beside a
    busy process spinning threads are several times slower, sleeping ones lose far less.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = exp.train.threads or cpus
    if busy_cores is None and exp.train.wait_policy == "auto":
        if os.environ.get(_REEXEC_GUARD) and _BUSY_ENV in os.environ:  # re-executed for the choice made before
            busy_cores = float(os.environ[_BUSY_ENV])
        else:
            busy_cores = other_processes_cores()
            os.environ[_BUSY_ENV] = f"{busy_cores:.2f}"
    policy, why = choose_wait_policy(exp.train.wait_policy, threads, 1, cpus, busy_cores or 0.0)
    return policy, threads, why


def threads_for(other_cores: float, cpus: int, threads: int) -> int:
    """Torch threads for a spinning process beside other processes that keep ``other_cores`` cores busy: one per core
    they leave free, at least one, at most ``threads``. A core counts as taken once they use 0.6 of it."""
    return max(1, min(threads, math.floor(cpus - other_cores + 0.4)))


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


GOVERNOR_EVERY_S = 10.0  # long enough that a compile or a test run beside the search counts, not a blip


class ThreadGovernor:
    """Fewer torch threads while other processes crowd a spinning process's cores; all of them once they leave.

    ``auto`` makes a process that owns its cores spin (:func:`choose_wait_policy`); a job that starts on the same
    machine later makes each op's end wait for the thread whose core it shares, while the other thread spins:
    steps run 3-4x slower (figures: README). One thread per free core has no team to wait for. :meth:`tick`, called
    after every step, measures every ``every_s`` seconds how many cores other processes took since the last check
    and sets the thread count with :func:`threads_for`. It only acts where that can help: ``train.adapt_threads``,
    at least 2 threads, spinning threads (``OMP_WAIT_POLICY=ACTIVE``; sleeping ones give their core back anyway), and
    a readable ``/proc/stat``.
    """

    def __init__(self, enabled: bool, every_s: float | None = None, say=None, reader=None, cpus: int | None = None):
        import torch

        self.threads = torch.get_num_threads()
        self.cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self.every_s = GOVERNOR_EVERY_S if every_s is None else every_s
        self.say, self.read = say or _to_stderr, reader or _busy_and_own_s
        self.enabled = enabled and self.threads >= 2 and os.environ.get("OMP_WAIT_POLICY") == "ACTIVE"
        self.checks = 0
        self.changes: list[tuple[float, int]] = []  # (other processes' cores, threads set)
        self._last: tuple[float, float, float] | None = None
        if self.enabled:
            try:
                self._last = (time.perf_counter(), *self.read())
            except (OSError, ValueError, IndexError):
                self.enabled = False

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        t0, busy0, own0 = self._last
        if now - t0 < self.every_s:
            return
        busy, own = self.read()
        self._last = (now, busy, own)
        self.checks += 1
        others = max(busy - busy0 - (own - own0), 0.0) / (now - t0)
        want = threads_for(others, self.cpus, self.threads)
        import torch

        have = torch.get_num_threads()  # in force now: a nested loop (the search's fine-tune) may have set its own
        if want != have:
            torch.set_num_threads(want)
            self.changes.append((round(others, 2), want))
            self.say(f"[proxyless-ray] other processes keep {others:.1f} of {self.cpus} cores busy: {want} torch "
                     f"thread(s), were {have}")

    def restore(self) -> None:
        """The thread count the process started with, if this governor changed it (a reused process's next run
        starts from it)."""
        import torch

        if self.changes and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def describe(policy: str, threads: int, why: str, who: str) -> str:
    """The log line of a choice."""
    env = " ".join(f"{k}={v}" for k, v in thread_env(policy == "passive").items())
    return f"[proxyless-ray] {who}: {threads} torch thread(s), OpenMP threads {policy} ({env}); {why}"


def ensure_thread_env(policy: str, reexec: bool = False) -> bool:
    """Make this process run with ``policy``'s wait-policy variables; returns whether they are in force.

    Sets them in the environment before torch loads. When torch, and with it libgomp, which read the old values,
    is already loaded, re-executes the same command line with them once if ``reexec`` allows it (the command
    line's own process; never a library caller's), else leaves everything as it is and returns False.
    """
    env = thread_env(policy == "passive")
    if all(os.environ.get(k) == v for k, v in env.items()):
        return True
    if "torch" in sys.modules:
        if not reexec or os.environ.get(_REEXEC_GUARD):
            return False  # the environment keeps saying what this process's OpenMP threads do
        os.environ.update(env)
        os.environ[_REEXEC_GUARD] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
    os.environ.update(env)
    return True
