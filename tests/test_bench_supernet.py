"""benchmarks/bench_supernet.py: its measurement functions on a tiny space (no wall-clock assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from proxyless_ray.nn.space import SearchSpace

from conftest import load_benchmark

SPACE = SearchSpace(widths=(8, 16), depths=(1, 2), strides=(1, 2), feature_mix_chs=32)


@pytest.fixture(scope="module")
def bench():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is fastest, and spins no idle threads on a busy machine
    yield load_benchmark("bench_supernet")
    torch.set_num_threads(threads)


def test_bench_space_reports_every_figure_and_all_paths_store_more(bench):
    res = bench.bench_space(SPACE, batch=4, repeats=1, warmup=0, nchw=True)
    json.dumps(res)  # the report is plain JSON
    for v in bench.VARIANTS:
        assert res["time_ms"][v] > 0 and res["cpu_ms"][v] >= 0
        assert res["saved_bytes"][v]["activations"] > 0
    assert {"a_nchw", "d_nchw"} <= set(res["time_ms"])
    for key in ("time_a_over_d", "time_b_over_a", "time_c_over_a", "act_a_over_d", "act_c_over_a",
                "time_a_over_d_nchw"):
        assert key in res["ratios"]
    assert set(res["targets"]) == set(bench.TARGETS)
    assert set(res["targets_paired"]) == {"time_a_over_d", "time_b_over_a"}
    assert set(res["time_p25_ms"]) == set(res["time_ms"]) and len(res["load_1min_per_round"]) == 1
    saved = res["saved_bytes"]
    # every candidate's activations are kept for the weighted sum: far more than one path
    assert saved["c"]["activations"] > 2 * saved["a"]["activations"]
    # the supernet's single path stores exactly what the standalone child stores
    assert saved["a"]["activations"] == saved["d"]["activations"]
    assert res["mixed_layers"] == len(SPACE.slots()) == len(res["choices"])


def test_arch_step_keeps_the_benchmarks_architecture(bench):
    choices = bench.sample_choices(SPACE)
    case = bench.build_case(SPACE, 4, choices, channels_last=True)
    before = [a.detach().clone() for a in case.net.arch_parameters()]
    for _ in range(2):  # step() raises if the pair drawn differs from `choices`
        bench.prepare(case, "b")
        bench.step(case, "b")
    assert any(not torch.equal(a, b) for a, b in zip(case.net.arch_parameters(), before))  # Adam moved alpha
    for v in ("a", "c", "d"):
        bench.prepare(case, v)
        assert torch.isfinite(torch.tensor(bench.step(case, v)))


def test_child_network_has_the_sampled_architecture(bench):
    choices = bench.sample_choices(SPACE)
    case = bench.build_case(SPACE, 4, choices, channels_last=False, variants=("d",))
    assert case.net is None
    n_zero = sum(SPACE.slots()[i].candidates[c] == "zero" for i, c in enumerate(choices))
    fixed = 1  # the space's fixed first block
    assert len(case.child.blocks) == fixed + len(choices) - n_zero


@pytest.mark.slow
def test_rss_subprocess_reports_peak_over_build(bench):
    choices = bench.sample_choices(bench.space_from_preset("small"))
    rss = bench.rss_in_subprocess("small", "d", choices, steps=1)
    assert rss["peak_mib"] >= rss["built_mib"] > 0
    assert rss["delta_mib"] == pytest.approx(rss["peak_mib"] - rss["built_mib"], abs=0.2)
