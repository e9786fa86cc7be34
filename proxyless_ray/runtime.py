"""Process-level settings that make CPU training and latency measurement fast and steady: the allocator, and how
OpenMP threads wait.

glibc hands every allocation above 128 KiB back to the kernel on free (``mmap``/``munmap``), so each large
activation tensor of a forward or backward pass page-faults afresh: on the 2-vCPU development VM that made an
ImageNet-space forward pass 1.6x slower (52.8 -> 32.2 ms at batch 1) and a small-space training step 1.3x slower,
and left latency measurements jittering by +-30 %. Raising the mmap and trim thresholds keeps freed memory in the
heap for reuse.

Between two parallel regions (every op of a step is one) torch's OpenMP threads wait for the next, either spinning
or asleep. Asleep (``OMP_WAIT_POLICY=PASSIVE``) every op pays for waking them, and two threads step no faster than
one; spinning, a thread whose core another process needs burns that core's time. So the policy follows the
placement (:func:`choose_wait_policy`, ``train.wait_policy``): a process whose threads have cores to themselves
spins a bounded while, processes that together run more threads than the node has CPUs sleep at once. libgomp reads
the policy once, when torch loads it, so it must be in the environment before ``import torch``: Ray workers get it
through their runtime environment, and the command line re-executes itself when torch came too early
(:func:`ensure_thread_env`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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


def thread_env(shares_cores: bool) -> dict[str, str]:
    """The wait-policy variables for a process that shares its cores with others, or owns them.

    Both variables are always set: a Ray worker inherits the environment of whoever started the cluster, and
    ``GOMP_SPINCOUNT`` overrides whatever ``OMP_WAIT_POLICY`` says there.
    """
    if shares_cores:
        return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)}


def choose_wait_policy(setting: str, threads: int, processes: int, node_cpus: int) -> tuple[str, str]:
    """``spin`` or ``passive``, and why, for ``processes`` processes of ``threads`` torch threads on one node.

    Args:
        setting: ``train.wait_policy`` (one of :data:`WAIT_POLICIES`).
        threads: Torch threads per process.
        processes: How many of them may run on one node at once.
        node_cpus: CPUs of that node.
    """
    if setting not in WAIT_POLICIES:
        raise ValueError(f"train.wait_policy {setting!r} is unknown; expected one of {list(WAIT_POLICIES)}")
    placement = f"{processes} process(es) x {threads} thread(s) on {node_cpus} CPUs"
    if setting != "auto":
        return setting, f"train.wait_policy: {setting}; {placement}"
    if threads * processes > node_cpus:
        return "passive", f"auto: {placement} share cores"
    return "spin", f"auto: {placement}, each thread has a core"


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


def local_policy(exp) -> tuple[str, int, str]:
    """Wait policy, torch threads and the reason for a search or retraining in this process (``dist.workers: 0``).

    The threads are ``train.threads``, else torch's default (one per core it sees).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = exp.train.threads or cpus
    policy, why = choose_wait_policy(exp.train.wait_policy, threads, 1, cpus)
    return policy, threads, why


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
    import sys

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
