"""Latency predictors: NNLS, per-op-type linear fits with fit error, calibration, the analytic roofline."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from proxyless_ray.latency.predictor import (
    FEATURES,
    RooflinePredictor,
    calibrate,
    features,
    fit_linear,
    nnls,
    op_type,
    predictor_from_dict,
)
from proxyless_ray.latency.profile import space_layers
from proxyless_ray.nn.arch import Arch, layer_key
from proxyless_ray.nn.space import space_from_preset

TRUE = {"mb": (0.02, 0.08, 0.3, 0.1, 0.01), "mb_e1": (0.03, 0.1, 0.2, 0.0, 0.02), "conv": (0.05, 0.0, 0.5, 0.2, 0.03),
        "conv1x1": (0.02, 0.0, 0.3, 0.2, 0.01),
        "fc": (0.01, 0.0, 0.1, 0.1, 0.005)}


def _synthetic(spaces=("small", "proxyless_imagenet"), noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    layers = space_layers([space_from_preset(s) for s in spaces])
    return {layer_key(*t): float(np.dot(TRUE[op_type(t[0])], features(*t)) * (1 + noise * rng.standard_normal()))
            for t in layers}


def test_nnls_matches_least_squares_when_unconstrained_and_clips_otherwise():
    rng = np.random.default_rng(1)
    a = rng.random((30, 3))
    x_true = np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(nnls(a, a @ x_true), x_true, rtol=1e-8)
    b = a @ np.array([1.0, -2.0, 0.5])  # the unconstrained optimum has a negative weight
    x = nnls(a, b)
    assert (x >= 0).all() and x[1] == 0
    assert np.linalg.norm(a @ x - b) <= np.linalg.norm(a @ np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0, None) - b)


def test_fit_linear_recovers_per_type_coefficients():
    entries = _synthetic()
    pred = fit_linear(entries)
    assert pred.basis["mb"] == "fit"
    for key, ms in entries.items():
        block, rest = key.split("@")
        c, h, _ = (int(v) for v in rest.split("x"))
        if pred.basis[op_type(block)] == "fit":
            assert pred.lat_ms(block, c, h) == pytest.approx(ms, rel=0.02), key
    assert pred.stats["mb"].mape < 1 and pred.stats["mb"].loo_mape < 1


def test_fit_error_is_stored_and_honest_with_noise():
    pred = fit_linear(_synthetic(noise=0.1, seed=3))
    st = pred.stats["mb"]
    assert 3 < st.mape < 15  # 10 % noise cannot be fitted away
    assert st.loo_mape >= st.mape  # held-out error is never better than in-sample
    d = pred.to_dict()
    assert d["op_types"]["mb"]["fit"]["mape_pct"] == pytest.approx(st.mape, abs=0.01)
    assert d["op_types"]["mb"]["fit"]["n"] == st.n


def test_type_with_few_entries_scales_the_pooled_model():
    entries = _synthetic(spaces=("small",))
    pred = fit_linear(entries)
    assert pred.basis["conv"] == "scaled-pooled"  # two convs in the small space: too few for their own fit
    pooled, conv = np.array(pred.coefs["pooled"]), np.array(pred.coefs["conv"])
    ratio = conv[pooled > 0] / pooled[pooled > 0]
    np.testing.assert_allclose(ratio, ratio[0])


def test_predictions_positive_and_grow_with_the_layer():
    pred = fit_linear(_synthetic(noise=0.05))
    for block in ("mb_k3_e3_c40_s1", "mb_k7_e6_c40_s1", "conv_k1_c256_s1", "fc_c10", "mb_k3_e1_c40_s1"):
        small, big = pred.lat_ms(block, 40, 7), pred.lat_ms(block, 40, 28)
        assert 0 < small < big, block
    assert pred.lat_ms("mb_k3_e3_c40_s1", 40, 14) < pred.lat_ms("mb_k3_e6_c40_s1", 40, 14)
    with pytest.raises(ValueError, match="zero"):
        pred.lat_ms("zero", 40, 14)


def test_round_trip_and_bad_coefficients():
    pred = fit_linear(_synthetic(noise=0.05))
    back = predictor_from_dict(pred.to_dict())
    assert back.lat_ms("mb_k5_e6_c80_s2", 40, 28) == pytest.approx(pred.lat_ms("mb_k5_e6_c80_s2", 40, 28), rel=1e-5)
    bad = pred.to_dict()
    bad["op_types"]["mb"]["coefs"][0] = -1.0
    with pytest.raises(ValueError, match=r"'mb'.*>= 0"):
        predictor_from_dict(bad)
    bad["op_types"]["mb"]["coefs"][0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        predictor_from_dict(bad)
    with pytest.raises(ValueError, match="unknown predictor kind 'magic'"):
        predictor_from_dict({"kind": "magic"})
    with pytest.raises(ValueError, match="latency -0.5"):
        fit_linear({"mb_k3_e3_c24_s1@24x14x14": -0.5})
    with pytest.raises(ValueError, match="latency nan"):
        fit_linear({"mb_k3_e3_c24_s1@24x14x14": float("nan")})
    assert len(FEATURES) == len(pred.coefs["mb"])


def test_calibrate_matches_the_published_total_and_keeps_shape():
    pred = fit_linear(_synthetic(noise=0.05))
    arch = space_from_preset("proxyless_imagenet").sample(random.Random(0), name="probe")
    cal = calibrate(pred, arch, 50.0, "a paper")
    total = sum(cal.lat_ms(lay.block, lay.in_chs, lay.resolution) for lay in arch.layers() if lay.block != "zero")
    assert total == pytest.approx(50.0, rel=1e-9)
    ratio = cal.lat_ms("mb_k3_e3_c40_s1", 40, 28) / pred.lat_ms("mb_k3_e3_c40_s1", 40, 28)
    assert ratio == pytest.approx(cal.scale) and cal.calibration["network"] == "probe"
    assert predictor_from_dict(cal.to_dict()).scale == pytest.approx(cal.scale, rel=1e-5)
    with pytest.raises(ValueError, match="-3"):
        calibrate(pred, arch, -3.0, "x")


V100 = dict(peak_tflops=15.7, compute_efficiency=0.6, bandwidth_gbs=750.0, launch_us=5.0, batch_size=8)


def test_roofline_launch_overhead_dominates_small_layers_and_large_kernels_are_cheap():
    gpu = RooflinePredictor(**V100)
    for block, in_chs, res in (("mb_k3_e3_c64_s1", 64, 4), ("mb_k5_e6_c80_s1", 80, 7)):
        fixed = len(gpu.kernels(block, in_chs, res)) * V100["launch_us"] * 1e-3
        assert fixed / gpu.lat_ms(block, in_chs, res) > 0.7, block  # launches, not work, set the price
    big = gpu.lat_ms("mb_k3_e6_c24_s2", 16, 112)
    assert len(gpu.kernels("mb_k3_e6_c24_s2", 16, 112)) * V100["launch_us"] * 1e-3 / big < 0.3
    assert gpu.lat_ms("mb_k7_e3_c40_s1", 40, 28) / gpu.lat_ms("mb_k3_e3_c40_s1", 40, 28) < 1.15
    assert gpu.lat_ms("mb_k3_e6_c24_s1", 24, 56) > gpu.lat_ms("mb_k3_e3_c24_s1", 24, 56)
    big_batch = RooflinePredictor(**{**V100, "batch_size": 64}).lat_ms("mb_k3_e6_c24_s1", 24, 56)
    assert gpu.lat_ms("mb_k3_e6_c24_s1", 24, 56) < big_batch < 8 * gpu.lat_ms("mb_k3_e6_c24_s1", 24, 56)
    assert gpu.lat_ms("zero", 40, 14) == 0.0
    back = predictor_from_dict(gpu.to_dict())
    assert back.lat_ms("fc_c1000", 1280, 7) == pytest.approx(gpu.lat_ms("fc_c1000", 1280, 7))
    with pytest.raises(ValueError, match="compute_efficiency"):
        RooflinePredictor(**{**V100, "compute_efficiency": 1.5})
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        RooflinePredictor(**{**V100, "bandwidth_gbs": -1})


def test_fit_on_the_published_pixel1_table_generalises(reference):
    from proxyless_ray.latency.importers import import_table

    profile, _ = import_table(reference("proxylessnas", "mobile_trim.yaml"))
    st = profile.predictor.stats["mb"]
    assert st.n >= 60 and st.loo_mape < 10, st  # held-out error on MBConv entries
    mobile = Arch.load(reference("proxylessnas", "proxyless_mobile.config"))
    pred_only = sum(profile.predictor.lat_ms(lay.block, lay.in_chs, lay.resolution)
                    for lay in mobile.layers() if lay.block != "zero")
    exact = sum(profile.lat_ms(lay.block, lay.in_chs, lay.resolution) for lay in mobile.layers())
    assert math.isclose(pred_only, exact, rel_tol=0.1)
