"""Collectives between two real gloo processes: averaging in place (even and weighted, with the step times riding
along), and a dead peer ends the wait with an error."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proxyless_ray.search.comm import Comm
from proxyless_ray.tracking.server import free_port


def _worker(rank: int, port: int, mode: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5))
    comm = Comm(rank, 2)
    if mode == "dead_peer" and rank == 1:
        os._exit(0)  # leaves without joining the all-reduce
    a = torch.full((2, 3), float(rank + 1))
    b = torch.arange(4.0) * (rank + 1)
    try:
        comm.mean_([a, b])
    except RuntimeError as err:  # gloo's DistBackendError is one; the class varies with the failure
        queue.put((rank, "error", str(err)[:200]))
        return
    # uneven batches: rank 0 took a quarter of the global batch, rank 1 three quarters
    c = torch.full((3,), float(rank + 1))
    gathered = comm.mean_([c], weight=(0.25, 0.75)[rank], gather=10.0 + rank)
    queue.put((rank, "ok", (a.tolist(), b.tolist(), comm.sum([rank + 1.0]), comm.allreduce_s > 0, c.tolist(),
                            gathered)))
    dist.destroy_process_group()


def _run(mode: str) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, mode, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in range(2 if mode == "ok" else 1):
            out.append(queue.get(timeout=60))  # a wait that never ends fails here instead of hanging
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return sorted(out)


@pytest.mark.slow
def test_mean_averages_every_tensor_in_place_on_both_ranks():
    results = _run("ok")
    assert [r[:2] for r in results] == [(0, "ok"), (1, "ok")]
    for _, _, (a, b, total, timed, c, gathered) in results:
        assert a == [[1.5] * 3] * 2  # (1 + 2) / 2
        assert b == [0.0, 1.5, 3.0, 4.5]
        assert total == [3.0]
        assert timed
        assert c == [1.75] * 3  # 0.25 x 1 + 0.75 x 2
        assert gathered == [10.0, 11.0]  # every rank's value, by rank


def test_a_single_worker_keeps_its_tensors_and_gets_its_own_value_back():
    t = torch.arange(3.0)
    assert Comm().mean_([t], weight=1.0, gather=0.5) == [0.5]
    assert Comm().mean_([t]) is None
    assert t.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_a_dead_peer_ends_the_polled_wait_with_an_error():
    [(rank, outcome, message)] = _run("dead_peer")
    assert (rank, outcome) == (0, "error"), message
