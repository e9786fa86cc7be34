"""Importers for published latency tables (ProxylessNAS mobile_trim.yaml, Once-for-All *_lookup_table.yaml).

Synthetic tables use made-up numbers in the published key formats; the real tables are read from
``../shared/reference`` (conftest's ``reference`` fixture) and never copied into the project.
"""

from __future__ import annotations

import pytest
import yaml

from proxyless_ray import cli
from proxyless_ray.latency.importers import UnparsedKeysError, convert_key, convert_table, import_table
from proxyless_ray.latency.model import arch_latency
from proxyless_ray.latency.profile import read_profile
from proxyless_ray.nn.arch import Arch

PNAS = {
    "Conv-input:32x32x3-output:16x16x32": {"count": 10, "mean": 1.5, "var": 0.04},
    "Conv_1-input:4x4x64-output:4x4x256": {"count": 10, "mean": 0.4, "var": 0.01},
    "Logits-input:4x4x256-output:10": {"count": 10, "mean": 0.05, "var": 0.0},
    "expanded_conv-input:16x16x32-output:16x16x16-expand:1-kernel:3-stride:1-idskip:0": {"count": 5, "mean": 0.9,
                                                                                          "var": 0.01},
    "expanded_conv-input:16x16x16-output:8x8x24-expand:6-kernel:5-stride:2-idskip:0": {"count": 5, "mean": 1.2,
                                                                                        "var": 0.01},
    "expanded_conv-input:8x8x24-output:8x8x24-expand:3-kernel:7-stride:1-idskip:1": {"count": 5, "mean": 0.7,
                                                                                       "var": 0.01},
}


def _ofa(mean=1.0):
    return {
        "Conv-input:32x32x3-output:16x16x24": {"count": 3, "mean": 0.9, "std": 0.01},
        "AvgPool2D-input:4x4x96-output:1x1x96": {"count": 3, "mean": 0.01, "std": 0.0},
        "Conv_2-input:1x1x96-output:1x1x128": {"count": 3, "mean": 0.1, "std": 0.0},
        "Logits-input:1x1x128-output:10": {"count": 3, "mean": 0.05, "std": 0.0},
        "expanded_conv-input:16x16x24-output:8x8x32-expand:144-kernel:3-stride:2-idskip:0-se:0-hs:0": {
            "count": 3, "mean": mean, "std": 0.02},
        "expanded_conv-input:8x8x32-output:8x8x32-expand:128-kernel:5-stride:1-idskip:1-se:1-hs:0": {
            "count": 3, "mean": 0.8, "std": 0.02},
        "expanded_conv-input:8x8x32-output:8x8x32-expand:100-kernel:5-stride:1-idskip:1-se:0-hs:0": {
            "count": 3, "mean": 0.8, "std": 0.02},
    }


def test_proxylessnas_keys_become_layer_keys():
    res = convert_table(PNAS, "auto", "pnas")
    assert res.fmt == "proxylessnas" and not res.skipped
    assert set(res.entries) == {"conv_k3_c32_s2@3x32x32", "conv_k1_c256_s1@64x4x4", "fc_c10@256x4x4",
                                "mb_k3_e1_c16_s1@32x16x16", "mb_k5_e6_c24_s2@16x16x16", "mb_k7_e3_c24_s1@24x8x8"}
    e = res.entries["mb_k5_e6_c24_s2@16x16x16"]
    assert (e.ms, e.spread, e.count) == (1.2, pytest.approx(0.1), 5)


def test_ofa_expanded_channels_become_ratios_and_unrepresentable_keys_are_reported():
    res = convert_table(_ofa(), "auto", "ofa")
    assert res.fmt == "ofa"
    assert "mb_k3_e6_c32_s2@24x16x16" in res.entries  # 144 expanded channels / 24 = ratio 6
    assert "fc_c10@128x1x1" in res.entries and "conv_k3_c24_s2@3x32x32" in res.entries
    reasons = res.skipped
    assert len(reasons) == 4
    assert "squeeze-excite" in reasons["expanded_conv-input:8x8x32-output:8x8x32-expand:128-kernel:5-stride:1-idskip:1"
                                       "-se:1-hs:0"]
    assert "not a multiple" in reasons["expanded_conv-input:8x8x32-output:8x8x32-expand:100-kernel:5-stride:1"
                                       "-idskip:1-se:0-hs:0"]
    assert "pooling" in reasons["AvgPool2D-input:4x4x96-output:1x1x96"]
    assert "after global pooling" in reasons["Conv_2-input:1x1x96-output:1x1x128"]


def test_inconsistent_idskip_is_skipped_with_the_reason():
    with pytest.raises(ValueError, match="idskip:0 disagrees"):
        convert_key("expanded_conv-input:8x8x24-output:8x8x24-expand:3-kernel:3-stride:1-idskip:0", "proxylessnas")
    with pytest.raises(ValueError, match="stride 2 does not give"):
        convert_key("expanded_conv-input:8x8x24-output:8x8x24-expand:3-kernel:3-stride:2-idskip:0", "proxylessnas")


def test_unparseable_keys_are_counted_and_listed():
    table = dict(PNAS)
    table["expanded_conv-input:8x8-output:8x8x24"] = {"mean": 1.0}
    table["Pooling-whatever"] = {"mean": 1.0}
    with pytest.raises(UnparsedKeysError, match=r"2 of 8 keys do not parse") as err:
        convert_table(table, "auto", "t.yaml")
    assert set(err.value.keys) == {"expanded_conv-input:8x8-output:8x8x24", "Pooling-whatever"}
    assert "Pooling-whatever" in str(err.value)


@pytest.mark.parametrize("mean", [-1.0, float("nan"), "fast"])
def test_bad_latency_values_name_the_key(mean):
    key = "expanded_conv-input:16x16x24-output:8x8x32-expand:144-kernel:3-stride:2-idskip:0-se:0-hs:0"
    with pytest.raises(ValueError, match=rf"{key}.*{mean}"):
        convert_table(_ofa(mean), "auto", "t")


def test_import_cli_writes_a_profile_and_fails_cleanly(tmp_path, capsys):
    table = tmp_path / "pnas.yaml"
    table.write_text(yaml.safe_dump(PNAS))
    out = tmp_path / "board.yaml"
    assert cli.main(["import-profile", str(table), "-o", str(out), "--device-name", "Test Board"]) == 0
    prof = read_profile(out)
    assert prof.metadata["device_name"] == "Test Board" and len(prof.entries) == 6
    assert prof.lat_ms("mb_k7_e3_c24_s1", 24, 8) == 0.7
    bad = dict(PNAS)
    bad["Conv-input:32x32x3-output:16x16x32"] = {"count": 1, "mean": float("nan")}
    table.write_text(yaml.safe_dump(bad))
    out2 = tmp_path / "bad.yaml"
    assert cli.main(["import-profile", str(table), "-o", str(out2)]) == 2
    assert "Conv-input:32x32x3-output:16x16x32" in capsys.readouterr().err
    assert not out2.exists() and not list(tmp_path.glob(".tmp-*"))
    assert cli.main(["import-profile", str(tmp_path / "missing.yaml"), "-o", str(out2)]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_published_proxylessnas_table_imports_completely(reference):
    prof, res = import_table(reference("proxylessnas", "mobile_trim.yaml"))
    assert res.fmt == "proxylessnas" and len(res.entries) == res.total == 72 and not res.skipped
    mobile = Arch.load(reference("proxylessnas", "proxyless_mobile.config"))
    total, per_layer = arch_latency(prof, mobile)
    predicted = [lay.key for lay, _ in per_layer if lay.block != "zero" and lay.key not in prof.entries]
    assert len(predicted) == 3  # the width-32 blocks the table (width 24) does not hold
    assert 70 < total < 100  # published: 78 ms; isolated per-layer tables overstate a little


def test_published_ofa_table_imports_with_se_and_hswish_reported(reference):
    prof, res = import_table(reference("ofa", "note10_224_lookup_table.yaml"))
    assert res.fmt == "ofa" and res.entries
    assert len(res.entries) + len(res.skipped) == res.total
    assert all("-se:1" in k or "-hs:1" in k or k.startswith(("AvgPool2D", "Conv_2")) for k in res.skipped)
    assert all(k.startswith(("mb_", "conv_", "fc_")) for k in prof.entries)
    assert prof.predictor.stats["pooled"].n == len(res.entries)


def test_latency_command_prices_a_published_network_config(capsys, reference):
    import json

    config = reference("proxylessnas", "proxyless_mobile.config")
    assert cli.main(["latency", "--profile", "pixel1", "--arch", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["total_ms"] / 78.0 - 1) <= 0.10  # published: 78 ms on a Pixel 1
    assert report["counts"]["predicted"] > 0 and report["counts"]["zero"] == 2
    assert cli.main(["latency", "--profile", "pixel1", "--arch", str(config), "--strict"]) == 2
    assert "strict" in capsys.readouterr().err
