"""Warm-up path methods: what each one trains, and that ranks and resumed runs draw the same paths."""

import pytest

from proxyless_ray.nn.arch import parse_block
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.search.path_sampling import (
    WarmupMethod,
    largest_choices,
    smallest_choices,
    warmup_paths,
)

SLOTS = SearchSpace().slots()


def blocks(path):
    return [s.candidates[c] for s, c in zip(SLOTS, path)]


def test_largest_and_smallest_paths():
    for s, b in zip(SLOTS, blocks(largest_choices(SLOTS))):
        spec = parse_block(b)
        assert (spec.kernel_size, spec.exp_ratio) == (7, 6), (s.index, b)
    small = blocks(smallest_choices(SLOTS))
    for s, b in zip(SLOTS, small):
        assert b == "zero" if s.has_zero else parse_block(b).kernel_size == 3 and parse_block(b).exp_ratio == 3


def test_fair_trains_every_candidate_of_every_layer_once_per_group():
    n = max(len(s.candidates) for s in SLOTS)
    for group in range(3):
        seen = [set() for _ in SLOTS]
        for pos in range(n):
            (path,) = warmup_paths("fair", SLOTS, 5, 1, group * n + pos, 0.5).paths
            for layer, c in enumerate(path):
                seen[layer].add(c)
        assert all(len(s) == len(slot.candidates) for s, slot in zip(seen, SLOTS))


def test_sandwich_runs_largest_smallest_and_two_random_paths_with_distillation():
    step = warmup_paths("sandwich", SLOTS, 0, 0, 3, 0.2)
    assert step.distill and len(step.paths) == 4
    assert list(step.paths[0]) == largest_choices(SLOTS) and list(step.paths[1]) == smallest_choices(SLOTS)


def test_largest_first_switches_to_uniform():
    assert list(warmup_paths("largest_first", SLOTS, 0, 0, 0, 0.1).paths[0]) == largest_choices(SLOTS)
    later = {warmup_paths("largest_first", SLOTS, 0, 0, i, 0.9).paths[0] for i in range(20)}
    assert len(later) > 10


@pytest.mark.parametrize("method", [m.value for m in WarmupMethod])
def test_paths_depend_only_on_seed_epoch_and_step(method):
    a = [warmup_paths(method, SLOTS, 3, 2, i, i / 50).paths for i in range(50)]
    b = [warmup_paths(method, SLOTS, 3, 2, i, i / 50).paths for i in range(50)]
    c = [warmup_paths(method, SLOTS, 4, 2, i, i / 50).paths for i in range(50)]
    assert a == b
    if method != "largest_first":  # its first third is the one largest path whatever the seed
        assert a != c
    uniform = [p[-1] for p in a]
    assert len(set(uniform)) > 1


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="'spos'"):
        warmup_paths("spos", SLOTS, 0, 0, 0, 0.0)


def test_uniform_depth_draws_every_depth_about_equally_often():
    removable = sum(s.has_zero for s in SLOTS)
    counts = [0] * (removable + 1)
    draws = 2000
    for i in range(draws):
        (path,) = warmup_paths("uniform_depth", SLOTS, 0, 0, i, 0.5).paths
        counts[sum(b == "zero" for b in blocks(path))] += 1
        assert all(b != "zero" or s.has_zero for s, b in zip(SLOTS, blocks(path)))
    expected = draws / (removable + 1)
    assert all(0.6 * expected < c < 1.4 * expected for c in counts), counts
    # uniform: a layer is zero with probability 1 / len(candidates), so paths with most layers removed hardly occur
    uniform = [sum(b == "zero" for b in blocks(warmup_paths("uniform", SLOTS, 0, 0, i, 0.5).paths[0]))
               for i in range(draws)]
    assert sum(z > removable // 2 for z in uniform) < 0.05 * draws < sum(counts[removable // 2 + 1:])


def test_uniform_depth_draws_every_real_candidate_of_a_layer():
    seen = [set() for _ in SLOTS]
    for i in range(500):
        for layer, c in enumerate(warmup_paths("uniform_depth", SLOTS, 1, 0, i, 0.5).paths[0]):
            seen[layer].add(c)
    assert all(len(s) == len(slot.candidates) for s, slot in zip(seen, SLOTS))
