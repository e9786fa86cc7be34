"""Straggler-aware split of each global training batch across data-parallel ranks.

Every weight step all ranks wait for the slowest one in the gradient all-reduce. When one worker is persistently
slower (a busier node, an older GPU, a vCPU whose host core is shared), an even split wastes the others' time
waiting in the all-reduce (``docs/benchmarks.md``, batch balancing). Semi-dynamic load balancing (Chen et al., LB-BSP,
https://arxiv.org/abs/1806.02508) sizes each rank's share of the global batch by its measured speed, at the step
boundary.

The gradient stays exact: the search loop weights each rank's mean gradient by its share of the global batch, so
the all-reduced gradient is the mean over the whole global batch whatever the split (the equivalence test holds).
What changes with the split is which images each rank's BatchNorm sees (statistics are per worker) and so, with
BatchNorm in training mode, bit-for-bit reproducibility across runs. Every rank computes the split from the same
all-reduced step times, so all ranks agree without another message.

Opt-in (``dist.balance_batches: true``), for workers that are persistently unequal, where the balanced split is
faster than the even one (``benchmarks/bench_balance.py``); on evenly matched workers whose speed only fluctuates
it chases the noise and is slower (``docs/benchmarks.md``).
"""

from __future__ import annotations

import math


class BatchBalancer:
    """Per-rank image counts of each global batch, adapted to the ranks' measured speed.

    Args:
        global_batch: Images per step over all ranks.
        world: Number of ranks.
        enabled: Adapt the split (``False``: always even).
        smoothing: Weight of the newest step in the running per-image time of each rank.
        min_share: No rank gets fewer than this fraction of an even share (BatchNorm needs a real batch).
        min_gain: Change the split only when it shortens the predicted step by at least this fraction (no flapping).
    """

    def __init__(self, global_batch: int, world: int, enabled: bool = True, smoothing: float = 0.3,
                 min_share: float = 0.5, min_gain: float = 0.01):
        if world < 1 or global_batch < world:
            raise ValueError(f"global batch {global_batch} cannot be split over {world} ranks")
        self.global_batch, self.world, self.enabled = global_batch, world, enabled and world > 1
        self.smoothing, self.min_gain = smoothing, min_gain
        even = global_batch // world
        self.counts = [even + (1 if r < global_batch - even * world else 0) for r in range(world)]
        # multiples of `quantum` images keep the set of batch shapes small (allocator and kernel caches)
        self.quantum = max(1, min(8, global_batch // (8 * world)))
        self.min_count = min(max(2, math.ceil(even * min_share)), even)
        self.sec_per_image: list[float | None] = [None] * world

    def bounds(self, rank: int) -> tuple[int, int]:
        """This rank's slice ``[lo, hi)`` of the global batch."""
        lo = sum(self.counts[:rank])
        return lo, lo + self.counts[rank]

    def weight(self, rank: int) -> float:
        """This rank's share of the global batch: the factor of its mean gradient in the global mean."""
        return self.counts[rank] / self.global_batch

    def update(self, busy_s: list[float]) -> None:
        """Take every rank's busy time of the last step (data and forward/backward, identical list on all ranks)."""
        if not self.enabled:
            return
        if len(busy_s) != self.world:
            raise ValueError(f"got {len(busy_s)} step times for {self.world} ranks")
        for r, (t, n) in enumerate(zip(busy_s, self.counts)):
            s = max(t, 1e-9) / n
            old = self.sec_per_image[r]
            self.sec_per_image[r] = s if old is None else (1 - self.smoothing) * old + self.smoothing * s
        proposal = self._proportional()
        if self._step_time(proposal) < (1 - self.min_gain) * self._step_time(self.counts):
            self.counts = proposal

    def _step_time(self, counts: list[int]) -> float:
        return max(n * s for n, s in zip(counts, self.sec_per_image))

    def _proportional(self) -> list[int]:
        """Counts proportional to speed, clamped to ``min_count``, in multiples of ``quantum``, summing exactly."""
        q, g = self.quantum, self.global_batch
        units, spare = divmod(g, q)  # the spare images (g not a multiple of q) go to rank 0
        min_units = math.ceil(self.min_count / q)
        if min_units * self.world > units:  # too small a batch to move images around
            return list(self.counts)
        speed = [1.0 / s for s in self.sec_per_image]
        ideal = [units * v / sum(speed) for v in speed]
        # clamp the slow ranks to the floor, then share what is left among the others in proportion to speed
        fixed = [False] * self.world
        while True:
            free = units - sum(min_units for f in fixed if f)
            total = sum(v for v, f in zip(speed, fixed) if not f)
            ideal = [min_units if f else free * v / total for v, f in zip(speed, fixed)]
            low = [r for r in range(self.world) if not fixed[r] and ideal[r] < min_units]
            if not low:
                break
            for r in low:
                fixed[r] = True
        out = [math.floor(v) for v in ideal]
        order = sorted(range(self.world), key=lambda r: ideal[r] - out[r], reverse=True)
        for r in order[:units - sum(out)]:
            out[r] += 1
        counts = [u * q for u in out]
        counts[0] += spare
        return counts
