"""Which paths a weight step trains while the architecture is frozen: the supernet-training methods.

ProxylessNAS (https://arxiv.org/abs/1812.00332) warms the weights up on paths sampled from softmax(alpha), which
is uniform while alpha is frozen; later weight-sharing work changed which paths are trained and how:

* ``uniform``: one path per step, every layer's candidate uniformly at random (SPOS, https://arxiv.org/abs/1904.00420).
* ``uniform_depth``: one path per step, every depth equally likely: a share ``p`` drawn uniformly from [0, 1], each
  layer that may be removed is zero with probability ``p``, every other layer a uniformly drawn real candidate
  (Once-for-All samples each stage's depth uniformly; here the number of kept layers is uniform over 0..n). Under
  ``uniform`` a layer is zero with probability 1/7, so shallow sub-networks, which the latency loss steers the
  search towards, are seldom trained and read worse than they train alone.
* ``fair``: strict fairness (FairNAS, https://arxiv.org/abs/1907.01845): within each group of ``n`` steps every
  candidate of every layer is trained exactly once (a random permutation per layer and group).
* ``sandwich``: the largest path, the smallest and two random ones on every step, gradients summed, the others
  distilled from the largest path's predictions (BigNAS, https://arxiv.org/abs/2003.11142). Four passes a step; each
  pass runs forward and backward before the next starts, so memory stays that of one path.
* ``largest_first``: the largest path only for the first third of the warm-up, then uniform (Once-for-All's
  progressive shrinking, https://arxiv.org/abs/1908.09791, reduced to its first phase).

Every choice comes from a generator seeded by the step, so all data-parallel ranks sample the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proxyless_ray.choices import WarmupMethod
from proxyless_ray.nn.arch import parse_block
from proxyless_ray.nn.space import Slot

SANDWICH_RANDOM_PATHS = 2
LARGEST_FIRST_SHARE = 1 / 3


@dataclass(frozen=True)
class StepPaths:
    """The paths of one weight step; with ``distill`` every path after the first learns from the first's output."""

    paths: tuple[tuple[int, ...], ...]
    distill: bool = False


def _size_key(block: str) -> tuple[bool, int, int]:
    """Order candidates by computation: zero first, then expansion, then kernel."""
    spec = parse_block(block)
    return (not spec.is_zero, spec.exp_ratio, spec.kernel_size)


def largest_choices(slots: list[Slot]) -> list[int]:
    """Per layer, the candidate with the most computation: largest expansion, then largest kernel."""
    return [max(range(len(s.candidates)), key=lambda i, s=s: _size_key(s.candidates[i])) for s in slots]


def smallest_choices(slots: list[Slot]) -> list[int]:
    """Per layer, zero where it is a candidate, else the smallest expansion and kernel."""
    return [min(range(len(s.candidates)), key=lambda i, s=s: _size_key(s.candidates[i])) for s in slots]


def uniform_choices(slots: list[Slot], generator: torch.Generator) -> list[int]:
    return [int(torch.randint(len(s.candidates), (1,), generator=generator)) for s in slots]


def uniform_depth_choices(slots: list[Slot], generator: torch.Generator) -> list[int]:
    """A path whose number of zero layers is uniform over 0..(layers that may be zero); see ``uniform_depth``."""
    p_zero = float(torch.rand((), generator=generator))
    out = []
    for s in slots:
        zero = [i for i, c in enumerate(s.candidates) if parse_block(c).is_zero]
        real = [i for i, c in enumerate(s.candidates) if not parse_block(c).is_zero]
        drop = float(torch.rand((), generator=generator)) < p_zero  # drawn for every layer: paths stay aligned
        pick = real[int(torch.randint(len(real), (1,), generator=generator))]
        out.append(zero[0] if zero and drop else pick)
    return out


def warmup_paths(method: WarmupMethod | str, slots: list[Slot], seed: int, epoch: int, step: int,
                 progress: float) -> StepPaths:
    """The paths weight step ``step`` of ``epoch`` trains.

    Args:
        method: The supernet-training method.
        slots: The mixed layers of the space.
        seed: The run's seed (with ``epoch`` and ``step``: the same paths on every rank, and on a resumed run).
        epoch: Epoch of the step.
        step: Step within the epoch.
        progress: Share of the warm-up done before this step, in [0, 1] (``largest_first`` switches on it).
    """
    method = WarmupMethod(method)
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + step) * 4 + 2)
    if method == WarmupMethod.UNIFORM:
        return StepPaths((tuple(uniform_choices(slots, gen)),))
    if method == WarmupMethod.UNIFORM_DEPTH:
        return StepPaths((tuple(uniform_depth_choices(slots, gen)),))
    if method == WarmupMethod.LARGEST_FIRST:
        if progress < LARGEST_FIRST_SHARE:
            return StepPaths((tuple(largest_choices(slots)),))
        return StepPaths((tuple(uniform_choices(slots, gen)),))
    if method == WarmupMethod.SANDWICH:
        paths = [tuple(largest_choices(slots)), tuple(smallest_choices(slots))]
        paths += [tuple(uniform_choices(slots, gen)) for _ in range(SANDWICH_RANDOM_PATHS)]
        return StepPaths(tuple(paths), distill=True)
    # fair: a permutation per layer for each group of n steps, drawn from the group's own seed
    n = max(len(s.candidates) for s in slots)
    group, pos = divmod(step, n)
    ggen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + group) * 4 + 3)
    path = []
    for s in slots:
        order = torch.randperm(n, generator=ggen) % len(s.candidates)
        path.append(int(order[pos]))
    return StepPaths((tuple(path),))


def train_paths(net, x: torch.Tensor, y: torch.Tensor, step: StepPaths,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward each of ``step``'s paths of the supernet ``net`` in turn (one path's activations at a
    time), gradients summed; with distillation every later path learns the first path's predictions.

    Returns the first path's loss and logits.
    """
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    teacher = None
    for path in step.paths:
        net.set_active(list(path))
        logits = net(x)
        if first is None:
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
            first = (loss, logits)
            if step.distill:
                teacher = torch.softmax(logits.detach(), dim=1)
        elif teacher is not None:
            loss = -(teacher * torch.log_softmax(logits, dim=1)).sum(1).mean()
        else:
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        loss.backward()
    return first  # type: ignore[return-value]  # a StepPaths holds at least one path


def step_generator(seed: int, epoch: int, step: int, kind: int) -> torch.Generator:
    """The gate-sampling generator of one step: identical on every rank, different for every step and kind."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + step) * 4 + kind)
