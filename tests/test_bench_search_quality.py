"""benchmarks/bench_search_quality.py: its statistics on synthetic accuracies (the benchmark itself takes 30 min)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_search_quality")


def test_separability_tells_networks_that_differ_from_seed_noise(bench):
    gen = np.random.default_rng(1)
    apart = [[0.80 + 0.01 * i + e for e in gen.normal(0, 0.002, 2)] for i in range(9)]
    alike = [[0.83 + e for e in gen.normal(0, 0.004, 2)] for _ in range(9)]
    a, b = bench.separability(apart, permutations=999), bench.separability(alike, permutations=999)
    assert a["p_value"] < 0.01 and a["f"] > 20
    assert abs(a["network_sd"] - np.std([0.01 * i for i in range(9)], ddof=1)) < 0.003
    assert b["p_value"] > 0.05 and b["network_sd"] < 0.004
    assert 0.001 < b["seed_sd"] < 0.008


def test_separability_names_a_group_it_cannot_judge(bench):
    with pytest.raises(ValueError, match="2 seeds"):
        bench.separability([[0.8], [0.81]])


def test_matched_summary_reports_each_group_with_its_separability(bench):
    rows = [{"kind": "searched", "searched_for": "pixel1", "name": "03-search-a", "test_acc": 0.85,
             "test_acc_seeds": [0.849, 0.851]}]
    rows += [{"kind": "matched", "searched_for": "pixel1", "name": f"{4 + j:02d}-matched-pixel1-search-a-{j}",
              "test_acc": 0.80 + 0.001 * j, "test_acc_seeds": [0.80 + 0.001 * j - 0.0005, 0.80 + 0.001 * j + 0.0005]}
             for j in range(8)]
    group = bench.matched_summary(pd.DataFrame(rows))["pixel1"][0]
    assert group["random_n"] == 8 and group["searched_rank"] == 1 and group["searched_beats_mean_plus_std"]
    assert group["separability"]["networks"] == 9 and group["separability"]["p_value"] < 0.01
