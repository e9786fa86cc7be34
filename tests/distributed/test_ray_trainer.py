"""Distributed search on real Ray Train: synchronized gates, DP equivalence, recovery, multi-node (tracked in MLflow),
bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

from proxyless_ray.cli import main
from proxyless_ray.distributed import ray_private
from proxyless_ray.distributed.ray_private import LEAN_ENV
from proxyless_ray.distributed.ray_trainer import (
    ClusterError,
    ReportLog,
    build_trainer,
    check_placeable,
    connect,
    read_report_log,
    run_ray_search,
)
from proxyless_ray.distributed.resume import RAY_SNAPSHOT, ray_checkpoints
from proxyless_ray.runtime import THREAD_ENV_KEYS, thread_env
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.search.state import read_meta

from conftest import requires_fmnist, sqlite_store, tiny_experiment

pytestmark = [pytest.mark.ray, pytest.mark.slow, requires_fmnist]


@pytest.fixture(scope="module", autouse=True)
def _stop_ray_after_the_module():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(tmp_path_factory):
    """The embedded cluster `proxyless-ray search` starts, shared by the tests that ask for it (a start costs ~7 s
    here): connect() leaves a running cluster alone, and the module's last test stops it."""
    connect(tiny_experiment(tmp_path_factory.mktemp("ray")), num_cpus=2)
    yield


def test_embedded_cluster_is_lean(local_ray):
    # no dashboard, no metrics agent work, no preemption watcher: their polling competes with 1-thread workers
    assert not ray._private.worker.get_dashboard_url()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    # the processes Ray started read the lean settings from the environment they inherited
    log_monitor = next(p for p in ray._private.worker._global_node.all_processes[
        ray._private.ray_constants.PROCESS_TYPE_LOG_MONITOR])
    environ = psutil.Process(log_monitor.process.pid).environ()
    for key, value in LEAN_ENV.items():
        assert environ[key] == value, key


def test_lean_settings_are_the_users_to_override_and_leave_with_the_lean_cluster(tmp_path, monkeypatch):
    # connect()'s own handling of the environment, around a stand-in for ray.init (clusters are the other tests')
    started = []
    monkeypatch.setattr(ray_private, "_LEAN_CLUSTER", ray_private._LEAN_CLUSTER)  # the running cluster's, restored
    monkeypatch.setattr(ray_private, "_LEAN_SET", set())
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.append({k: os.environ.get(k) for k in LEAN_ENV}))
    for key in LEAN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "1000")  # the user's choice stands
    exp = tiny_experiment(tmp_path)
    connect(exp, dashboard=False)
    connect(exp, dashboard=True)  # a sweep's cluster, later in the same process
    lean, full = started
    assert lean == {**LEAN_ENV, "REPORTER_UPDATE_INTERVAL_MS": "1000"}
    assert full == {**{k: None for k in LEAN_ENV}, "REPORTER_UPDATE_INTERVAL_MS": "1000"}


def equivalence_experiment(tmp_path, workers, batch):
    return tiny_experiment(
        tmp_path,
        data={"batch_size": batch, "augment": False, "train_subset": 256, "heldout_size": 128},
        train={"epochs": 2, "warmup_epochs": 1, "freeze_bn": True, "arch_update_every": 2, "max_steps_per_epoch": 4,
               "arch_lr": 0.01},
        dist={"workers": workers, "checkpoint_every": 1},
    )


def test_two_workers_equal_one_worker_double_batch_and_ranks_agree(tmp_path, local_ray):
    # 2 Ray Train workers x batch 16 ...
    exp2 = equivalence_experiment(tmp_path / "two", 2, 16)
    log = str(tmp_path / "reports.jsonl")
    result = build_trainer(exp2, "equiv", callbacks=[ReportLog(log)]).fit()
    assert result.error is None
    # ... against 1 in-process worker x batch 32, same seed
    exp1 = equivalence_experiment(tmp_path / "one", 0, 32)
    single = SearchLoop(exp1, Comm(), lambda m, f: None, progress=False)
    single.run()
    with result.checkpoint.as_directory() as folder:
        dist_state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)["model"]
    ref = single.state.net.state_dict()
    for key, value in ref.items():
        torch.testing.assert_close(dist_state[key].to(value.dtype), value, rtol=1e-4, atol=1e-5, msg=key)
    assert single.state.arch_step == 2
    # every report: both ranks hold bit-identical alphas (synchronized binarization + all-reduced arch grads)
    reports = read_report_log(log)
    assert [r["metrics"][0]["epoch"] for r in reports] == [1, 2]
    for r in reports:
        assert len(r["metrics"]) == 2
        assert r["metrics"][0]["alpha_digest"] == r["metrics"][1]["alpha_digest"]
        assert r["metrics"][0]["arch"] == r["metrics"][1]["arch"]
    # Train's placement-group cleaner polls the State API, which a cluster without the dashboard does not serve
    from ray._private import state

    classes = {a.get("ActorClassName") for a in state.actors().values()}
    assert "TrainController" in classes and "PlacementGroupCleaner" not in classes
    # nor the dataset manager: the search reads its own shards, not Ray Datasets
    assert "DatasetManager" not in classes


@pytest.mark.parametrize(("threads", "expected"), [(1, "spin"), (2, "passive")])
def test_workers_start_with_the_wait_policy_of_their_placement(tmp_path, local_ray, capsys, threads, expected):
    # 2 workers x 1 CPU on the 2-CPU cluster: 1 thread each has a core (spin); 2 threads each share (passive)
    def report_thread_env(config):  # nested: pickled by value, the workers cannot import this test module
        import os

        import ray.train

        ray.train.report({k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})

    exp = tiny_experiment(tmp_path, train={"threads": threads}, dist={"workers": 2, "cpus_per_worker": 1})
    log = str(tmp_path / "reports.jsonl")
    trainer = build_trainer(exp, f"policy-{threads}", callbacks=[ReportLog(log)], train_fn=report_thread_env)
    line = capsys.readouterr().err
    assert (f"Ray Train workers: {threads} torch thread(s), OpenMP threads {expected} "
            f"(OMP_WAIT_POLICY={thread_env(expected == 'passive')['OMP_WAIT_POLICY']}") in line
    assert f"2 process(es) x {threads} thread(s) on 2 CPUs" in line
    wanted = thread_env(expected == "passive")
    assert {k: trainer.run_config.worker_runtime_env["env_vars"][k] for k in wanted} == wanted
    if expected == "spin":
        return  # the same env reaches the workers as in the passive case, whose workers report it (a start ~20 s)
    result = trainer.fit()
    assert result.error is None
    (report,) = read_report_log(log)
    assert len(report["metrics"]) == 2  # both workers
    for metrics in report["metrics"]:
        assert {k: metrics[k] for k in THREAD_ENV_KEYS} == wanted


def test_worker_killed_mid_run_recovers_without_losing_or_repeating_epochs(tmp_path, local_ray):
    exp = tiny_experiment(tmp_path, train={"epochs": 4, "warmup_epochs": 1, "max_steps_per_epoch": 6},
                          dist={"workers": 2, "max_failures": 1, "checkpoint_every": 1})
    log = str(tmp_path / "reports.jsonl")
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            reports = read_report_log(log)
            if reports:  # epoch 1 is committed: kill rank 1 while it works on epoch 2
                pid = reports[0]["metrics"][1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = build_trainer(exp, "recover", callbacks=[ReportLog(log)]).fit()
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result.error is None
    reports = read_report_log(log)
    epochs = [r["metrics"][0]["epoch"] for r in reports]
    assert sorted(epochs) == [1, 2, 3, 4] and epochs == sorted(epochs)  # none lost, none reported twice
    assert killed[0] not in {m["pid"] for m in reports[-1]["metrics"]}  # a new worker group finished the run
    with result.checkpoint.as_directory() as folder:
        assert [m["epoch"] for m in read_meta(folder)["history"]] == [1, 2, 3, 4]


def test_more_workers_than_the_cluster_can_place_is_refused(tmp_path, local_ray):
    exp = tiny_experiment(tmp_path, dist={"workers": 5})
    with pytest.raises(ClusterError, match="5 workers x 1 CPU need 5 CPU, but the cluster has 2"):
        check_placeable(exp)


def test_two_worker_search_on_two_node_cluster_is_tracked_epoch_by_epoch(tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's embedded cluster, if one runs; the next test that needs it starts it again
    uri = sqlite_store(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        exp = tiny_experiment(tmp_path, dist={"workers": 2, "address": cluster.address},
                              tracking={"enabled": True, "uri": uri, "register_models": False})
        log = str(tmp_path / "reports.jsonl")
        result = run_ray_search(exp, callbacks=[ReportLog(log)])
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {m["node_id"] for r in read_report_log(log) for m in r["metrics"]}
    assert len(nodes) == 2, "both nodes must have run a worker"
    assert os.path.isfile(os.path.join(exp.output_dir, "network", "model.pt2"))
    assert result["test_acc"] >= 0
    # MLflow: the Train controller logged each committed epoch into the child run; the driver closed both runs
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(exp.tracking.experiment)
    runs = list(client.search_runs([found.experiment_id]))
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    child = next(r for r in runs if r.data.tags["role"] == "child")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "heldout_acc")] == [1, 2]
    assert child.data.tags["derived_arch"] == result["arch"]
    assert "plots/arch.png" in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}


def test_unreachable_address_fails_fast(tmp_path):
    ray.shutdown()  # connect() would keep a running cluster
    exp = tiny_experiment(tmp_path, dist={"workers": 1, "address": "127.0.0.1:9", "connect_timeout_s": 5})
    t0 = time.time()
    with pytest.raises(ClusterError, match="127.0.0.1:9.*unreachable"):
        connect(exp)
    assert time.time() - t0 < 30


def test_resume_passes_over_a_damaged_ray_checkpoint(tmp_path, capsys, monkeypatch):
    """--resume of a search stopped before Ray made its run folder starts from scratch. The finished 1-worker Ray
    search, its newest checkpoint's state.pt truncated: --resume says so in one line,
    continues from the one before and ends where the first run ended; every checkpoint damaged: exit 2, one line
    naming the newest one's file, nothing written or renamed."""
    monkeypatch.chdir(tmp_path)
    ray.shutdown()  # the search starts its own embedded cluster
    exp = tiny_experiment(tmp_path, train={"epochs": 3}, dist={"workers": 1, "checkpoints_to_keep": 3})
    path = tmp_path / "e.yaml"
    path.write_text("# t\n" + yaml.safe_dump(exp.to_dict()))
    # as a Ctrl-C before Ray made the run folder leaves it: the output folder marked, no run folder
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "INCOMPLETE").write_text("interrupted (SIGINT)\n")
    assert main(["search", str(path), "--resume"]) == 0
    assert "starting from scratch" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "INCOMPLETE").exists()
    first = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    run_dir = tmp_path / "ray_storage" / "search-tiny"
    ckpts = ray_checkpoints(str(run_dir))
    assert len(ckpts) == 3 and (run_dir / RAY_SNAPSHOT).exists()
    truncate(os.path.join(ckpts[0], "state.pt"))
    capsys.readouterr()
    assert main(["search", str(path), "--resume"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "damaged checkpoint" in line]
    assert len(skipped) == 1 and os.path.join(ckpts[0], "state.pt") in skipped[0], err
    assert f"resuming from {ckpts[1]}" in err
    again = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert again["alpha_digest"] == first["alpha_digest"] and again["arch"] == first["arch"]
    assert (run_dir / f"damaged_{os.path.basename(ckpts[0])}").is_dir()
    for folder in ray_checkpoints(str(run_dir)):
        truncate(os.path.join(folder, "state.pt"))
    newest = ray_checkpoints(str(run_dir))[0]
    before = {rel: (tmp_path / rel).read_bytes() for rel in _files(tmp_path)}
    assert main(["search", str(path), "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and os.path.join(newest, "state.pt") in lines[0] and "truncated" in lines[0]
    assert {rel: (tmp_path / rel).read_bytes() for rel in _files(tmp_path)} == before


def truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files}
