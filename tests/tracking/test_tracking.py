"""MLflow tracking against a real sqlite store: run structure, tags, params, metrics, artifacts, registry, resume,
fail-fast on an unreachable server, deleted-experiment clash, oversized artifacts and the ``results`` command."""

from __future__ import annotations

import json
import os
import shutil

import mlflow.artifacts
import pytest
import torch
import yaml
from mlflow import MlflowClient

from proxyless_ray.cli import main
from proxyless_ray.config import TrackingConfig, with_overrides
from proxyless_ray.distributed.trainer import run_local
from proxyless_ray.nn.network import load_network
from proxyless_ray.sweeps.tracking import finish_sweep, tune_callback
from proxyless_ray.tracking.registry import load_registered, model_versions, network_files
from proxyless_ray.tracking.retrain import log_retrain
from proxyless_ray.tracking.tracker import Tracker, TrackingUnavailable, resolve_uri, search_tags

from conftest import requires_fmnist, sqlite_store, tiny_experiment

EXPERIMENT = "proxyless-ray"


def _tracked(tmp_path, **tracking):
    uri = sqlite_store(tmp_path)
    return tiny_experiment(tmp_path, tracking={"enabled": True, "uri": uri, **tracking},
                           train={"ready_acc": 0.01, "ready_samples": 1}), uri


def _runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One tracked in-process search (about 30 s here, most of it MLflow's first-call costs)."""
    tmp = tmp_path_factory.mktemp("tracked")
    exp, uri = _tracked(tmp)
    result = run_local(exp, echo=False)
    return exp, uri, result


# -- pure ------------------------------------------------------------------------------------------------------------


def test_resolve_uri_is_absolute_and_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri(TrackingConfig(uri="sqlite:///sub/x.db")) == f"sqlite:///{tmp_path}/sub/x.db"
    assert resolve_uri(TrackingConfig(uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"
    assert resolve_uri(TrackingConfig(uri="mlruns")) == f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri(TrackingConfig()) == "http://mlflow:5000"
    assert resolve_uri(TrackingConfig(uri="sqlite:///a.db")) == f"sqlite:///{tmp_path}/a.db"  # the flag wins


def test_disabled_tracker_is_a_no_op_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Tracker(tiny_experiment(tmp_path))
    assert not t.enabled
    t.check()
    assert t.ensure_experiment() == ""
    parent = t.start_parent("search", "p", tiny_experiment(tmp_path), "k")
    assert parent == "" and t.start_child(parent, "k", {}, {}) == ""
    t.log_epoch("", {"epoch": 1, "train_acc": 0.5})
    assert t.finish_child("", str(tmp_path)) is True
    assert os.listdir(tmp_path) == []


def test_unreachable_server_names_the_uri_and_the_cli_exits_2_before_training(tmp_path, capsys):
    exp, _ = _tracked(tmp_path, uri="http://127.0.0.1:9")
    with pytest.raises(TrackingUnavailable, match=r"http://127\.0\.0\.1:9.*--no-tracking"):
        Tracker(exp).check(timeout_s=2)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "--no-tracking" in err
    assert not os.path.exists(exp.output_dir)  # no training started, nothing written


def test_unwritable_sqlite_folder_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    exp, _ = _tracked(tmp_path, uri=f"sqlite:///{blocker}/sub/mlflow.db")
    with pytest.raises(TrackingUnavailable, match="not writable"):
        Tracker(exp).check()


def test_experiments_are_of_the_model_training_kind(tmp_path):
    """A new experiment gets MLflow's kind tag; one made without it (an older version, or MLflow) gets it too."""
    exp, uri = _tracked(tmp_path)
    client = MlflowClient(uri)
    eid = Tracker(exp).ensure_experiment()
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
    other = with_overrides(exp, tracking={"experiment": "older"})
    old = client.create_experiment("older", artifact_location=(tmp_path / "mlruns").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert Tracker(other).ensure_experiment() == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


# -- one tracked search ------------------------------------------------------------------------------------------


@requires_fmnist
def test_search_makes_one_parent_and_one_child_with_tags_params_and_metrics(searched):
    exp, uri, result = searched
    client = MlflowClient(uri)
    runs = _runs(client)
    assert len(runs) == 2
    parent = next(r for r in runs if r.data.tags["role"] == "parent")
    child = next(r for r in runs if r.data.tags["role"] == "child")
    assert parent.info.run_name == "search tiny" and parent.data.tags["kind"] == "search"
    # the UI opens the experiment on its runs table (MLflow 3 otherwise guesses the GenAI traces view)
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.status == child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["hardware"] == "flops" and tags["profile"] == "flops" and tags["loss"] == "add"
    assert tags["lambda"] == "0.1" and tags["dataset"] == "fashion_mnist" and tags["kind"] == "search"
    assert tags["space_fingerprint"] == exp.space.fingerprint()
    assert tags["derived_arch"] == result["arch"]
    # whether alpha started on a supernet whose sampled sub-networks had reached train.ready_acc
    assert tags["supernet_ready"] == "true" and child.data.metrics["ready_subnet_acc"] >= 0.01
    params = child.data.params
    assert params["train.epochs"] == "2" and params["latency.profile"] == "flops"
    assert params["space.widths"] == "[8, 16]"
    # one point per epoch for every per-epoch metric, latency on every shipped profile included
    for key in ("train_acc", "heldout_acc", "heldout_ce", "expected_latency_ms", "entropy", "images_per_s",
                "latency_pixel1_ms", "latency_cpu_1thread_ms"):
        history = client.get_metric_history(child.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert child.data.metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert child.data.metrics["derived_latency_ms"] == pytest.approx(result["latency_ms"])


@requires_fmnist
def test_child_holds_outputs_pictures_and_parent_holds_the_pareto_table(searched, tmp_path):
    _, uri, _ = searched
    client = MlflowClient(uri)
    runs = _runs(client)
    child = next(r for r in runs if r.data.tags["role"] == "child")
    parent = next(r for r in runs if r.data.tags["role"] == "parent")
    files = _artifacts(client, child.info.run_id)
    for name in ("arch.json", "searched_arch.json", "result.json", "metrics.jsonl", "alphas.json",
                 "network/state_dict.pt", "plots/arch.png", "plots/alpha_heatmap.png", "plots/alpha_evolution.png",
                 "plots/latency_breakdown.png"):
        assert name in files, (name, sorted(files))
    local = client.download_artifacts(child.info.run_id, "plots/arch.png", str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"pareto/pareto.parquet", "pareto/pareto.csv", "pareto/pareto.png",
            "pareto/summary.json"} <= _artifacts(client, parent.info.run_id)
    summary = json.load(open(client.download_artifacts(parent.info.run_id, "pareto/summary.json", str(tmp_path))))
    assert summary["flops"]["most_accurate"]["trial_id"] == child.info.run_id


@requires_fmnist
def test_registered_version_loads_back_and_runs(searched):
    _, uri, result = searched
    versions = model_versions(uri, "flops")
    assert len(versions) == 1
    v = versions[0]
    assert v.tags["latency_ms"] == f"{result['latency_ms']:.6g}" and float(v.tags["acc"]) == pytest.approx(
        result["test_acc"], rel=1e-4)
    child = next(r for r in _runs(MlflowClient(uri)) if r.data.tags["role"] == "child")
    assert v.run_id == v.tags["run_id"] == child.info.run_id
    net = load_registered(uri, f"models:/proxyless-flops/{v.version}")
    with torch.no_grad():
        out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@requires_fmnist
def test_resume_reuses_the_runs_and_never_duplicates_an_epoch(searched):
    exp, uri, _ = searched
    # resume from epoch 1, as after a crash: epoch 2 runs again, and its metrics must not appear twice
    shutil.rmtree(os.path.join(exp.output_dir, "checkpoints", "epoch-0002"))
    run_local(exp, resume=True, echo=False)
    client = MlflowClient(uri)
    runs = _runs(client)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    child = next(r for r in runs if r.data.tags["role"] == "child")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train_acc")] == [1, 2]
    assert len(model_versions(uri, "flops")) == 1  # the run's network is registered once


@requires_fmnist
def test_oversized_artifact_fails_the_run_with_a_reason_and_keeps_the_local_folder(searched):
    exp, _, _ = searched
    small = with_overrides(exp, tracking={"max_artifact_mb": 0.002})
    t = Tracker(small)
    parent = t.start_parent("sweep", "sweep oversized", small, "oversized")
    child = t.start_child(parent, "trial-0", search_tags(small, "trial", "trial-0"), {})
    before = sorted(os.listdir(small.output_dir))
    assert t.finish_child(child, small.output_dir, "flops") is False
    run = t.client.get_run(child)
    assert run.info.status == "FAILED"
    assert "max_artifact_mb=0.002" in run.data.tags["failure_reason"]
    assert "arch.json" in _artifacts(t.client, child)  # what fits still went up
    assert sorted(os.listdir(small.output_dir)) == before
    t.finish_run(parent)


@requires_fmnist
def test_results_command_prints_the_pareto_table(searched, capsys):
    _, uri, result = searched
    assert main(["results", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "== flops: 1 run(s), 1 on the Pareto front (*) ==" in out
    assert result["arch"] in out
    assert main(["results", "--tracking-uri", uri, "--hardware", "pixel1"]) == 2
    assert "no finished search runs" in capsys.readouterr().err
    assert main(["results", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


@requires_fmnist
def test_deleted_experiment_name_clash_explains_the_fix(searched):
    exp, uri, _ = searched
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("doomed"))
    doomed = with_overrides(exp, tracking={"experiment": "doomed"})
    with pytest.raises(ValueError, match=r"was deleted.*mlflow experiments restore --experiment-id \d+.*mlflow gc "
                                         r".*--experiment-ids \d+.*tracking.experiment"):
        Tracker(doomed).check()  # what the drivers call before any training


class StandInTrial:
    """What the Tune callback reads from a ``ray.tune.experiment.Trial`` (Tune itself runs in the sweep's tests)."""

    def __init__(self, trial_id: str, config: dict, error: Exception | None = None):
        self.trial_id, self.config, self.error, self.last_result = trial_id, config, error, {}

    def get_error(self):
        return self.error


@requires_fmnist
def test_tune_callback_and_finish_sweep_keep_one_child_per_trial_and_register_the_front(searched, tmp_path,
                                                                                     monkeypatch):
    import pandas as pd

    exp, uri, result = searched
    base = with_overrides(exp, tracking={"experiment": "sweep-callback"})
    sweep_dir = str(tmp_path / "sweep")
    t = Tracker(base)
    parent = t.start_parent("sweep", "sweep cb", base, run_key=sweep_dir)

    def config(lam):
        key = f"pixel1-add-lam{lam:g}"
        return {"trial": {"hardware": "pixel1", "loss": "add", "lambda": lam, "beta": None, "target_ms": None,
                          "key": key}, "experiment": base.to_dict(), "sweep_dir": sweep_dir}

    done, stopped, broken = (StandInTrial("a", config(0.1)), StandInTrial("b", config(0.5)),
                             StandInTrial("c", config(0.9), RuntimeError("worker died\nboom")))
    cb = tune_callback(t, parent)
    for trial in (done, stopped, broken):
        cb.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        cb.on_trial_result(0, [], done, {"epoch": epoch, "heldout_acc": 0.5 + epoch / 10, "arch": "mb_k3_e1_c8_s1",
                                         "expected_latency_ms": 0.3, "training_iteration": epoch, "time_total_s": 1})
    cb.on_trial_result(0, [], stopped, {"epoch": 1, "heldout_acc": 0.9, "expected_latency_ms": 0.1})
    again = tune_callback(t, parent)  # a restored sweep: new callback, same trials, epoch 2 reported again
    again.on_trial_start(0, [], done)
    again.on_trial_result(0, [], done, {"epoch": 2, "heldout_acc": 0.0, "expected_latency_ms": 9.9})
    trial_dir = os.path.join(sweep_dir, "trials", "pixel1-add-lam0.1")
    shutil.copytree(exp.output_dir, trial_dir)
    os.unlink(os.path.join(trial_dir, "network", "model.pt2"))  # a sweep trial writes no program (TRIAL_PROGRAM)
    again.on_trial_complete(0, [], done)
    again.on_trial_complete(0, [], stopped)
    again.on_trial_error(0, [], broken)

    children = {r.data.tags["trial_key"]: r for r in t.client.search_runs([t.ensure_experiment()],
                                                                           "tags.role = 'child'")}
    assert sorted(children) == ["pixel1-add-lam0.1", "pixel1-add-lam0.5", "pixel1-add-lam0.9"]
    a = children["pixel1-add-lam0.1"]
    assert a.info.status == "FINISHED" and a.data.tags["outcome"] == "finished" and a.data.tags["lambda"] == "0.1"
    assert [(m.step, m.value) for m in t.client.get_metric_history(a.info.run_id, "heldout_acc")] == [(1, 0.6),
                                                                                                     (2, 0.7)]
    assert "training_iteration" not in a.data.metrics
    assert {"arch.json", "plots/arch.png", "profile/pixel1.yaml"} <= _artifacts(t.client, a.info.run_id)
    assert children["pixel1-add-lam0.5"].data.tags["outcome"] == "stopped"
    c = children["pixel1-add-lam0.9"]
    assert c.info.status == "FAILED" and c.data.tags["failure_reason"] == "boom"

    rows = [{"trial_id": "pixel1-add-lam0.1", "hardware": "pixel1", "heldout_acc": 0.7, "expected_latency_ms": 0.3,
             "on_front": True, "finished": True, "out_dir": os.path.join(sweep_dir, "trials", "pixel1-add-lam0.1")},
            {"trial_id": "pixel1-add-lam0.5", "hardware": "pixel1", "heldout_acc": 0.9, "expected_latency_ms": 0.1,
             "on_front": False, "finished": False, "out_dir": "-"}]
    pd.DataFrame(rows).to_parquet(os.path.join(sweep_dir, "pareto.parquet"))
    assert finish_sweep(t, parent, sweep_dir, {"name": "cb"}) is True
    assert t.client.get_run(parent).info.status == "FINISHED"
    assert {"pareto/pareto.parquet", "pareto/summary.json"} <= _artifacts(t.client, parent)
    versions = model_versions(uri, "pixel1")
    assert [v.tags["trial"] for v in versions] == ["pixel1-add-lam0.1"]
    assert versions[0].run_id == a.info.run_id
    # the registered model gets the program its trial did not write; the trial's folder stays as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the fluent registry
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/proxyless-pixel1/{versions[0].version}",
                                                dst_path=str(tmp_path / "registered"), tracking_uri=uri)
    program = torch.export.load(os.path.join(network_files(local), "model.pt2"))
    x = torch.randn(1, 1, 28, 28)  # the program's example batch
    torch.testing.assert_close(program.module()(x), load_network(network_files(local))(x))
    assert not os.path.exists(os.path.join(trial_dir, "network", "model.pt2"))
    assert finish_sweep(t, parent, sweep_dir, {"name": "cb"}) is True  # resumed sweep: no second version
    assert len(model_versions(uri, "pixel1")) == 1
    # only the trial that ran to the end is a front candidate when read back from MLflow
    from proxyless_ray.tracking.results import results_table

    table = results_table(uri, "sweep-callback", parent_id=parent)
    assert table["trial_id"].tolist() == [a.info.run_id]


@requires_fmnist
def test_retrain_run_is_nested_under_the_search_that_found_the_network(searched):
    from proxyless_ray.distributed.retrain import run_retrain

    exp, uri, _ = searched
    res = run_retrain(exp, os.path.join(exp.output_dir, "network"), finetune=True, epochs=1)
    t = Tracker(exp)
    search_child = t.find_trial_run(os.path.abspath(exp.output_dir))
    run_id = log_retrain(t, res, trial_key=os.path.abspath(exp.output_dir))
    run = t.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == search_child
    assert run.data.metrics["test_acc"] == pytest.approx(res["test_acc"])
    assert run.data.metrics["measured_cpu_latency_ms"] > 0
    assert {"result.json", "network/state_dict.pt"} <= _artifacts(t.client, run_id)
    assert t.client.get_run(search_child).data.metrics["retrained_test_acc"] == pytest.approx(res["test_acc"])


@requires_fmnist
@pytest.mark.ray
@pytest.mark.slow
def test_train_command_takes_runs_and_models_uris_and_logs_under_the_producing_run(searched, tmp_path, capsys):
    exp, uri, result = searched
    client = MlflowClient(uri)
    search_child = next(r for r in _runs(client) if r.data.tags["role"] == "child").info.run_id
    def retrains() -> list:  # other tests of this module may have added retrain runs already
        return [r for r in _runs(client) if r.data.tags.get("role") == "retrain"]

    before = {r.info.run_id for r in retrains()}
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("# retrain\n" + yaml.safe_dump({**exp.to_dict(), "out_dir": str(tmp_path / "runs")}))
    # runs:/<id>: through Ray Train (one worker), like the search
    assert main(["train", "--arch", f"runs:/{search_child}", str(cfg), "--workers", "1", "--epochs", "1",
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex('{\n  "arch"'):])
    assert printed["arch"] == result["arch"] and printed["measured_cpu_latency_ms"] > 0
    new = [r for r in retrains() if r.info.run_id not in before]
    assert len(new) == 1 and new[0].data.tags["mlflow.parentRunId"] == search_child
    assert new[0].data.metrics["test_acc"] == pytest.approx(printed["test_acc"])
    # models:/<name>/<version>: the registered network, fine-tuned in this process
    name = next(m.name for m in client.search_registered_models())
    assert main(["train", "--arch", f"models:/{name}/1", str(cfg), "--workers", "0", "--epochs", "1", "--finetune",
                 "--tracking-uri", uri]) == 0
    new = [r for r in retrains() if r.info.run_id not in before]
    assert len(new) == 2 and all(r.data.tags["mlflow.parentRunId"] == search_child for r in new)
