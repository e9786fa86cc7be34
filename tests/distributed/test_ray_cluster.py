"""The cluster path a user takes: a real ``ray start --head`` with token authentication, searched on through
``--address host:port``, ``auto`` and ``ray job submit``, a sweep, and the missing or wrong token and the dead head.

The module starts one head for all its tests the way the README says (``ray get-auth-token --generate``, then ``ray
start --head`` finds the token file), but in its own home, temp dir (``RAY_TMPDIR``: its address file is there) and
free ports, since other Ray clusters may run on this machine; it stops exactly the processes it started: the ``ray
start --block`` session and anything whose command line names its temp dir or ports. Never a global ``ray stop``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from proxyless_ray.distributed import cluster as ray_cluster
from proxyless_ray.distributed.cluster import ClusterError, check, resolve
from proxyless_ray.sweeps.sweep import fallback_note

from conftest import requires_fmnist, sqlite_store, tiny_experiment

pytestmark = [pytest.mark.ray, pytest.mark.slow, requires_fmnist]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ray, proxyless-ray
PORTS = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env",
         "metrics")
WORKER_PORTS = 40  # the workers, actors and drivers of this module's runs, at most, at once


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    """A ``ray start --head --block`` in its own session, home, temp dir and ports, with token authentication."""

    tmp: Path
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def token_file(self) -> Path:
        return self.tmp / "head_home" / ".ray" / "auth_token"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def client(self) -> str:
        return f"ray://127.0.0.1:{self.ports['client']}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """A user's shell on this machine: no Ray variables, and a home without ``~/.ray/auth_token``."""
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(HOME=str(home), PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
        env.update(extra)
        return env

    def start(self) -> None:
        # The head node's shell: its own home for the token file, its own Ray temp dir (and address file) for
        # every Ray process it starts, which 'auto' inside them would otherwise resolve by listing all GCS
        # processes on the machine.
        # GRPC_ENABLE_FORK_SUPPORT=0: Ray Client's proxy forks its per-client server while gRPC threads run, and
        # under load the child often aborts in gRPC's fork handlers (ray-project/ray#63202).
        self.env = self.client_env(HOME=str(self.tmp / "head_home"), RAY_TMPDIR=str(self.tmp),
                                   GRPC_ENABLE_FORK_SUPPORT="0")
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True)
        p = self.ports
        workers = free_ports(WORKER_PORTS)
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={p['gcs']}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
               f"--ray-client-server-port={p['client']}", f"--node-manager-port={p['node_manager']}",
               f"--object-manager-port={p['object_manager']}", f"--dashboard-agent-listen-port={p['agent_listen']}",
               f"--dashboard-agent-grpc-port={p['agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env']}",
               f"--metrics-export-port={p['metrics']}", "--worker-port-list=" + ",".join(map(str, workers)),
               f"--temp-dir={self.tmp / 'ray'}", "--num-cpus=2", '--resources={"driver_slot": 64}',
               "--disable-usage-stats"]
        log_path = self.tmp / "ray_start.log"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + 120
        # 'ray start --block' says so once the node is up; it exits (taking the node down) if a process dies
        while "block forever" not in log_path.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        for port in (p["gcs"], p["dashboard"], p["client"]):
            while not _answers(port):
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        """This head's processes: its session, plus drivers and jobs that name its temp dir or ports."""
        marks = (str(self.tmp), f":{self.ports['gcs']}", f":{self.ports['client']}")
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid == os.getpid():
                    continue
                if (self.proc is not None and os.getsid(proc.pid) == self.proc.pid) or \
                        any(m in arg for arg in proc.info["cmdline"] or [] for m in marks):
                    found.append(proc)
            except (OSError, psutil.Error):
                pass
        return found

    def kill(self) -> None:
        victims = self.processes()
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=30)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def head():
    # Ray's socket paths must stay under 107 characters: a short folder of our own, not pytest's tmp_path.
    heads = []
    try:
        for attempt in range(2):  # a head node can time out starting on a machine busy with other clusters
            tmp = Path(tempfile.mkdtemp(prefix="prc_", dir="/tmp"))
            heads.append(Head(tmp, dict(zip(PORTS, free_ports(len(PORTS))))))
            try:
                heads[-1].start()
                break
            except RuntimeError:
                heads[-1].kill()
                if attempt:
                    raise
        yield heads[-1]
    finally:
        for h in heads:
            h.kill()
            shutil.rmtree(h.tmp, ignore_errors=True)


def write_experiment(tmp_path, **sections) -> tuple[Path, Path]:
    """A tiny 2-worker search as a YAML file; returns it and the output folder."""
    sections.setdefault("dist", {})
    sections["dist"] = {"workers": 2, "connect_timeout_s": 10, **sections["dist"]}
    sections["data"] = {"train_subset": 128, "heldout_size": 64, "test_subset": 128, **sections.get("data", {})}
    sections["train"] = {"epochs": 1, "warmup_epochs": 0, **sections.get("train", {})}
    exp = tiny_experiment(tmp_path, **sections)
    path = tmp_path / "exp.yaml"
    path.write_text("# a tiny search on a ray start cluster\n" + yaml.safe_dump(exp.to_dict()))
    return path, Path(exp.output_dir)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    """``proxyless-ray ARGS`` (or another venv command) in its own session; killed with all it started on timeout."""
    exe = args[0] if args[0] == "ray" else "proxyless-ray"
    cmd = [str(BIN / exe), *(args[1:] if exe == "ray" else args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=str(REPO))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sid = proc.pid
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    p.kill()
            except (OSError, psutil.Error):
                pass
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-4000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    done.pid = proc.pid
    return done


def driver_logs(head: Head, pid: int) -> list[Path]:
    """The core-worker logs a driver with this pid left in the head's session: proof it joined this cluster."""
    return list((head.tmp / "ray" / "session_latest" / "logs").glob(f"python-core-driver-*_{pid}.log"))


# -- connecting: found tokens, missing and wrong ones -----------------------------------------------------------


def test_address_resolution(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6390")
    assert str(resolve("auto")) == "10.0.0.5:6390"
    assert resolve("ray://head:10001") == ray_cluster.Endpoint("head", 10001, client=True)
    assert ray_cluster.effective_address(None) == "10.0.0.5:6390"
    assert ray_cluster.effective_address("auto") == "auto"
    with pytest.raises(ClusterError, match="dashboard's"):
        resolve("http://head:8265")
    with pytest.raises(ValueError, match="'head' is not 'auto', 'host:port'"):
        resolve("head")


def test_search_without_a_token_says_what_to_set_in_one_line(head, tmp_path):
    exp, _ = write_experiment(tmp_path)
    t0 = time.time()
    res = run_cli(["search", str(exp), "--address", head.gcs], head.client_env(), timeout=120)
    elapsed = time.time() - t0
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stdout[-3000:]
    assert lines == [f"proxyless-ray search: error: the Ray cluster at '{head.gcs}' requires token authentication "
                     f"and no token was found here: {ray_cluster.TOKEN_HINT}"], res.stdout[-3000:]
    assert elapsed < 60, "the CLI must not sit in Ray's 20-30 s of reconnect attempts"  # it starts in ~5-12 s


def test_wrong_or_unreadable_token_is_refused_before_ray_init(head, monkeypatch, tmp_path):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(head.tmp / "home"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    for address in (head.gcs, head.client):
        t0 = time.time()
        with pytest.raises(ClusterError, match=f"'{address}' rejected the token from RAY_AUTH_TOKEN"):
            check(address, 10)
        assert time.time() - t0 < 15  # two probes in child processes, not Ray's 20-30 s retry loop
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*missing.* is not a readable file"):
        check(head.gcs, 10)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ClusterError, match="requires token authentication but RAY_AUTH_MODE=disabled here"):
        check(head.gcs, 10)
    with pytest.raises(ClusterError, match="answers but not as a Ray head"):
        check(f"127.0.0.1:{head.ports['dashboard']}", 5)


def test_ray_client_address_finds_the_token_and_connects(head):
    # Ray Client (ray://): the same probe and token look-up, then a real client session
    code = ("import sys, ray\nfrom proxyless_ray.distributed.cluster import attach\nattach(sys.argv[1], 30)\n"
            "print('driver_slot', ray.cluster_resources().get('driver_slot'), ray.get(ray.remote(lambda: 7).remote()))")
    env = head.client_env(RAY_AUTH_TOKEN_PATH=str(head.token_file))
    res = subprocess.run([sys.executable, "-c", code, head.client], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "driver_slot 64.0 7" in res.stdout


# -- searching on the cluster ------------------------------------------------------------------------------------


def test_two_worker_search_by_host_port_finds_the_token_file(head, tmp_path):
    exp, out = write_experiment(tmp_path)
    env = head.client_env(RAY_AUTH_TOKEN_PATH=str(head.token_file))  # RAY_AUTH_MODE unset, as a user has it
    proc_out = run_cli(["search", str(exp), "--address", head.gcs], env)
    assert proc_out.returncode == 0, proc_out.stdout[-4000:]
    assert "InvalidAuthToken" not in proc_out.stdout
    result = json.loads(proc_out.stdout.strip().splitlines()[-1])
    assert json.loads((out / "result.json").read_text())["arch"] == result["arch"]


def test_ray_job_submit_runs_the_search_and_tracks_it(head, tmp_path):
    uri = sqlite_store(tmp_path)  # absolute: the job's working directory is Ray's own
    # one worker: the two-worker search by host:port above covers sharding on this cluster
    exp, out = write_experiment(tmp_path, dist={"workers": 1},
                                tracking={"enabled": True, "uri": uri, "register_models": False})
    # The submitter needs the cluster's token (Ray's job CLI does not turn token mode on by itself).
    env = head.client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_file))
    submit = ["ray", "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
              "proxyless-ray", "search", str(exp)]  # no --address: the job's RAY_ADDRESS is the cluster
    for _ in range(4):  # a head still registering its job agent answers so (once in a loaded suite run): Ray's advice
        res = run_cli(submit, env)
        if "No available agent to submit job, please try again later" not in res.stdout:
            break
        time.sleep(10)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "succeeded" in res.stdout, res.stdout[-4000:]
    assert (out / "arch.json").is_file() and (out / "network" / "model.pt2").is_file()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(tiny_experiment(tmp_path).tracking.experiment)
    runs = list(client.search_runs([found.experiment_id]))
    assert sorted(r.data.tags["role"] for r in runs) == ["child", "parent"]
    assert all(r.info.status == "FINISHED" for r in runs)
    child = next(r for r in runs if r.data.tags["role"] == "child")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "heldout_acc")] == [1]
    assert child.data.tags["derived_arch"] == json.loads((out / "result.json").read_text())["arch"]


def test_sweep_of_two_trials_on_the_cluster_found_by_auto(head, tmp_path):
    exp, _ = write_experiment(tmp_path, name="sweep", dist={"workers": 1},
                              sweep={"hardware": ["pixel1", "v100_roofline"], "lambdas": [0.5], "scheduler": "fifo",
                                     "workers_per_trial": 1})
    # 'auto' on the head node: the address file 'ray start' wrote in its temp dir, and the token in the environment
    # (searches and sweeps connect through the same function; a search is reached by host:port above)
    env = head.client_env(RAY_TMPDIR=str(head.tmp), RAY_AUTH_TOKEN=head.token_file.read_text())
    res = run_cli(["sweep", str(exp), "--address", "auto"], env)
    assert res.returncode == 0, res.stdout[-4000:]
    assert driver_logs(head, res.pid), "the driver must have joined this module's cluster, not another one here"
    assert "no 'driver_slot' resource" not in res.stdout  # the head has one: trials hold shares of it
    assert len(re.findall(r"^\[sweep +\d+s\] finished ", res.stdout, re.M)) == 2, res.stdout[-4000:]
    # Ray's own helpers inside the cluster resolve 'auto' too; other clusters on this machine must not confuse them
    assert "Please specify the one to connect to" not in res.stdout
    report = next(ln for ln in res.stdout.splitlines() if ln.startswith("Sweep report: "))
    assert os.path.isfile(report.split()[2])


def test_sweep_says_it_falls_back_without_driver_slots(tmp_path):
    exp = tiny_experiment(tmp_path, sweep={"hardware": ["pixel1"], "scheduler": "pareto"})
    note = fallback_note(exp, {"CPU": 4.0})
    assert "no 'driver_slot' resource, falling back" in note and "at most 4 run at once" in note
    assert "first rung is asynchronous" in note
    assert fallback_note(exp, {"CPU": 4.0, "driver_slot": 64.0}) is None


# -- last: the head dies mid-search (the module's cluster ends here) ----------------------------------------------


def test_head_dying_mid_search_ends_the_driver_with_the_resume_command(head, tmp_path):
    exp, _ = write_experiment(tmp_path, dist={"workers": 1},
                              train={"epochs": 30, "warmup_epochs": 1, "max_steps_per_epoch": 2})
    env = head.client_env(RAY_AUTH_TOKEN_PATH=str(head.token_file))
    cmd = [str(BIN / "proxyless-ray"), "search", str(exp), "--address", head.gcs]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    guard = threading.Timer(300, proc.kill)  # never hang the suite if the run neither reaches epoch 1 nor ends
    guard.start()
    try:
        for line in proc.stdout:  # wait for the first epoch, so the run has a checkpoint to resume from
            lines.append(line)
            if "epoch   1" in line:
                break
        assert proc.poll() is None, "".join(lines)[-4000:]
        driver = psutil.Process(proc.pid)
        head_session = [p for p in head.processes() if p.pid != proc.pid and p not in driver.children(True)]
        for p in head_session:  # the head node dies: every process of its session, not the driver
            try:
                p.kill()
            except psutil.Error:
                pass
        t0 = time.time()
        out, _ = proc.communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
    # one line, from the CLI or (when Ray keeps the driver blocked) from the watch itself
    errors = [ln for ln in out.splitlines() if re.match(r"proxyless-ray( search)?: error:", ln)]
    assert proc.returncode == 1, out[-4000:]
    assert len(errors) == 1 and "stopped answering" in errors[0], out[-4000:]
    assert f"proxyless-ray search {exp} --address {head.gcs} --resume" in errors[0]
    assert elapsed < 60, "the driver must not wait out Ray's 60 s GCS reconnect timeout"
