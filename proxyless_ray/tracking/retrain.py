"""MLflow runs of retrained networks (``proxyless-ray train``, the demo's front fine-tuning).

A retraining gets its own run (``role``/``kind`` = ``retrain``), nested under the run that produced the architecture
when that is known (a ``runs:/`` or ``models:/`` source, or a sweep trial's key), so the UI shows it under the trial.
The producing run also gets ``retrained_test_acc`` and ``measured_cpu_latency_ms`` next to its search metrics.
"""

from __future__ import annotations

import os
from typing import Any

from proxyless_ray.tracking.tracker import Tracker

# latency_ratio (predicted / measured) exists only where the target is this CPU (cpu_local); None is not logged
METRICS = ("test_acc", "train_acc", "predicted_latency_ms", "measured_cpu_latency_ms", "latency_ratio")


def log_retrain(tracker: Tracker, result: dict[str, Any], trial_key: str | None = None) -> str:
    """Record one retraining: tags, params, final metrics and the exported network.

    Args:
        tracker: The tracker of the experiment the retraining ran under.
        result: :func:`proxyless_ray.distributed.retrain.run_retrain`'s result.
        trial_key: The sweep trial (or single search output folder) the network came from, when
            ``result["producing_run_id"]`` is unknown; its newest child run becomes the parent.

    Returns:
        The new run's id (``""`` with tracking disabled). An oversized or failed upload marks it FAILED with a
        ``failure_reason`` (the local folder keeps everything); nothing raises for that.
    """
    if not tracker.enabled:
        return ""
    producing = result.get("producing_run_id")
    if producing is None and trial_key is not None:
        producing = tracker.find_trial_run(trial_key)
    tags = {"role": "retrain", "kind": "retrain", "arch": str(result.get("arch")), "source": str(result.get("source")),
            "profile": str(result.get("profile")), "hardware": str(result.get("profile")),
            "finetune": str(bool(result.get("finetune"))).lower()}
    if producing:
        tags.update({"mlflow.parentRunId": producing, "producing_run_id": producing})
    if trial_key:
        tags["trial_key"] = trial_key
    name = f"retrain {trial_key or os.path.basename(str(result.get('out_dir', 'network')))}"
    client = tracker.client
    run_id = client.create_run(tracker.ensure_experiment(), tags=tags, run_name=name).info.run_id
    metrics = {k: float(result[k]) for k in METRICS if isinstance(result.get(k), (int, float))}
    measured = result.get("measured") or {}
    if isinstance(measured.get("iqr_ms"), (int, float)):
        metrics["measured_cpu_latency_iqr_ms"] = float(measured["iqr_ms"])
    tracker.log_batch(run_id, metrics=metrics, params={"epochs": str(result.get("epochs")),
                                                        "finetune": tags["finetune"], "source": tags["source"]})
    if producing:
        tracker.log_batch(producing, metrics={f"retrained_{k}" if k == "test_acc" else k: v
                                               for k, v in metrics.items() if k in ("test_acc",
                                                                                    "measured_cpu_latency_ms")})
    reasons = []
    out_dir = result.get("out_dir")
    files = [(os.path.join(out_dir, "result.json"), None)] if out_dir else []
    files += [(path, "network") for path in (result.get("files") or {}).values()]
    for path, dest in files:
        if not os.path.isfile(path):
            continue
        mb = os.path.getsize(path) / 2**20
        if mb > tracker.max_artifact_mb:
            reasons.append(f"artifact {os.path.basename(path)} is {mb:.3g} MB, over tracking.max_artifact_mb="
                           f"{tracker.max_artifact_mb:g}")
            continue
        try:
            client.log_artifact(run_id, path, dest)
        except Exception as err:  # an upload error fails the run, not the retraining
            reasons.append(f"uploading {os.path.basename(path)} failed: {type(err).__name__}: {err}")
    tracker.finish_run(run_id, "FAILED" if reasons else "FINISHED", "; ".join(reasons) or None)
    return run_id
