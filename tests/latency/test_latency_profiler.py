"""The profiler: timing statistics, CPU and (faked) CUDA timers, measuring a tiny space, the ``profile`` and
``latency`` commands, and measuring inside a Ray actor pinned by a custom resource on a multi-node cluster."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
import torch
import yaml

from proxyless_ray import cli
from proxyless_ray.latency.profile import check_space, read_profile, space_layers
from proxyless_ray.latency.profiler import (
    Bench,
    ProfilerSettings,
    cover_archs,
    measure_layers,
    profile_spaces,
    run_bench,
)
from proxyless_ray.latency.timing import Stamps, check_device, robust_stats
from proxyless_ray.nn.arch import layer_key
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.progress import Progress

TINY = SearchSpace(preset="small", resolution=8, widths=(8,), depths=(2,), strides=(1,), kernel_sizes=(3,),
                   exp_ratios=(3,), stem="conv_k3_c8_s1", first_block=None, feature_mix_chs=16)
FAST = ProfilerSettings(warmup=1, repeats=3, min_time_s=0.0)
TINY_EXPERIMENT = {"name": "tiny", "space": {"preset": "small", "resolution": 8, "widths": [8], "depths": [2],
                                             "strides": [1], "kernel_sizes": [3], "exp_ratios": [3],
                                             "stem": "conv_k3_c8_s1", "first_block": None, "feature_mix_chs": 16}}


def test_statistics_median_quantile_and_robust_spread():
    samples = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert robust_stats(samples) == (3.0, pytest.approx((4.0 - 2.0) / 1.349))  # one outlier moves neither
    assert robust_stats(samples, "min")[0] == 2.0  # mean of the fastest 3 (at least 3, else 5 %)
    many = [float(v) for v in range(1, 101)]
    assert robust_stats(many, "min")[0] == 3.0  # the fastest 5: 1..5
    assert robust_stats(many, "p10")[0] == 11.0  # ranks 8..12 around rank 10
    with pytest.raises(ValueError, match="'fastest'"):
        robust_stats(samples, "fastest")
    with pytest.raises(ValueError, match="no timing samples"):
        robust_stats([])


def test_unknown_devices_are_rejected_by_name():
    assert check_device("cuda:1") == "cuda:1"
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match=f"unknown device {bad!r}"):
            check_device(bad)
    with pytest.raises(ValueError, match="'tpu'"):
        ProfilerSettings(device="tpu")
    with pytest.raises(ValueError, match="threads 2"):
        ProfilerSettings(threads=2, clock="thread")
    with pytest.raises(ValueError, match="'sundial'"):
        ProfilerSettings(clock="sundial")


class _FakeCuda:
    """Stands in for ``torch.cuda``: events stamped by a fake GPU clock that advances 1.5 ms per event."""

    def __init__(self):
        self.clock, self.synced, self.log = 0.0, 0, []

    def Event(self, enable_timing=False):  # noqa: N802 - mirrors torch.cuda.Event
        assert enable_timing
        cuda = self

        class Ev:
            def record(self):
                cuda.clock += 1.5
                self.t = cuda.clock
                cuda.log.append("record")

            def synchronize(self):
                cuda.synced += 1
                cuda.log.append("sync")

            def elapsed_time(self, end):
                assert cuda.log[-1] == "sync", "elapsed_time read before synchronising"
                return end.t - self.t

        return Ev()


def test_cuda_stamps_record_events_and_synchronise_before_reading():
    cuda = _FakeCuda()
    stamps = Stamps(cuda)
    stamps.start()
    stamps.mark()
    stamps.mark()
    assert stamps.durations_ms() == [1.5, 1.5]
    assert cuda.log == ["record", "record", "record", "sync"] and cuda.synced == 1
    for clock in ("wall", "thread"):
        host = Stamps(clock=clock)
        host.start()
        sum(i * i for i in range(20000))  # some CPU work
        host.mark()
        assert 0 < host.durations_ms()[0] < 1000


def test_network_entries_add_up_to_the_chosen_network_run():
    bench = Bench(ProfilerSettings(warmup=0, repeats=1, statistic="min"), [TINY])
    step = bench.steps[0]
    bench.built[step] = ([], ["a@1x8x8", "b@1x8x8", "a@1x8x8"], None)
    # run totals 6, 60, 7, 8, 9: the fastest three runs are 0, 2, 3 (one noisy run where layer b stalled)
    bench.runs[step] = [[1.0, 2.0, 3.0], [1.0, 56.0, 3.0], [1.5, 2.5, 3.0], [2.0, 3.0, 3.0], [2.0, 4.0, 3.0]]
    entries = bench.entries()
    assert entries["b@1x8x8"].ms == pytest.approx(2.5)
    assert entries["a@1x8x8"].ms == pytest.approx((1.5 + 3.0) / 2)  # two positions, averaged
    assert entries["a@1x8x8"].ms * 2 + entries["b@1x8x8"].ms == pytest.approx((6 + 7 + 8) / 3)
    assert entries["a@1x8x8"].count == 10


def test_bench_times_every_layer_of_a_cover_network_through_the_event_path():
    cuda = _FakeCuda()
    settings = ProfilerSettings(warmup=1, repeats=4, min_time_s=0.0)
    bench = Bench(settings, [TINY], events=cuda)
    entries = run_bench(bench)
    assert set(entries) == {layer_key(*t) for t in space_layers(TINY)}
    assert all(e.ms == 1.5 for e in entries.values())  # one event per layer, read after the sync
    assert cuda.synced == len(bench.steps) * (1 + 4)  # once per forward (warm-up included)


def test_cover_networks_hold_every_candidate_at_every_position():
    space = SearchSpace()  # the small preset
    covers = cover_archs(space)
    slots = space.slots()
    assert len(covers) == max(len(s.candidates) for s in slots)
    for i, slot in enumerate(slots):
        assert {space.choices_of(a)[i] for a in covers} == set(range(len(slot.candidates)))


def test_measure_tiny_space_on_cpu_restores_threads():
    before = torch.get_num_threads()
    layers = space_layers(TINY)
    stream = io.StringIO()
    bar = Progress(len(layers), "t", stream)
    entries = measure_layers(layers, ProfilerSettings(threads=1, warmup=1, repeats=3, min_time_s=0.0),
                             lambda n, key: bar.update(n, layer=key))
    assert torch.get_num_threads() == before
    assert set(entries) == {layer_key(*t) for t in layers}
    assert all(e.ms > 0 and e.count >= 3 for e in entries.values())
    assert f"{len(layers)}/{len(layers)}" in stream.getvalue()


def test_rounds_interleave_layers_and_pool_their_samples():
    order = []
    stream = io.StringIO()
    layers = space_layers(TINY)[:3]
    settings = ProfilerSettings(threads=1, warmup=1, repeats=6, min_time_s=0.0, rounds=3)
    entries = measure_layers(layers, settings, lambda n, key: order.append(key))
    keys = [layer_key(*t) for t in layers]
    assert [sorted(order[i:i + 3]) for i in (0, 3, 6)] == [sorted(keys)] * 3  # every round visits every layer
    assert order[:3] == keys  # the first round in order, later rounds shuffled
    assert all(entries[k].count == 6 for k in keys)  # 3 rounds x 2 runs
    bar = Progress(9, "t", stream)
    measure_layers(layers, settings, lambda n, key: bar.update(n))
    assert "9/9" in stream.getvalue()


def test_profile_spaces_records_metadata_and_fits_a_predictor():
    prof = profile_spaces([TINY], FAST, "tiny", progress=False)
    md = prof.metadata
    assert md["device"] == "cpu" and md["threads"] == 1 and md["batch_size"] == 1 and md["method"] == "measured"
    assert md["spaces"][0]["fingerprint"] == TINY.fingerprint()
    assert check_space(prof, TINY, strict=True)["n_exact"] == len(space_layers(TINY))
    assert prof.predictor is not None and prof.lat_ms("mb_k5_e6_c8_s1", 8, 16) > 0
    assert md["context"] == "network"
    fixed = layer_key("conv_k3_c8_s1", 1, 8)
    assert prof.entries[fixed].count == len(cover_archs(TINY)) * FAST.repeats  # the stem runs in every cover net


def test_profile_and_latency_commands(tmp_path, capsys):
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    out = tmp_path / "tiny_cpu.yaml"
    args = ["profile", "--space", str(exp), "-o", str(out), "--warmup", "1", "--repeats", "3", "--min-time", "0",
            "--no-progress"]
    assert cli.main(args) == 0
    prof = read_profile(out)
    assert check_space(prof, TINY, strict=True)["n_exact"] == len(space_layers(TINY))
    arch = TINY.arch_from_choices([0, 1], name="tiny_net")
    arch_path = tmp_path / "arch.json"
    arch.save(arch_path)
    capsys.readouterr()
    assert cli.main(["latency", "--profile", str(out), "--arch", str(arch_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"exact": len(arch.layers()) - 1, "predicted": 0, "zero": 1}
    assert report["total_ms"] == pytest.approx(sum(r["ms"] for r in report["layers"]), abs=1e-3)
    assert cli.main(["latency", "--profile", str(out), "--arch", str(arch_path)]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "mb_k3_e3_c8_s1@8x8x8" in text
    # the experiment names the space; strict mode rejects a profile that lacks its shapes
    wide = TINY.arch_from_choices([0, 0]).to_dict()
    wide["input"]["resolution"] = 16
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    assert cli.main(["latency", "--profile", str(out), "--arch", str(tmp_path / "wide.json"), "--strict"]) == 2
    assert "conv_k3_c8_s1@1x16x16" in capsys.readouterr().err
    # an experiment whose space the profile was not measured for, in strict mode
    other = dict(TINY_EXPERIMENT, latency={"profile": str(out), "strict": True})
    other["space"] = dict(TINY_EXPERIMENT["space"], resolution=16)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert cli.main(["latency", "--space", str(tmp_path / "other.yaml"), "--arch", str(arch_path)]) == 2
    err = capsys.readouterr().err
    assert "does not match search space" in err and TINY.fingerprint() in err


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--space", "huge_preset"], "'huge_preset'"),
    (["--ray-resources", "{hw_xyz: 1}"], "not valid JSON"),
    (["--ray-resources", '{"hw_xyz": -1}'], "'hw_xyz' has amount -1"),
    (["--statistic", "mean"], "'mean'"),
])
def test_profile_command_rejects_bad_input_without_writing(tmp_path, capsys, extra, message):
    out = tmp_path / "p.yaml"
    assert cli.main(["profile", "-o", str(out), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_output_folder_must_exist(tmp_path, capsys):
    assert cli.main(["profile", "-o", str(tmp_path / "no" / "p.yaml"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_profiles_inside_an_actor_on_the_node_with_the_custom_resource(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        hw_node = cluster.add_node(num_cpus=1, resources={"hw_test": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        prof = profile_spaces([TINY], FAST, "tiny_ray", ray_resources={"hw_test": 1}, progress=False)
        assert prof.metadata["ray_node_id"] == hw_node.node_id != cluster.head_node.node_id
        assert prof.metadata["ray_resources"] == {"hw_test": 1}
        assert set(prof.entries) == {layer_key(*t) for t in space_layers(TINY)}
        deadline = time.time() + 20
        while ray.available_resources().get("hw_test") != 1 and time.time() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("hw_test") == 1  # the actor is gone, its resource free again
        with pytest.raises(ValueError, match="'hw_missing'"):
            profile_spaces([TINY], FAST, "x", ray_resources={"hw_missing": 1}, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
