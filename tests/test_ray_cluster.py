"""A search on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``), tracked in MLflow from the Train
controller, and a cluster address that does not answer."""

from __future__ import annotations

import os
import time

import pytest
import ray
from mlflow import MlflowClient

from proxyless_ray.ray_trainer import ClusterError, ReportLog, connect, read_report_log, run_ray_search

from conftest import requires_fmnist, tiny_experiment

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@requires_fmnist
def test_two_worker_search_on_two_node_cluster_is_tracked_epoch_by_epoch(tmp_path):
    from ray.cluster_utils import Cluster

    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
    exp = tiny_experiment(tmp_path, dist={"workers": 1, "address": "127.0.0.1:9", "connect_timeout_s": 5})
    t0 = time.time()
    with pytest.raises(ClusterError, match="127.0.0.1:9.*unreachable"):
        connect(exp)
    assert time.time() - t0 < 30
