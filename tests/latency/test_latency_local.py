"""Device fingerprints, the ``cpu_local`` cache, strict refusal, ``latency --check`` and the predicted-vs-measured
outputs. Measuring is kept to a tiny space (a few cover networks of 8-px layers: seconds)."""

from __future__ import annotations

import io
import json
import os
import threading

import pandas as pd
import pytest
import yaml

from proxyless_ray import cli
from proxyless_ray.latency import local
from proxyless_ray.latency.check import CheckRow, fit_scale, measure_network, measure_networks
from proxyless_ray.latency.fingerprint import (
    ISA_FLAGS,
    FingerprintMismatch,
    check_machine,
    cpu_fingerprint,
    differences,
    fingerprint_id,
    machine_note,
)
from proxyless_ray.latency.profile import Entry, Profile, load_profile, profile_from_text, read_profile
from proxyless_ray.latency.profiler import ProfilerSettings, profile_spaces
from proxyless_ray.nn.space import SearchSpace

from conftest import tiny_experiment

TINY = SearchSpace(preset="small", resolution=8, widths=(8,), depths=(2,), strides=(1,), kernel_sizes=(3,),
                   exp_ratios=(3,), stem="conv_k3_c8_s1", first_block=None, feature_mix_chs=16)
TINY_DICT = {"preset": "small", "resolution": 8, "widths": [8], "depths": [2], "strides": [1], "kernel_sizes": [3],
             "exp_ratios": [3], "stem": "conv_k3_c8_s1", "first_block": None, "feature_mix_chs": 16}
FAST = ProfilerSettings(warmup=1, repeats=3, min_time_s=0.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder: tests never touch the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "proxyless_ray" / "profiles"


@pytest.fixture(scope="module")
def tiny_profile():
    return profile_spaces([TINY], FAST, "tiny_here", progress=False)


def _foreign(profile: Profile, **changes) -> Profile:
    md = dict(profile.metadata)
    md["fingerprint"] = {**md["fingerprint"], **changes}
    return Profile(profile.name, md, profile.entries, profile.predictor)


# -- fingerprints --------------------------------------------------------------------------------------------------


def test_fingerprint_compare_names_what_differs():
    here = cpu_fingerprint(2)
    assert here["device"] == "cpu" and here["threads"] == 2 and here["model"] and here["torch"]
    assert differences(here, here) == []
    # a flag this machine lacks (which flags it has depends on the CI machine's CPU), and one it has
    absent = next(f for f in (*ISA_FLAGS, "made_up_isa") if f not in here["isa"])
    other = {**here, "model": "Intel(R) Xeon(R) Platinum 8375C", "isa": [*here["isa"], absent], "threads": 1}
    diff = differences(other, here)
    assert any(d.startswith("model: 'Intel(R) Xeon(R) Platinum 8375C'") for d in diff)
    assert f"isa: -{absent}" in diff and "threads: 1 -> 2" in diff
    if here["isa"]:
        assert differences({**here, "isa": here["isa"][1:]}, here) == [f"isa: +{here['isa'][0]}"]
    # recorded for the reader, not compared: core count, OS
    assert differences({**here, "logical_cores": 64, "os": "x"}, here) == []
    assert fingerprint_id({**here, "logical_cores": 64}) == fingerprint_id(here) != fingerprint_id(other)
    assert differences({"known": False, "note": "dev VM"}, here) == ["unknown machine (dev VM)"]
    gpu = {"device": "gpu", "gpu_name": "NVIDIA H200", "driver": "550.1", "cuda": "13.0", "torch": "2.14",
           "torch_build": "b"}
    assert differences(gpu, {**gpu, "driver": "560.2"}) == ["driver: '550.1' -> '560.2'"]
    assert differences(gpu, here) == ["device: gpu -> cpu"]
    md = {"device": "gpu", "device_name": "NVIDIA H200", "runtime": "pytorch-eager", "runtime_version": "2.14",
          "batch_size": 8, "threads": 1, "dtype": "float32", "date": "d", "method": "measured", "source": "s",
          "fingerprint": gpu}
    gpu_profile = Profile("h200", md, {"conv_k3_c8_s1@1x8x8": Entry(0.1)})
    with pytest.MonkeyPatch.context() as mp:  # a CPU-only machine: the GPU profile differs in device
        mp.setattr("torch.cuda.is_available", lambda: False)
        assert "device: gpu -> cpu" in machine_note(gpu_profile)


def test_measured_profiles_record_the_machine(tiny_profile):
    assert tiny_profile.metadata["fingerprint"] == cpu_fingerprint(1)
    assert machine_note(tiny_profile) is None
    again = read_profile_roundtrip(tiny_profile)
    assert again.metadata["fingerprint"] == tiny_profile.metadata["fingerprint"]


def read_profile_roundtrip(profile: Profile) -> Profile:
    return profile_from_text(profile.to_yaml(), "roundtrip")


def test_notes_for_foreign_unrecorded_and_analytic_profiles(tiny_profile):
    note = machine_note(_foreign(tiny_profile, model="Other CPU 9000"))
    assert "measured on another machine" in note and "model: 'Other CPU 9000'" in note and "cpu_local" in note
    for name in ("cpu_1thread", "cpu_2threads"):  # shipped: measured where ISA flags were not recorded
        assert "unrecorded machine" in machine_note(load_profile(name))
    assert "is analytic" in machine_note(load_profile("v100_roofline"))
    assert "not measured on a machine" in machine_note(load_profile("pixel1"))


def test_strict_refuses_a_foreign_measured_profile_but_not_an_analytic_one(tiny_profile):
    foreign = _foreign(tiny_profile, isa=[])
    out = io.StringIO()
    assert "isa: " in check_machine(foreign, stream=out) and out.getvalue().count("\n") == 1  # one line
    with pytest.raises(FingerprintMismatch, match="latency.strict"):
        check_machine(foreign, strict=True, stream=out)
    assert check_machine(tiny_profile, strict=True) is None
    assert "analytic" in check_machine(load_profile("v100_roofline"), strict=True, stream=out)


def test_strict_search_refuses_before_training(tmp_path, tiny_profile):
    from proxyless_ray.distributed.trainer import run_local

    path = tmp_path / "foreign.yaml"
    _foreign(tiny_profile, model="Other CPU 9000").save(path)
    exp = tiny_experiment(tmp_path, space=TINY_DICT, latency={"profile": str(path), "strict": True})
    with pytest.raises(FingerprintMismatch, match="Other CPU 9000"):
        run_local(exp)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


# -- cpu_local: cache ----------------------------------------------------------------------------------------------


def test_local_names():
    assert local.local_threads("cpu_local") == 1 and local.local_threads("cpu_local_2threads") == 2
    assert local.local_threads("cpu_2threads") is None and not local.is_local("cpu_localx")


def test_cpu_local_measures_once_then_reuses_the_cache(cache, monkeypatch):
    out = io.StringIO()
    first = local.local_profile("cpu_local", TINY, progress=False, stream=out, settings=FAST)
    path = local.cache_path(cpu_fingerprint(1), TINY, 1)
    assert path.is_file() and path.parent == cache and "measuring this CPU" in out.getvalue()
    assert first.name == "cpu_local" and first.metadata["fingerprint"] == cpu_fingerprint(1)

    def no_measuring(*a, **k):
        raise AssertionError("measured again although the cache holds this machine's profile")

    monkeypatch.setattr(local, "profile_spaces", no_measuring)
    again = local.local_profile("cpu_local", TINY, progress=False, stream=out)
    assert again.entries == first.entries
    assert local.local_profile("cpu_local", None).entries == first.entries  # no space: the newest cached one
    with pytest.raises(ValueError, match="no profile of this CPU is cached"):
        local.local_profile("cpu_local_2threads", None)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2] + "\n  ]]:", "corrupt"),
    (lambda text: text.replace("model: ", "model: Other CPU 9000 #"), "another machine"),
])
def test_corrupt_or_foreign_cache_entries_are_measured_again(cache, damage, message):
    local.local_profile("cpu_local", TINY, progress=False, settings=FAST, stream=io.StringIO())
    path = local.cache_path(cpu_fingerprint(1), TINY, 1)
    path.write_text(damage(path.read_text()))
    out = io.StringIO()
    prof = local.local_profile("cpu_local", TINY, progress=False, settings=FAST, stream=out)
    assert message in out.getvalue() and "measuring again" in out.getvalue()
    assert read_profile(path).metadata["fingerprint"] == cpu_fingerprint(1) == prof.metadata["fingerprint"]


def test_cache_writes_are_atomic_and_concurrent_users_measure_once(cache, monkeypatch):
    import proxyless_ray.nn.arch as arch_mod

    real_replace = os.replace

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(arch_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        local.local_profile("cpu_local", TINY, progress=False, settings=FAST, stream=io.StringIO())
    monkeypatch.setattr(arch_mod.os, "replace", real_replace)
    assert [p.name for p in cache.iterdir() if p.suffix == ".yaml"] == []  # nothing half-written, no temp left
    calls = []
    real = local.profile_spaces

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(local, "profile_spaces", counting)
    results: list[Profile] = []
    workers = [threading.Thread(target=lambda: results.append(local.local_profile(
        "cpu_local", TINY, progress=False, settings=FAST, stream=io.StringIO()))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2 and results[0].entries == results[1].entries


def test_profile_quick_fills_the_cache_and_latency_reads_it(cache, tmp_path, capsys, monkeypatch):
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump({"name": "tiny", "space": TINY_DICT}))
    assert cli.main(["profile", "--quick", "--space", str(exp), "--no-progress", "--min-time", "0",
                     "--rounds", "1", "--repeats", "3"]) == 0
    assert "cpu_local" in capsys.readouterr().out
    written = read_profile(local.cache_path(cpu_fingerprint(1), TINY, 1))
    md = written.metadata
    assert md["statistic"] == "median" and md["settings"]["warmup"] == local.QUICK["warmup"] and md["clock"] == "thread"
    assert md["settings"]["max_repeats"] == local.QUICK["max_repeats"]  # the cap that would cut its windows short
    monkeypatch.setattr(local, "profile_spaces", lambda *a, **k: pytest.fail("measured again"))
    arch = tmp_path / "a.json"
    TINY.arch_from_choices([0, 1], name="a").save(arch)
    assert cli.main(["latency", "--profile", "cpu_local", "--space", str(exp), "--arch", str(arch), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"] == "cpu_local" and report["machine_note"] is None and report["counts"]["exact"] > 0


def test_sweep_resolves_cpu_local_once_and_workers_take_the_driver_profile(cache, tmp_path, monkeypatch):
    from proxyless_ray.distributed.ray_trainer import worker_target
    from proxyless_ray.sweeps.sweep import resolve_targets

    monkeypatch.setattr(local, "QUICK", {**local.QUICK, "min_time_s": 0.0, "repeats": 3, "rounds": 1})
    exp = tiny_experiment(tmp_path, space=TINY_DICT, sweep={"hardware": ["cpu_local", "pixel1"], "lambdas": [1.0]})
    targets = resolve_targets(exp)
    assert set(targets) == {"cpu_local", "pixel1"} and targets["pixel1"].text is None
    assert targets["cpu_local"].kind == "measured" and targets["cpu_local"].fingerprint
    monkeypatch.setattr(local, "profile_spaces", lambda *a, **k: pytest.fail("a trial measured cpu_local again"))
    monkeypatch.setattr(local, "cpu_fingerprint", lambda *a: pytest.fail("a trial looked into its own cache"))
    texp = tiny_experiment(tmp_path, space=TINY_DICT, latency={"profile": "cpu_local"})
    target = worker_target(texp, {"latency_profile": targets["cpu_local"].text}, 0, "Ray node test")
    assert target.name == "cpu_local" and target.model.entries


# -- latency --check / --calibrate ---------------------------------------------------------------------------------


def test_fit_scale_and_its_error():
    rows = [CheckRow(f"n{i}", 2.0 * m, m, 0.0, 5) for i, m in enumerate((1.0, 2.0, 4.0))]
    fit = fit_scale(rows)
    assert fit.scale == pytest.approx(0.5) and fit.mape_before == pytest.approx(100.0)
    assert fit.mape_after == pytest.approx(0.0, abs=1e-9) and fit.loo_mape == pytest.approx(0.0, abs=1e-9)
    noisy = fit_scale([CheckRow("a", 1.0, 1.0, 0, 1), CheckRow("b", 1.0, 2.0, 0, 1)])
    assert 1.0 < noisy.scale < 2.0 and noisy.loo_mape is None and noisy.mape_after > 0
    with pytest.raises(ValueError, match="at least one"):
        fit_scale([])


def test_measure_networks_times_each_network_in_interleaved_rounds():
    archs = [TINY.arch_from_choices(list(c), name=f"n{i}") for i, c in enumerate(([0, 0], [1, 1]))]
    out = measure_networks(archs, repeats=12, min_time_s=0.0, warmup=1, clock="thread", rounds=4)
    assert len(out) == 2 and all(m["count"] == 12 and m["rounds"] == 4 and m["ms"] > 0 for m in out)
    assert all(m["clock"] == "thread" and m["statistic"] == "median" for m in out)
    one = measure_network(archs[0], repeats=5, min_time_s=0.0, warmup=1)
    assert one["count"] == 5 and one["rounds"] == 1
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure_networks(archs, rounds=0)
    with pytest.raises(ValueError, match="1 networks for 2 architectures"):
        measure_networks(archs, nets=[None])


def test_latency_check_and_calibrate_cli(tmp_path, capsys, tiny_profile):
    prof_path = tmp_path / "tiny.yaml"
    tiny_profile.save(prof_path)
    archs = []
    for i, choices in enumerate(([0, 0], [0, 1], [1, 1])):
        p = tmp_path / f"net{i}.json"
        TINY.arch_from_choices(list(choices), name=f"net{i}").save(p)
        archs.append(str(p))
    out = tmp_path / "calibrated.yaml"
    args = ["latency", "--check", "--profile", str(prof_path), "--arch", *archs, "--min-time", "0.02", "--repeats",
            "5"]
    assert cli.main([*args, "--calibrate", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pred/meas" in text and "net2" in text and "calibration: scale x" in text and "leave-one-out" in text
    cal = read_profile(out)
    scale = cal.metadata["calibration"]["scale"]
    assert f"x{scale:.4f}"[:6] in text
    key = next(iter(tiny_profile.entries))
    assert cal.entries[key].ms == pytest.approx(tiny_profile.entries[key].ms * scale, rel=1e-3)
    assert cal.predictor.scale == pytest.approx(scale, rel=1e-3)
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [n["arch"] for n in report["networks"]] == ["net0", "net1", "net2"]
    assert all(n["ratio"] == pytest.approx(n["predicted_ms"] / n["measured_ms"]) for n in report["networks"])


def test_latency_check_names_exported_networks_by_their_folder(tmp_path, capsys, tiny_profile):
    prof_path = tmp_path / "tiny.yaml"
    tiny_profile.save(prof_path)
    archs = []
    for trial, choices in (("trial-a", [0, 0]), ("trial-b", [1, 1])):
        p = tmp_path / trial / "network" / "arch.json"
        p.parent.mkdir(parents=True)
        TINY.arch_from_choices(choices, name="arch").save(p)  # every exported network is called "arch"
        archs.append(str(p))
    args = ["latency", "--check", "--profile", str(prof_path), "--arch", *archs, "--min-time", "0.02", "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [n["arch"] for n in report["networks"]] == [str(tmp_path / t / "network") for t in ("trial-a", "trial-b")]


@pytest.mark.parametrize("extra, message", [
    (["--calibrate"], "--calibrate needs -o"),
    (["--profile", "pixel1", "--check"], "mobile"),
    ([], "several are for --check"),
])
def test_latency_check_bad_input(tmp_path, capsys, tiny_profile, extra, message):
    prof_path = tmp_path / "tiny.yaml"
    tiny_profile.save(prof_path)
    a = tmp_path / "a.json"
    TINY.arch_from_choices([0, 0], name="a").save(a)
    args = ["latency", "--profile", str(prof_path), "--arch", str(a), str(a)]
    if "--calibrate" in extra:
        args.append("--check")
    assert cli.main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_latency_strict_cli_refuses_a_foreign_profile(tmp_path, capsys, tiny_profile):
    path = tmp_path / "foreign.yaml"
    _foreign(tiny_profile, torch="1.0.0").save(path)
    a = tmp_path / "a.json"
    TINY.arch_from_choices([0, 0], name="a").save(a)
    assert cli.main(["latency", "--profile", str(path), "--arch", str(a)]) == 0
    assert "torch: '1.0.0'" in capsys.readouterr().err
    assert cli.main(["latency", "--profile", str(path), "--arch", str(a), "--strict"]) == 2
    assert "latency.strict" in capsys.readouterr().err


# -- outputs: predicted vs measured ------------------------------------------------------------------------------


def test_ratio_only_where_the_target_is_this_cpu(tiny_profile):
    from proxyless_ray.distributed.retrain import latency_comparison

    measured = {"median_ms": 2.0}
    assert latency_comparison(tiny_profile, 3.0, measured) == {"latency_ratio": 1.5, "latency_note": None}
    mobile = latency_comparison(load_profile("pixel1"), 30.0, measured)
    assert mobile["latency_ratio"] is None and "says nothing" in mobile["latency_note"]
    assert latency_comparison(_foreign(tiny_profile, model="x"), 3.0, measured)["latency_ratio"] is None


def test_demo_table_shows_predicted_and_measured():
    from proxyless_ray.demo import format_demo_table

    rows = [{"trial_id": "cpu_local-add-lam1", "hardware": "cpu_local", "on_front": True, "heldout_acc": 0.8,
             "expected_latency_ms": 9.9, "derived_latency_ms": 1.2, "retrained_test_acc": 0.81,
             "measured_cpu_ms": 1.0, "measured_threads": 1, "predicted_ms": 1.2, "latency_ratio": 1.2, "arch": "x"},
            {"trial_id": "pixel1-add-lam1", "hardware": "pixel1", "on_front": True, "heldout_acc": 0.7,
             "expected_latency_ms": 9.9, "derived_latency_ms": 31.5, "retrained_test_acc": 0.7,
             "measured_cpu_ms": 1.1, "measured_threads": 1, "predicted_ms": 31.5, "latency_ratio": None, "arch": "y"}]
    text = format_demo_table(pd.DataFrame(rows))
    lines = text.splitlines()
    cpu = next(line for line in lines if line.startswith("cpu_local-add"))
    pix = next(line for line in lines if line.startswith("pixel1-add"))
    assert "1.200" in cpu and "1.000" in cpu and cpu.split()[-2] == "1.20" and "9.9" not in text
    assert "31.500" in pix and "1.100" in pix and pix.split()[-2] == "1.100"  # no ratio for a mobile target
    assert "measured on this machine's CPU" in text and "says nothing about the target" in text
    assert "the profile was measured at an unrecorded time" in text and "off by more than" not in text


def test_front_row_dates_the_profile_only_where_the_ratio_compares_with_it(tiny_profile):
    from proxyless_ray.demo import FRONT_COLUMNS, front_row
    from proxyless_ray.latency.target import HardwareTarget

    res = {"test_acc": 0.8, "measured_cpu_latency_ms": 1.0, "measured": {"threads": 1, "clock": "thread"},
           "predicted_latency_ms": 1.1, "latency_ratio": 1.1}
    row = front_row("t", res, HardwareTarget("cpu_local", tiny_profile))
    assert list(row) == FRONT_COLUMNS and row["profile_date"] == tiny_profile.metadata["date"]
    mobile = front_row("m", {**res, "latency_ratio": None}, HardwareTarget("pixel1", load_profile("pixel1")))
    assert mobile["profile_date"] is None and mobile["measured_clock"] == "thread"


def test_demo_table_dates_the_profile_and_flags_ratios_a_speed_change_would_explain():
    from proxyless_ray.demo import RATIO_DRIFT, format_demo_table

    def table(ratios):
        return pd.DataFrame([{"trial_id": f"cpu_local-add-lam{i}", "hardware": "cpu_local", "on_front": True,
                              "heldout_acc": 0.8, "derived_latency_ms": r, "retrained_test_acc": 0.81,
                              "measured_cpu_ms": 1.0, "measured_threads": 1, "predicted_ms": r,
                              "latency_ratio": r, "profile_date": "2026-12-02T21:20:15Z", "arch": "x"}
                             for i, r in enumerate(ratios)])

    fine = format_demo_table(table([0.97, 1.0 / RATIO_DRIFT + 0.01, RATIO_DRIFT - 0.01]))
    assert "the profile was measured 2026-12-02T21:20:15Z" in fine and "off by more than" not in fine
    slow, fast = format_demo_table(table([0.64, 0.95])), format_demo_table(table([1.0, RATIO_DRIFT + 0.05]))
    for text in (slow, fast):
        assert "1 of 2 ratios are off by more than 25%" in text and "proxyless-ray profile --quick" in text


def test_gpu_fingerprint_from_device_properties(tmp_path, monkeypatch):
    """The CUDA path on logic (no GPU here): name, capability, driver and CUDA come from torch and the driver file."""
    import types

    import torch

    from proxyless_ray.latency import fingerprint as fpm

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Thu Jan 9 2025\n")
    assert fpm.nvidia_driver(str(driver)) == "570.86.15"
    assert fpm.nvidia_driver(str(tmp_path / "absent")) == "unknown"
    real = fpm.nvidia_driver
    monkeypatch.setattr(fpm, "nvidia_driver", lambda: real(str(driver)))
    fp = fpm.machine_fingerprint("cuda:0")
    assert (fp["device"], fp["gpu_name"], fp["compute_capability"], fp["driver"]) == ("gpu", "NVIDIA H200", "9.0",
                                                                                       "570.86.15")
    assert fp["cuda"] == str(torch.version.cuda) and fp["torch"] == str(torch.__version__)
    assert "NVIDIA H200 (driver 570.86.15" in fpm.describe(fp)
    assert fpm.differences(fp, {**fp, "gpu_name": "NVIDIA A100"}) == ["gpu_name: 'NVIDIA H200' -> 'NVIDIA A100'"]


def test_tracking_names_cpu_local_without_measuring(cache, monkeypatch):
    from proxyless_ray.tracking.tags import profile_info

    monkeypatch.setattr(local, "profile_spaces", lambda *a, **k: pytest.fail("tagging a run measured the CPU"))
    info = profile_info("cpu_local_2threads")
    assert info["hardware"] == "cpu_local_2threads" and info["device"] == "cpu"
    assert cpu_fingerprint(2)["model"] in info["platform"]
