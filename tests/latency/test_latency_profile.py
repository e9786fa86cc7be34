"""Hardware profiles: lookup order, strict mode, files (YAML and Parquet), bad input, space coverage, and every
shipped profile in ``hardware_profiles/`` against the same schema."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

from proxyless_ray.latency.model import arch_latency, load_latency_model, load_latency_model_for
from proxyless_ray.latency.predictor import fit_linear
from proxyless_ray.latency.profile import (
    REQUIRED_METADATA,
    Entry,
    Profile,
    check_space,
    list_profiles,
    load_profile,
    read_profile,
    space_layers,
)
from proxyless_ray.nn.arch import layer_key
from proxyless_ray.nn.space import SearchSpace, space_from_preset

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "hardware_profiles").glob("*.yaml"))
TINY = SearchSpace(preset="small", resolution=8, widths=(8,), depths=(2,), strides=(1,), kernel_sizes=(3,),
                   exp_ratios=(3,), stem="conv_k3_c8_s1", first_block=None, feature_mix_chs=16)


def _metadata(**kw):
    md = {"device": "cpu", "device_name": "test cpu", "runtime": "pytorch-eager", "runtime_version": "x",
          "batch_size": 1, "threads": 1, "dtype": "float32", "date": "2026-01-01", "method": "measured",
          "source": "unit test", "spaces": [{"fingerprint": TINY.fingerprint()}]}
    md.update(kw)
    return md


def _tiny_profile(strict=False, drop=()) -> Profile:
    entries = {}
    for block, c, r in space_layers(TINY):
        key = layer_key(block, c, r)
        if key not in drop:
            entries[key] = Entry(0.01 * c * r / 8 + 0.02, 0.001, 30)
    return Profile("tiny", _metadata(), entries, fit_linear({k: e.ms for k, e in entries.items()}), strict)


def test_exact_entry_first_then_predictor_then_strict_error():
    prof = _tiny_profile()
    key = layer_key("mb_k3_e3_c8_s1", 8, 8)
    assert prof.lookup("mb_k3_e3_c8_s1", 8, 8) == (prof.entries[key].ms, "exact")
    assert prof.lookup("zero", 8, 8) == (0.0, "zero")
    ms, source = prof.lookup("mb_k5_e6_c8_s1", 8, 16)  # a shape the table does not hold
    assert source == "predicted" and ms > 0
    with pytest.raises(ValueError, match=r"mb_k5_e6_c8_s1@8x16x16.*strict"):
        prof.with_strict().lat_ms("mb_k5_e6_c8_s1", 8, 16)
    assert prof.with_strict().lat_ms("mb_k3_e3_c8_s1", 8, 8) == prof.entries[key].ms
    no_pred = Profile("bare", _metadata(), dict(prof.entries))
    with pytest.raises(ValueError, match="no predictor"):
        no_pred.lat_ms("mb_k5_e6_c8_s1", 8, 16)


def test_expected_latency_term_uses_exact_entries():
    from proxyless_ray.latency.expected import SupernetLatency

    prof = _tiny_profile()
    lat = SupernetLatency(prof, TINY)
    for slot, vec in zip(TINY.slots(), lat.vectors):
        for cand, ms in zip(slot.candidates, vec.tolist()):
            want = 0.0 if cand == "zero" else prof.entries[layer_key(cand, slot.in_chs, slot.resolution)].ms
            assert ms == pytest.approx(want, rel=1e-6), cand
    fixed = sum(prof.entries[lay.key].ms for lay in TINY.fixed_layers())
    assert lat.fixed_ms == pytest.approx(fixed, rel=1e-6)


def test_yaml_round_trip_is_diffable(tmp_path):
    prof = _tiny_profile()
    path = prof.save(tmp_path / "tiny.yaml")
    text = path.read_text()
    assert f'"{layer_key("mb_k3_e3_c8_s1", 8, 8)}": {{ms:' in text  # one entry per line
    back = read_profile(path)
    assert set(back.entries) == set(prof.entries)
    for k, e in prof.entries.items():
        assert back.entries[k].ms == pytest.approx(e.ms, rel=1e-5) and back.entries[k].count == e.count
    assert back.lat_ms("mb_k5_e6_c8_s1", 8, 16) == pytest.approx(prof.lat_ms("mb_k5_e6_c8_s1", 8, 16), rel=1e-4)
    assert back.predictor.stats["mb"].mape == pytest.approx(prof.predictor.stats["mb"].mape, abs=0.01)


def test_large_profile_goes_to_parquet(tmp_path):
    prof = _tiny_profile()
    path = prof.save(tmp_path / "big.yaml", parquet_threshold=2)
    assert (tmp_path / "big.entries.parquet").is_file()
    assert "entries_file: big.entries.parquet" in path.read_text()
    back = read_profile(path)
    assert {k: round(e.ms, 9) for k, e in back.entries.items()} == {k: round(e.ms, 9) for k, e in prof.entries.items()}
    (tmp_path / "big.entries.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="big.entries.parquet"):
        read_profile(path)


def _write(tmp_path, mutate) -> Path:
    d = yaml.safe_load(_tiny_profile().to_yaml())
    mutate(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["entries"].update({"mb_k3_e3_c8_s1@8x8x8": {"ms": -0.5}}), r"mb_k3_e3_c8_s1@8x8x8.*-0.5"),
    (lambda d: d["entries"].update({"mb_k3_e3_c8_s1@8x8x8": {"ms": float("nan")}}), r"mb_k3_e3_c8_s1@8x8x8.*nan"),
    (lambda d: d["entries"].update({"mb_k4_e3_c8_s1@8x8x8": {"ms": 1.0}}), r"mb_k4_e3_c8_s1"),
    (lambda d: d["entries"].update({"conv_k3_c8_s1@8x8x9": {"ms": 1.0}}), r"conv_k3_c8_s1@8x8x9"),
    (lambda d: d["metadata"].update({"device": "tpu"}), r"unknown device 'tpu'"),
    (lambda d: d["metadata"].pop("batch_size"), r"batch_size"),
    (lambda d: d["metadata"].update({"threads": 0}), r"threads.*0"),
    (lambda d: d.update({"version": 7}), r"version 7"),
    (lambda d: d.update({"colour": "red"}), r"colour"),
    (lambda d: d["predictor"]["op_types"]["mb"].update({"coefs": [1, 2]}), r"'mb' have 2 values"),
    (lambda d: d.update({"predictor": None, "entries": {}}), r"neither"),
])
def test_malformed_profiles_name_the_bad_value(tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        read_profile(_write(tmp_path, mutate))


def test_missing_and_unparsable_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_profile(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("metadata: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_profile(tmp_path / "broken.yaml")
    (tmp_path / "hardware_profiles").mkdir()
    _tiny_profile().save(tmp_path / "hardware_profiles" / "my_board.yaml")
    monkeypatch.chdir(tmp_path)
    assert "my_board" in list_profiles()
    assert load_profile("my_board").name == "tiny"
    assert isinstance(load_latency_model("my_board", strict=True), Profile)
    with pytest.raises(FileNotFoundError, match=r"'no_such_board'.*my_board"):
        load_profile("no_such_board")


def test_check_space_reports_coverage_and_rejects_a_mismatch():
    prof = _tiny_profile()
    assert check_space(prof, TINY, strict=True)["n_exact"] == len(space_layers(TINY))
    other = space_from_preset("small")
    report = check_space(prof, other)  # not strict: the predictor prices the rest
    assert report["n_exact"] < report["n_shapes"] and report["missing"]
    with pytest.raises(ValueError, match=rf"search space {other.fingerprint()}.*{TINY.fingerprint()}"):
        check_space(prof, other, strict=True)
    with pytest.raises(ValueError, match="no predictor"):
        check_space(Profile("bare", _metadata(), dict(prof.entries)), other)


def test_loading_for_a_space_checks_coverage(tmp_path, monkeypatch):
    (tmp_path / "hardware_profiles").mkdir()
    _tiny_profile().save(tmp_path / "hardware_profiles" / "tiny_board.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_latency_model_for("tiny_board", TINY, strict=True).name == "tiny"
    assert load_latency_model_for("tiny_board", space_from_preset("small")).strict is False  # predictor prices it
    with pytest.raises(ValueError, match=r"'tiny'.*does not match search space"):
        load_latency_model_for("tiny_board", space_from_preset("small"), strict=True)
    assert load_latency_model_for("flops", TINY).name == "flops"


EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_names_a_profile_that_prices_its_space(path):
    from proxyless_ray.config import load_experiment

    exp = load_experiment(path)
    model = load_latency_model_for(exp.latency.profile, exp.space, strict=exp.latency.strict)
    assert arch_latency(model, exp.space.sample(random.Random(0)))[0] > 0


# -- every shipped profile ---------------------------------------------------------------------------------------


def test_the_shipped_profiles_are_there():
    assert {"cpu_1thread", "cpu_2threads", "pixel1", "v100_roofline"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_schema(path):
    prof = read_profile(path)
    assert prof.name == path.stem
    assert all(k in prof.metadata for k in REQUIRED_METADATA)
    assert prof.predictor is not None, "every shipped profile predicts unseen shapes"
    assert "\t" not in path.read_text()
    if prof.metadata["method"] == "measured":
        assert prof.entries and prof.metadata["spaces"]
        assert all(e.count >= 3 for e in prof.entries.values())
    else:
        assert not prof.entries, "tables from papers must not be copied in: ship fitted constants only"
    for preset in ("small", "proxyless_imagenet"):
        space = space_from_preset(preset)
        for block, c, r in space_layers(space):
            ms = prof.lat_ms(block, c, r)
            assert math.isfinite(ms) and ms > 0, (preset, block, c, r, ms)
        total = arch_latency(prof, space.sample(random.Random(0)))[0]
        assert total > 0


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith("cpu_")], ids=lambda p: p.stem)
def test_shipped_cpu_profiles_cover_the_default_spaces_exactly(path):
    prof = read_profile(path, strict=True)
    for preset in ("small", "proxyless_imagenet"):
        check_space(prof, space_from_preset(preset))  # raises if a preset changed: re-measure (README)


def _latency_cut(prof: Profile, budget: float) -> list[str]:
    """A stand-in for the search: start from the biggest net, repeatedly take the downgrade that saves the most
    latency per MAC given up, until the network fits ``budget`` x its starting latency."""
    from proxyless_ray.latency.flops import layer_cost

    space = space_from_preset("proxyless_imagenet")
    slots = space.slots()
    choice = [max(s.candidates[:-1] if s.has_zero else s.candidates,
                  key=lambda c, s=s: layer_cost(c, s.in_chs, s.resolution).macs) for s in slots]

    def cost(c, s):
        macs = 0.0 if c == "zero" else layer_cost(c, s.in_chs, s.resolution).macs
        return prof.lat_ms(c, s.in_chs, s.resolution), macs

    start = sum(cost(c, s)[0] for c, s in zip(choice, slots))
    while sum(cost(c, s)[0] for c, s in zip(choice, slots)) > budget * start:
        best = None
        for i, s in enumerate(slots):
            lat0, mac0 = cost(choice[i], s)
            for c in s.candidates:
                lat1, mac1 = cost(c, s)
                if lat1 < lat0:
                    score = (lat0 - lat1) / max(mac0 - mac1, 1.0)
                    if best is None or score > best[0]:
                        best = (score, i, c)
        choice[best[1]] = best[2]
    return choice


def test_cpu_gpu_and_mobile_profiles_lead_to_different_networks():
    names = {p.stem for p in SHIPPED}
    if not {"cpu_1thread", "pixel1", "v100_roofline"} <= names:
        pytest.skip("shipped profiles missing")
    nets = {n: _latency_cut(load_profile(n), 0.6) for n in ("cpu_1thread", "pixel1", "v100_roofline")}
    assert nets["cpu_1thread"] != nets["pixel1"] != nets["v100_roofline"] != nets["cpu_1thread"]
    gpu, mobile = load_profile("v100_roofline"), load_profile("pixel1")
    # GPU: large kernels are nearly free, skipping a small late layer saves a lot; mobile: MACs cost.
    assert gpu.lat_ms("mb_k7_e3_c80_s1", 80, 14) / gpu.lat_ms("mb_k3_e3_c80_s1", 80, 14) < 1.1
    assert mobile.lat_ms("mb_k7_e3_c80_s1", 80, 14) / mobile.lat_ms("mb_k3_e3_c80_s1", 80, 14) > 1.15
    assert mobile.lat_ms("mb_k3_e6_c40_s1", 40, 28) / mobile.lat_ms("mb_k3_e3_c40_s1", 40, 28) > 1.6
    assert gpu.lat_ms("mb_k3_e6_c40_s1", 40, 28) / gpu.lat_ms("mb_k3_e3_c40_s1", 40, 28) < 1.4
    assert nets["v100_roofline"].count("zero") > nets["pixel1"].count("zero")
