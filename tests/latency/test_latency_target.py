"""The hardware target resolved once: what it says about itself, that it travels to other processes, and that a
search and a retraining read the target's profile once (not once per stage that prices, tags or times it)."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import pytest

from proxyless_ray.latency import profile as profile_module
from proxyless_ray.latency.target import resolve_target, target_info
from proxyless_ray.nn.space import space_from_preset
from proxyless_ray.tracking.tags import search_tags

from conftest import requires_fmnist, sqlite_store, tiny_experiment

SPACE = space_from_preset("small")


@pytest.mark.parametrize("spec, kind, device", [("pixel1", "fitted", "mobile"), ("v100_roofline", "analytic", "gpu"),
                                                ("cpu_1thread", "measured", "cpu"), ("flops", "flops", "none")])
def test_a_target_says_what_it_is_and_pickles(spec, kind, device):
    target = resolve_target(spec, SPACE)
    assert (target.spec, target.name, target.kind, target.strict) == (spec, spec, kind, False)
    assert target.info() == target_info(spec) and target.info()["device"] == device
    assert (target.fingerprint is not None) == (kind == "measured")
    assert target.text is None  # a shipped profile: another process reads the same file
    again = pickle.loads(pickle.dumps(target))  # what a Ray task gets
    assert again.model.lat_ms("mb_k3_e3_c16_s1", 16, 14) == target.model.lat_ms("mb_k3_e3_c16_s1", 16, 14)


def test_a_target_from_the_drivers_text_is_the_same_profile():
    target = resolve_target("cpu_1thread", SPACE, strict=True)
    copy = resolve_target("cpu_1thread", SPACE, strict=True, text=target.model.to_yaml())
    assert copy.model.entries == target.model.entries and copy.strict


def test_tags_come_from_the_resolved_target(tmp_path, monkeypatch):
    exp = tiny_experiment(tmp_path, latency={"profile": "pixel1"})
    target = resolve_target("pixel1", exp.space)
    monkeypatch.setattr(profile_module, "read_profile", lambda *a, **k: pytest.fail("tagging read the profile again"))
    tags = search_tags(exp, "search", "key", target)
    assert (tags["hardware"], tags["device"], tags["platform"]) == ("pixel1", "mobile", "Google Pixel 1")


@pytest.fixture
def profile_reads(monkeypatch):
    """Counts reads of each profile file by name."""
    reads: Counter[str] = Counter()
    read = profile_module.read_profile

    def counting(path, strict=False):
        reads[Path(path).stem] += 1
        return read(path, strict)

    monkeypatch.setattr(profile_module, "read_profile", counting)
    return reads


@requires_fmnist
def test_a_search_and_its_retraining_read_the_target_once(tmp_path, profile_reads):
    from proxyless_ray.distributed.retrain import run_retrain
    from proxyless_ray.distributed.trainer import run_local

    exp = tiny_experiment(tmp_path, latency={"profile": "pixel1"},
                          tracking={"enabled": True, "uri": sqlite_store(tmp_path)})
    run_local(exp, echo=False)
    # once as the target (loop, objective, outputs, MLflow tags and registration), once among every shipped
    # profile the per-epoch metrics price the architecture on
    assert profile_reads["pixel1"] == 2, profile_reads
    profile_reads.clear()
    run_retrain(tiny_experiment(tmp_path / "retrain", latency={"profile": "pixel1"}),
                os.path.join(exp.output_dir, "network"), finetune=True, epochs=1)
    assert profile_reads == {"pixel1": 1}  # the fit's check, the prediction and the timing share it
