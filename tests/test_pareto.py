"""Pareto utilities on hand-checkable point sets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from proxyless_ray.pareto import (
    TABLE_COLUMNS,
    best_within_target,
    hypervolume_2d,
    hypervolume_by_hardware,
    non_dominated_ranks,
    pareto_front_mask,
    pareto_table,
    scalarised_score,
    shared_references,
)

# (acc, lat_ms): A, B, C form the front; D is dominated by B only; E by everything but D... see ranks below.
POINTS = [(0.9, 30.0), (0.8, 20.0), (0.7, 10.0), (0.75, 25.0), (0.6, 40.0)]


def test_ranks_by_hand():
    # D=(0.75, 25) is dominated by B=(0.8, 20); E=(0.6, 40) by A, B, C and D, so it is peeled last.
    assert non_dominated_ranks(POINTS).tolist() == [0, 0, 0, 1, 2]
    assert pareto_front_mask(POINTS).tolist() == [True, True, True, False, False]


def test_senses_flip_the_order():
    # Both objectives minimised: (0.6, 40) no longer loses on accuracy, (0.7, 10) dominates all but (0.6, 40).
    ranks = non_dominated_ranks(POINTS, senses=("min", "min"))
    assert ranks[2] == 0 and ranks[4] == 0
    assert ranks[0] > 0


def test_identical_points_share_a_rank():
    pts = [(0.8, 20.0), (0.8, 20.0), (0.7, 30.0), (0.7, 30.0)]
    assert non_dominated_ranks(pts).tolist() == [0, 0, 1, 1]


def test_equal_in_one_objective_is_still_dominated():
    # Same accuracy, slower: dominated. Same latency, less accurate: dominated.
    assert non_dominated_ranks([(0.8, 20.0), (0.8, 25.0), (0.7, 20.0)]).tolist() == [0, 1, 1]


def test_nan_counts_as_worst():
    nan = float("nan")
    assert non_dominated_ranks([(nan, 50.0), (0.1, 50.0)]).tolist() == [1, 0]
    assert non_dominated_ranks([(0.5, nan), (0.5, 90.0)]).tolist() == [1, 0]
    # Better in the other objective: a NaN accuracy alone does not put a trial behind a slower one.
    assert non_dominated_ranks([(nan, 5.0), (0.1, 50.0)]).tolist() == [0, 0]


def test_ranks_edge_shapes_and_errors():
    assert non_dominated_ranks(np.empty((0, 2))).tolist() == []
    assert non_dominated_ranks([(0.5, 1.0)]).tolist() == [0]
    with pytest.raises(ValueError, match="one sense per objective"):
        non_dominated_ranks(POINTS, senses=("max",))
    with pytest.raises(ValueError, match="'max' or 'min'"):
        non_dominated_ranks(POINTS, senses=("max", "down"))


def test_ranks_match_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(60, 2)).astype(float)  # small integers: many ties
    ranks = non_dominated_ranks(pts, senses=("max", "min"))
    remaining = set(range(len(pts)))
    rank = 0
    while remaining:
        front = {i for i in remaining if not any(
            pts[j, 0] >= pts[i, 0] and pts[j, 1] <= pts[i, 1] and (pts[j] != pts[i]).any() for j in remaining)}
        assert {i for i in remaining if ranks[i] == rank} == front
        remaining -= front
        rank += 1


def test_hypervolume_single_point_is_a_rectangle():
    assert hypervolume_2d([(0.5, 10.0)], reference=(0.0, 20.0)) == pytest.approx(0.5 * 10.0)


def test_hypervolume_staircase_by_hand():
    # Reference (0, 50). A=(0.9,30): 0.9*20 = 18; B=(0.8,20) adds 0.8*10 = 8; C=(0.7,10) adds 0.7*10 = 7.
    # D and E are dominated and add nothing.
    assert hypervolume_2d(POINTS, reference=(0.0, 50.0)) == pytest.approx(33.0)
    assert hypervolume_2d(POINTS[:3], reference=(0.0, 50.0)) == pytest.approx(33.0)


def test_hypervolume_ignores_points_beyond_the_reference_and_duplicates():
    assert hypervolume_2d([(0.5, 60.0), (-0.1, 10.0)], reference=(0.0, 50.0)) == 0.0
    assert hypervolume_2d(np.empty((0, 2)), reference=(0.0, 50.0)) == 0.0
    assert hypervolume_2d([(0.5, 10.0), (0.5, 10.0)], reference=(0.0, 20.0)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="finite"):
        hypervolume_2d(POINTS, reference=(0.0, float("inf")))


def test_scalarised_score():
    assert scalarised_score(0.8, math.e, 0.1) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="latency"):
        scalarised_score(0.8, 0.0, 0.1)


def _results() -> list[dict]:
    out = []
    for i, (acc, lat) in enumerate(POINTS):
        out.append({"trial_id": f"a{i}", "heldout_acc": acc, "expected_latency_ms": lat,
                    "config": {"hardware": "pixel1", "lambda": 0.1 * i}})
    # Another hardware, flattened-config style; its (0.95, 5) would dominate all of pixel1 but is never compared.
    out.append({"trial_id": "g0", "heldout_acc": 0.95, "expected_latency_ms": 5.0, "config/hardware": "gpu",
                "config/beta": 0.6, "config/target_ms": 6.0, "arch": "mb_k3_e3_c16_s1"})
    out.append({"trial_id": "g1", "heldout_acc": 0.5, "expected_latency_ms": 8.0, "config/hardware": "gpu"})
    out.append({"trial_id": "dead", "config": {"hardware": "gpu"}})  # failed before reporting
    return out


def test_pareto_table_per_hardware():
    table = pareto_table(_results())
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == 7  # the trial without metrics is left out
    pixel = table[table.hardware == "pixel1"].set_index("trial_id")
    assert pixel["rank"].to_dict() == {"a0": 0, "a1": 0, "a2": 0, "a3": 1, "a4": 2}
    assert pixel.loc["a3", "lambda"] == pytest.approx(0.3)
    gpu = table[table.hardware == "gpu"].set_index("trial_id")
    assert gpu["on_front"].to_dict() == {"g0": True, "g1": False}
    assert gpu.loc["g0", "beta"] == 0.6 and gpu.loc["g0", "arch"] == "mb_k3_e3_c16_s1"
    assert pd.isna(gpu.loc["g1", "beta"]) and pd.isna(gpu.loc["g1", "arch"])
    # Sorted by hardware, rank, then latency.
    assert table.trial_id.tolist() == ["g0", "g1", "a2", "a1", "a0", "a3", "a4"]


def test_pareto_table_needs_hardware_and_handles_empty():
    with pytest.raises(ValueError, match="'hardware'"):
        pareto_table([{"heldout_acc": 0.5, "expected_latency_ms": 1.0}])
    assert list(pareto_table([]).columns) == list(TABLE_COLUMNS)


def test_best_within_target():
    table = pareto_table(_results())
    assert best_within_target(table, "pixel1", 25.0)["trial_id"] == "a1"  # D=(0.75, 25) is dominated by a1
    assert best_within_target(table, "pixel1", 30.0)["trial_id"] == "a0"
    assert best_within_target(table, "pixel1", 10.0)["trial_id"] == "a2"  # inclusive budget
    assert best_within_target(table, "pixel1", 9.9) is None
    assert best_within_target(table, "gpu", 100.0)["trial_id"] == "g0"
    with pytest.raises(ValueError, match="no trials for hardware 'cpu'"):
        best_within_target(table, "cpu", 10.0)


def test_best_within_target_tie_prefers_lower_latency_then_trial_id():
    rows = [{"trial_id": t, "hardware": "hw", "heldout_acc": 0.8, "expected_latency_ms": 10.0} for t in ("b", "a")]
    assert best_within_target(pareto_table(rows), "hw", 10.0)["trial_id"] == "a"


def test_hypervolume_by_hardware_with_shared_references():
    table = pareto_table(_results())
    hv = hypervolume_by_hardware(table).set_index("hardware")
    assert hv.loc["pixel1", "lat_ref"] == pytest.approx(44.0)  # 1.1 x 40 ms
    assert hv.loc["pixel1", "hypervolume"] == pytest.approx(0.9 * 14 + 0.8 * 10 + 0.7 * 10)
    assert hv.loc["pixel1", "n_front"] == 3 and hv.loc["pixel1", "n_trials"] == 5
    # A second sweep with a slower trial widens the shared reference; both tables are scored against it.
    other = pareto_table([{"trial_id": "x", "hardware": "pixel1", "heldout_acc": 0.5, "expected_latency_ms": 100.0}])
    refs = shared_references(table, other)
    assert refs["pixel1"] == pytest.approx((0.0, 110.0))
    assert refs["gpu"] == pytest.approx((0.0, 8.8))
    assert hypervolume_by_hardware(other, refs).hypervolume.iloc[0] == pytest.approx(0.5 * 10)
    with pytest.raises(ValueError, match="no reference point for hardware 'gpu'"):
        hypervolume_by_hardware(table, {"pixel1": (0.0, 50.0)})
    assert isinstance(hypervolume_by_hardware(pareto_table([])), pd.DataFrame)
