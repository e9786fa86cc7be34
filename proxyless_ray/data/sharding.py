"""Per-epoch batch plans that give every data-parallel rank a disjoint shard.

One permutation per (seed, epoch) is shared by all ranks; global batch ``t`` is ``perm[t*G:(t+1)*G]`` with
``G = world * batch_size``, and rank ``r`` takes the ``r``-th slice of it. So 2 workers x batch b see exactly the
images 1 worker x batch 2b sees, step for step (what the equivalence test relies on), and every rank runs the same
number of steps (reports and all-reduces are barriers).
"""

from __future__ import annotations

import torch


def shard_batches(n: int, batch_size: int, rank: int, world: int, epoch: int, seed: int, shuffle: bool = True,
                  drop_last: bool = True, max_steps: int = 0) -> list[torch.Tensor]:
    """Index batches of this rank for one epoch.

    Args:
        n: Size of the split.
        batch_size: Per-rank batch size.
        rank: This worker's rank.
        world: Number of workers.
        epoch: Epoch number (changes the permutation).
        seed: Base seed shared by all ranks.
        shuffle: Permute (training) or keep order (evaluation).
        drop_last: Drop the incomplete last global batch (training) or keep it, split evenly (evaluation).
        max_steps: Cap on the number of batches (0: no cap).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} must be in [0, world={world})")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    global_bs = batch_size * world
    steps = n // global_bs if drop_last else -(-n // global_bs)
    if max_steps:
        steps = min(steps, max_steps)
    out = []
    for t in range(steps):
        chunk = perm[t * global_bs:(t + 1) * global_bs]
        if len(chunk) == global_bs:
            out.append(chunk[rank * batch_size:(rank + 1) * batch_size])
        else:  # last partial batch in evaluation: split as evenly as possible, possibly empty on some ranks
            out.append(chunk.tensor_split(world)[rank])
    return out


class EndlessBatches:
    """Batch ``k`` of a split read one batch at a time across passes (reshuffled each pass, sharded like
    :func:`shard_batches`), for readers that count batches rather than epochs: the architecture steps read the
    held-out split by their own counter, so a resumed run reads exactly the batches the uninterrupted run reads."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.batch_size = min(batch_size, max(n // world, 1))
        self.per_pass = n // (self.batch_size * world)
        self._plan: tuple[int, list[torch.Tensor]] = (-1, [])

    def __getitem__(self, k: int) -> torch.Tensor:
        if self.per_pass == 0:
            raise ValueError(f"split of {self.n} images is too small for {self.world} workers")
        pass_, i = divmod(k, self.per_pass)
        if self._plan[0] != pass_:
            self._plan = (pass_, shard_batches(self.n, self.batch_size, self.rank, self.world, pass_, self.seed))
        return self._plan[1][i]
