"""Checks a person would do: look at the MLflow UI after the demo, in headless Chromium. Prints one JSON object.

Starts ``proxyless-ray ui`` on the tracking store (127.0.0.1, a free port), then takes screenshots of

1. the experiment's runs: one parent per sweep with a child run per trial nested under it;
2. the same list filtered by a tag (``tags.hardware = '<hw>'``);
3. a trial's architecture picture and alpha heatmap (artifacts of a child run);
4. the sweep's Pareto plot (an artifact of the parent run);
5. the registered models (``proxyless-<hardware>``),

and reports what MLflow itself holds (runs per parent, tags, artifacts, model versions) next to the PNG paths.
Chromium comes from Debian (``apt-get install -y chromium``); the script installs it when it is missing and it may.

Usage: ``python benchmarks/mlflow_screenshot.py [--tracking-uri sqlite:///mlflow.db] [--out docs/screenshots]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse

from mlflow import MlflowClient

from proxyless_ray.tracking.server import UI_START_TIMEOUT_S, wait_healthy
from proxyless_ray.tracking.store import UI_VIEW_QUERY

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True)
    return shutil.which("chromium") or "/usr/bin/chromium"


def screenshot(browser: str, url: str, path: str) -> str:
    profile = f"/tmp/chromium-profile-{os.getpid()}"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    return path


def start_ui(uri: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """Start ``proxyless-ray ui`` and return once its address answers HTTP.

    Its output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server.
    """
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxyless_ray.cli", "ui", "--tracking-uri", uri],
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + UI_START_TIMEOUT_S
    while time.time() < deadline:
        text = open(log_path).read()
        if "MLflow UI: http://127.0.0.1:" in text:  # printed once the UI answers
            base = text[text.index("http://127.0.0.1:"):].split()[0].split("/#/")[0]  # the printed link's root
            wait_healthy(base, proc)
            return proc, base
        if proc.poll() is not None:
            raise RuntimeError(f"proxyless-ray ui exited with status {proc.returncode}: {text[-2000:]}")
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise TimeoutError(f"the MLflow UI did not start within {UI_START_TIMEOUT_S:.0f} s: "
                       f"{open(log_path).read()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{os.path.abspath('mlflow.db')}")
    parser.add_argument("--experiment", default="proxyless-ray")
    parser.add_argument("--out", default="docs/screenshots")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    client = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {args.experiment!r} at {args.tracking_uri}: run the demo first")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'parent' and tags.kind = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit("no sweep parent run: run `proxyless-ray demo` first")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    hardware = sorted({c.data.tags.get("hardware", "") for c in children})
    finished = [c for c in children if c.info.status == "FINISHED"]
    child = finished[0] if finished else children[0]
    child_artifacts = [a.path for a in client.list_artifacts(child.info.run_id)]
    parent_artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    models = {m.name: len(client.search_model_versions(f"name = '{m.name}'"))
              for m in client.search_registered_models()}
    browser = chromium()
    proc, base = start_ui(args.tracking_uri, os.path.join(args.out, "ui.log"))
    shots = {}
    try:
        eid = exp.experiment_id
        hw = child.data.tags.get("hardware", hardware[0] if hardware else "")
        filt = urllib.parse.quote(f"tags.hardware = '{hw}'")
        runs = f"{base}/#/experiments/{eid}/runs"
        view = UI_VIEW_QUERY  # the "Model training" view, as the link `proxyless-ray ui` prints opens it
        pages = {
            "runs": f"{runs}?{view}",
            "runs_filtered_by_hardware": f"{runs}?searchFilter={filt}&{view}",
            "child_arch_picture": f"{runs}/{child.info.run_id}/artifacts/plots/arch.png?{view}",
            "child_alpha_heatmap": f"{runs}/{child.info.run_id}/artifacts/plots/alpha_heatmap.png?{view}",
            "parent_pareto_plot": f"{runs}/{parent.info.run_id}/artifacts/pareto/pareto.png?{view}",
            "registered_models": f"{base}/#/models?{view}",
        }
        for name, url in pages.items():
            shots[name] = {"url": url, "png": screenshot(browser, url, os.path.join(args.out, f"{name}.png"))}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    print(json.dumps({
        "ui": base, "experiment": exp.name, "parent_run": parent.info.run_name, "children": len(children),
        "hardware_tags": hardware, "child_run": child.info.run_name, "child_artifacts": child_artifacts,
        "parent_artifacts": parent_artifacts, "registered_models": models, "screenshots": shots,
    }, indent=2))


if __name__ == "__main__":
    main()
