"""Architecture encoding: block strings, layer keys, network JSON, published-config conversion."""

import json
import os
import sys

import pytest

from proxyless_ray.nn.arch import (
    Arch,
    BlockSpec,
    format_block,
    from_proxyless_config,
    layer_key,
    parse_block,
    parse_layer_key,
)


@pytest.mark.parametrize("text", ["mb_k5_e6_c40_s2", "mb_k3_e1_c16_s1", "mb_k7_e3_c320_s1", "conv_k3_c32_s2",
                                  "conv_k1_c1280_s1", "zero"])
def test_parse_format_round_trip(text):
    assert format_block(parse_block(text)) == text


def test_parse_fields():
    b = parse_block("mb_k5_e6_c40_s2")
    assert (b.kind, b.kernel_size, b.exp_ratio, b.out_chs, b.stride) == ("mb", 5, 6, 40, 2)


@pytest.mark.parametrize("text,fragment", [
    ("mb_k4_e6_c40_s2", "kernel_size must be odd"),
    ("mb_k5_e6_c40_s3", "stride must be 1 or 2"),
    ("sep_k3_c8_s1", "unknown block string 'sep_k3_c8_s1'"),
    ("mb_k5_e0_c40_s1", "exp_ratio"),
    ("mb_k5_e6_c0_s1", "out_chs"),
])
def test_bad_blocks_name_the_value(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_block(text)


def test_zero_needs_stride_one():
    with pytest.raises(ValueError, match="zero op needs stride 1"):
        BlockSpec("zero", stride=2)


def test_layer_key_round_trip():
    key = layer_key("mb_k5_e6_c40_s2", 24, 56)
    assert key == "mb_k5_e6_c40_s2@24x56x56"
    assert parse_layer_key(key) == ("mb_k5_e6_c40_s2", 24, 56)
    with pytest.raises(ValueError, match="invalid layer key"):
        parse_layer_key("mb_k5_e6_c40_s2@24x56x28")


def small_arch(**kw):
    stages = (("mb_k3_e1_c16_s1",), ("mb_k5_e3_c24_s2", "zero", "mb_k3_e6_c24_s1"))
    defaults = dict(stem="conv_k3_c16_s2", stages=stages, feature_mix="conv_k1_c64_s1", num_classes=10, resolution=28,
                    in_chs=1)
    defaults.update(kw)
    return Arch(**defaults)


def test_layers_shapes_chain():
    layers = small_arch().layers()
    assert [(lay.block, lay.in_chs, lay.resolution) for lay in layers] == [
        ("conv_k3_c16_s2", 1, 28), ("mb_k3_e1_c16_s1", 16, 14), ("mb_k5_e3_c24_s2", 16, 14),
        ("zero", 24, 7), ("mb_k3_e6_c24_s1", 24, 7), ("conv_k1_c64_s1", 24, 7), ("fc_c10", 64, 7)]


def test_json_round_trip(tmp_path):
    arch = small_arch(name="x", meta={"latency_ms": 1.5})
    path = tmp_path / "arch.json"
    arch.save(path)
    back = Arch.load(path)
    assert back == arch and back.meta == {"latency_ms": 1.5}
    assert json.loads(path.read_text())["version"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_without_zeros_drops_zero_layers():
    arch = small_arch().without_zeros()
    assert "zero" not in arch.blocks() and len(arch.blocks()) == 3


def test_wrong_version_refused(tmp_path):
    d = small_arch().to_dict()
    d["version"] = 99
    path = tmp_path / "a.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="architecture version 99 is not supported"):
        Arch.load(path)


def test_unknown_field_refused():
    d = small_arch().to_dict()
    d["colour"] = "red"
    with pytest.raises(ValueError, match="unknown architecture field"):
        Arch.from_dict(d)


def test_shapes_that_do_not_chain_refused():
    # 4 stride-2 layers collapse a 2x2 input below one pixel
    with pytest.raises(ValueError, match="too small"):
        small_arch(resolution=2, stages=(("mb_k3_e1_c16_s2", "mb_k3_e1_c16_s2"),))
    cfg = {"first_conv": {"kernel_size": 3, "stride": 2, "in_channels": 3, "out_channels": 32},
           "blocks": [{"mobile_inverted_conv": {"name": "MBInvertedConvLayer", "in_channels": 24, "out_channels": 16,
                                                "kernel_size": 3, "stride": 1, "expand_ratio": 1}}],
           "feature_mix_layer": None, "classifier": {"out_features": 10}}
    with pytest.raises(ValueError, match="in_channels 24 does not chain"):
        from_proxyless_config(cfg)


def test_published_configs_convert(reference):
    arch = Arch.load(reference("proxylessnas", "proxyless_mobile.config"))
    assert arch.stem == "conv_k3_c32_s2" and arch.feature_mix == "conv_k1_c1280_s1"
    assert arch.stages[0] == ("mb_k3_e1_c16_s1",)
    assert len(arch.blocks()) == 22 and arch.num_classes == 1000
    gpu = Arch.load(reference("proxylessnas", "proxyless_gpu.config"))
    assert gpu.blocks().count("zero") == 8


def test_pure_python_no_torch():
    code = "import sys, proxyless_ray.nn.arch, proxyless_ray.nn.space; print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
