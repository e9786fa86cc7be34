"""Collective operations between data-parallel search workers (no-ops for a single worker).

The supernet is not wrapped in DDP: only the sampled path has gradients, and every rank samples the same path
(shared per-step seed), so one flattened all-reduce of the gradients that exist is both correct and cheap, with
none of DDP's unused-parameter bookkeeping. It runs after backward, not in buckets overlapped with it as DDP's do:
on 2 vCPUs buckets started from gradient hooks made the 2-rank weight step slower, most likely because gloo's
threads then compete with backward for the cores, and the whole all-reduce is a small part of a step (figures:
docs/benchmarks.md).

On CPU (gloo) a rank waits for the gradient all-reduce by checking it every 0.1 ms and sleeping in between, rather
than blocking or spinning. A blocked rank's idle virtual CPU halts, and the host takes milliseconds to wake it when
the other rank's data arrives; a spinning rank answers at once but keeps its vCPU busy, and on a shared host that
slows the rank still computing. Measured in the training loop, napping was as fast as blocking, faster than
spinning and the steadiest of the three (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

WAIT_NAP_S = 1e-4  # between checks of a pending CPU all-reduce (see the module docstring)


class Comm:
    """Rank, world size and the few collectives the search loop needs.

    Args:
        rank: This worker's rank.
        world: Number of workers. With ``world == 1`` or no initialised process group every call is local.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.allreduce_s = 0.0  # time spent in all-reduce, for the benchmark's share-of-step figure

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def mean_(self, tensors: Sequence[torch.Tensor], weight: float | None = None,
              gather: float | None = None) -> list[float] | None:
        """Average tensors across ranks in place with one flattened all-reduce.

        Args:
            tensors: This rank's tensors (gradients), replaced by the average over ranks.
            weight: This rank's weight in the average (the ranks' weights sum to 1, e.g. its share of the global
                batch when ranks take uneven batches); ``None``: an even average.
            gather: A number this rank shares with the others in the same all-reduce (its step time).

        Returns:
            Every rank's ``gather`` value, by rank, when one was given (``[gather]`` for a single worker).
        """
        if not self.active or not tensors:
            return None if gather is None else [float(gather)]
        t0 = time.perf_counter()
        parts = [t.reshape(-1) for t in tensors]
        n_values = sum(p.numel() for p in parts)
        if gather is not None:  # each rank fills its own slot; the sum hands every rank all of them
            slots = torch.zeros(self.world, dtype=parts[0].dtype, device=parts[0].device)
            slots[self.rank] = gather
            parts.append(slots)
        flat = torch.cat(parts)
        if weight is None:
            flat[:n_values].div_(self.world)
        else:
            flat[:n_values].mul_(weight)
        if flat.is_cuda:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
            while not work.is_completed():  # also true when it failed: a dead peer ends the wait within gloo's timeout
                time.sleep(WAIT_NAP_S)
            work.wait()  # raises the collective's error, if any
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        self.allreduce_s += time.perf_counter() - t0
        return None if gather is None else flat[offset:].tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum scalars across ranks (counts for accuracy)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Copy rank ``src``'s tensors to every rank (initial weights and alphas)."""
        if not self.active:
            return
        for t in tensors:
            dist.broadcast(t, src=src)
