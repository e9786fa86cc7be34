"""The straggler-aware batch split: proportional to speed, exact sums, bounded, steady when ranks are even."""

import dataclasses
import datetime
import os
import pathlib
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proxyless_ray.data import build_splits
from proxyless_ray.search.balance import BatchBalancer
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.tracking.server import free_port

from conftest import load_benchmark, requires_fmnist, tiny_experiment

bench_balance = load_benchmark("bench_balance")
SlowSource = bench_balance.SlowSource  # a training split that reads slowly: the benchmark's straggler


def _feed(bal: BatchBalancer, sec_per_image: list[float], steps: int = 20) -> None:
    for _ in range(steps):
        bal.update([n * s for n, s in zip(bal.counts, sec_per_image)])


def test_starts_even_and_the_slices_tile_the_global_batch():
    bal = BatchBalancer(130, 4)
    assert bal.counts == [33, 33, 32, 32]
    assert [bal.bounds(r) for r in range(4)] == [(0, 33), (33, 66), (66, 98), (98, 130)]
    assert sum(bal.weight(r) for r in range(4)) == pytest.approx(1.0)


def test_a_slower_rank_gets_fewer_images_in_proportion_to_its_speed():
    bal = BatchBalancer(128, 2)
    _feed(bal, [1.0, 1.5])  # rank 1 takes 1.5x as long per image: ideal split 76.8 / 51.2
    assert bal.counts == [80, 48]  # multiples of 8
    assert bal.weight(0) == 80 / 128


def test_the_split_follows_a_change_of_speed():
    bal = BatchBalancer(128, 2)
    _feed(bal, [1.0, 1.5])
    _feed(bal, [1.5, 1.0], steps=40)
    assert bal.counts == [48, 80]


def test_no_rank_drops_below_half_an_even_share():
    bal = BatchBalancer(128, 2)
    _feed(bal, [1.0, 10.0])
    assert bal.counts == [96, 32]
    bal = BatchBalancer(96, 3)
    _feed(bal, [1.0, 1.0, 20.0])
    assert bal.counts[2] == 16 and sum(bal.counts) == 96 and bal.counts[0] == bal.counts[1]


def test_counts_always_sum_to_the_global_batch_within_bounds():
    rng = random.Random(0)
    for g, w in [(128, 2), (100, 3), (64, 4), (17, 2), (2, 2)]:
        bal = BatchBalancer(g, w)
        for _ in range(200):
            bal.update([n * rng.uniform(0.5, 3.0) for n in bal.counts])
            assert sum(bal.counts) == g
            assert min(bal.counts) >= min(bal.min_count, g // w)
            assert all(c % bal.quantum == 0 for c in bal.counts[1:])


def test_even_ranks_with_noise_keep_the_even_split():
    rng = random.Random(1)
    bal = BatchBalancer(128, 2)
    for _ in range(200):
        bal.update([n * rng.uniform(0.995, 1.005) for n in bal.counts])
    assert bal.counts == [64, 64]


def test_disabled_or_single_rank_stays_even():
    bal = BatchBalancer(128, 2, enabled=False)
    _feed(bal, [1.0, 3.0])
    assert bal.counts == [64, 64]
    one = BatchBalancer(64, 1)
    one.update([5.0])
    assert one.counts == [64] and one.bounds(0) == (0, 64) and one.weight(0) == 1.0


def test_bad_input_names_the_values():
    with pytest.raises(ValueError, match="global batch 1 cannot be split over 2 ranks"):
        BatchBalancer(1, 2)
    with pytest.raises(ValueError, match="got 3 step times for 2 ranks"):
        BatchBalancer(128, 2).update([1.0, 1.0, 1.0])


# -- in the search loop: two real gloo processes, one of them a straggler ------------------------------------------


def _balance_experiment(tmp_path, workers: int, batch: int, balance: bool = True):
    return tiny_experiment(
        tmp_path,
        data={"batch_size": batch, "augment": False, "train_subset": 256, "heldout_size": 128},
        train={"epochs": 2, "warmup_epochs": 1, "freeze_bn": True, "arch_update_every": 2, "max_steps_per_epoch": 4,
               "arch_lr": 0.01},
        dist={"workers": workers, "balance_batches": balance},
    )


def _straggler_worker(rank: int, port: int, tmp: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    exp = _balance_experiment(pathlib.Path(tmp), 2, 16)
    splits = build_splits(exp.data, exp.space)
    if rank == 1:
        splits = dataclasses.replace(splits, train=SlowSource(splits.train, 0.004))
    reports: list[dict] = []
    loop = SearchLoop(exp, Comm(rank, 2), lambda m, f: reports.append(m), splits=splits, progress=False)
    loop.run()
    state = {k: v.numpy().copy() for k, v in loop.state.net.state_dict().items()}  # by value through the queue
    queue.put((rank, [m["batch_split"] for m in reports], reports[-1]["alpha_digest"], state))
    dist.destroy_process_group()


@requires_fmnist
@pytest.mark.slow
def test_a_straggler_gets_fewer_images_and_the_search_still_equals_one_worker(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_straggler_worker, args=(r, port, str(tmp_path / "two"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = dict((r[0], r[1:]) for r in (queue.get(timeout=300), queue.get(timeout=300)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    (splits0, digest0, state0), (splits1, digest1, _) = out[0], out[1]
    # both ranks agree on the split; the slowed rank 1 gets fewer images from the first epoch on and ends on the
    # smallest slice it may get (how far the first epoch's 4 steps move depends on the machine's load)
    assert splits0 == splits1
    assert all(fast + slow == 32 and slow < fast for fast, slow in splits0), splits0
    assert splits0[-1] == [24, 8], splits0
    assert digest0 == digest1
    # the weighted gradient is the global batch's: the same weights as 1 worker x batch 32 (BN statistics frozen)
    single = SearchLoop(_balance_experiment(tmp_path / "one", 0, 32), Comm(), lambda m, f: None, progress=False)
    single.run()
    for key, value in single.state.net.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(state0[key]), value, rtol=1e-4, atol=1e-5, msg=key)
