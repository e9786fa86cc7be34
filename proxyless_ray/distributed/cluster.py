"""Attaching to a Ray cluster someone started with ``ray start``: its address, Ray's token authentication, a fast
probe before ``ray.init``, and a watch on the head while a run is in progress.

Ray 2.60 turns token authentication on for clusters started with a token file, but only ``ray.init("auto")`` looks
for a token on the client; an explicit ``host:port`` or ``ray://`` address without ``RAY_AUTH_MODE=token`` retries
for tens of seconds with one ``InvalidAuthToken`` line a second, then fails without saying what to set. Here one gRPC
call with a short timeout asks the head first; when it wants a token the token is looked up the way Ray does
(``RAY_AUTH_TOKEN``, then the file at ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``), and a missing or wrong
token is one line naming what to set. This is the only module that uses Ray's private authentication API and its
generated gRPC stubs; ``tests/distributed/test_ray_cluster.py`` fails when they change.
"""

from __future__ import annotations

import _thread
import os
import shlex
import socket
import sys
import threading
from dataclasses import dataclass

from proxyless_ray.distributed.ray_private import enable_token_mode, recorded_address

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
# Where to find the token on the head, and how a client or job submitter uses it.
TOKEN_HINT = (f"copy the head's token (`ray get-auth-token` on the head) to {DEFAULT_TOKEN_FILE} or point "
              f"{AUTH_TOKEN_PATH} at a file holding it (or set {AUTH_TOKEN})")


class ClusterError(ValueError):
    """The Ray cluster cannot be reached or cannot ever place the requested workers."""


class ClusterLostError(RuntimeError):
    """The head of the cluster a run was using stopped answering."""


@dataclass(frozen=True)
class Endpoint:
    """A resolved cluster address: the GCS (``host:port``) or a Ray Client server (``ray://host:port``)."""

    host: str
    port: int
    client: bool

    def __str__(self) -> str:
        return f"{'ray://' if self.client else ''}{self.host}:{self.port}"


def node_cpus(cpus_per_worker: float) -> int:
    """CPUs of the smallest alive node of the connected cluster that fits a worker (this machine's when Ray is not
    connected): where a worker's threads meet the fewest cores."""
    import ray

    if ray.is_initialized():
        cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        fits = [c for c in cpus if c >= cpus_per_worker]
        if fits:
            return max(int(min(fits)), 1)
    return os.cpu_count() or 1


def effective_address(address: str | None) -> str | None:
    """The configured address, else ``RAY_ADDRESS`` (set inside ``ray job submit``), else None (embedded Ray).

    Ray's own ``ray.init()`` follows ``RAY_ADDRESS`` the same way, so a job's driver joins the job's cluster.
    """
    return address or os.environ.get("RAY_ADDRESS") or None


def resolve(address: str) -> Endpoint:
    """The endpoint ``address`` names; ``auto`` is ``RAY_ADDRESS``, else the cluster ``ray start`` recorded here."""
    given = address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or recorded_address()
        if not address:
            raise ClusterError("--address auto: no Ray cluster was started on this node (no RAY_ADDRESS and no "
                               "address file from 'ray start'); start one with 'ray start --head' or pass "
                               "--address <head>:6379")
    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise ClusterError(f"Ray address {given!r} is the dashboard's (the one 'ray job submit' takes); the search "
                           f"takes the head's GCS address (<head>:6379), 'ray://<head>:10001' or 'auto'")
    host, _, port = rest.rpartition(":")
    if scheme not in ("", "ray") or not host or not port.isdigit():
        raise ValueError(f"Ray address {given!r} is not 'auto', 'host:port' or 'ray://host:port'")
    return Endpoint(host.strip("[]"), int(port), scheme == "ray")


def check(address: str, timeout_s: float) -> Endpoint:
    """Check the cluster at ``address`` answers and accepts this process, before anything slow starts.

    Enables Ray's token mode for this process (and its children) when the head wants a token and one is found.

    Raises:
        ClusterError: One line: unreachable, not a Ray head, or the token is missing or wrong (and what to set).
    """
    endpoint = resolve(address)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(f"Ray cluster at {str(endpoint)!r} is unreachable ({err}); start it with 'ray start "
                           f"--head' or fix --address") from None
    _authenticate(endpoint, timeout_s)
    return endpoint


def attach(address: str, timeout_s: float) -> Endpoint:
    """:func:`check` the cluster at ``address``, then ``ray.init`` to it."""
    import ray

    endpoint = check(address, timeout_s)
    try:
        ray.init(address=address, configure_logging=False)
    except ConnectionError as err:
        raise ClusterError(f"cannot connect to the Ray cluster at {str(endpoint)!r}: {err}") from None
    return endpoint


def _authenticate(endpoint: Endpoint, timeout_s: float) -> None:
    """Ask the head with one short call whether it wants a token, and enable Ray's token mode when it does."""
    mode = os.environ.get(AUTH_MODE, "").lower()
    token = None if mode == "disabled" else _find_token()
    code = _probe(endpoint, token if mode == "token" else None, timeout_s)
    if code == "UNAUTHENTICATED" and mode != "token" and token is not None:
        code = _probe(endpoint, token, timeout_s)  # as Ray's "auto" does: a token found here turns token mode on
        if code is None:
            enable_token_mode()
    if code is None:
        return
    where = str(endpoint)
    if code != "UNAUTHENTICATED":
        port_hint = "the Ray Client port (ray start --ray-client-server-port, default 10001)" if endpoint.client \
            else "the head's GCS port (ray start --head --port, default 6379)"
        raise ClusterError(f"{where!r} answers but not as a Ray {'client server' if endpoint.client else 'head'} "
                           f"({code}); --address takes {port_hint}, or 'auto' on a cluster node")
    if mode == "disabled":
        raise ClusterError(f"the Ray cluster at {where!r} requires token authentication but {AUTH_MODE}=disabled "
                           f"here: unset it or set {AUTH_MODE}=token, and {TOKEN_HINT}")
    if token is None:
        raise ClusterError(f"the Ray cluster at {where!r} requires token authentication and no token was found "
                           f"here: {TOKEN_HINT}")
    raise ClusterError(f"the Ray cluster at {where!r} rejected the token from {_token_source()}: use the head's "
                       f"token (`ray get-auth-token` on the head)")


def _find_token() -> str | None:
    """The token Ray would send (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``, whitespace
    stripped: Ray's documented order), or None.

    Read here rather than through Ray's token loader: a token cached in the driver's loader while token mode is off
    made the Train controller of the run that followed die at start on a cluster without authentication.
    """
    if os.environ.get(AUTH_TOKEN, "").strip():
        return os.environ[AUTH_TOKEN].strip()
    path = os.environ.get(AUTH_TOKEN_PATH)
    if path:
        if not _readable_nonempty(path):
            # Ray aborts on an unreadable token path instead of falling back, so say it first.
            raise ClusterError(f"{AUTH_TOKEN_PATH}={path!r} is not a readable file holding a token; {TOKEN_HINT}")
    else:
        path = DEFAULT_TOKEN_FILE
    try:
        with open(os.path.expanduser(path)) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _readable_nonempty(path: str) -> bool:
    try:
        with open(os.path.expanduser(path)) as fh:
            return bool(fh.read().strip())
    except OSError:
        return False


def _token_source() -> str:
    if os.environ.get(AUTH_TOKEN):
        return AUTH_TOKEN
    if os.environ.get(AUTH_TOKEN_PATH):
        return f"{AUTH_TOKEN_PATH}={os.environ[AUTH_TOKEN_PATH]}"
    return DEFAULT_TOKEN_FILE


# One gRPC call, in a child process: gRPC's Python threads left in the driver broke the Train run that followed
# (its controller actor died at start) on a cluster_utils cluster.
_PROBE = """
import os, sys, grpc
host, port, client, timeout = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
token = os.environ.pop("PROXYLESS_PROBE_TOKEN", "")
metadata = [("authorization", "Bearer " + token)] if token else []
with grpc.insecure_channel(host + ":" + port) as channel:
    try:
        if client:
            from ray.core.generated import ray_client_pb2 as pb, ray_client_pb2_grpc as rpc
            rpc.RayletDriverStub(channel).ClusterInfo(pb.ClusterInfoRequest(type=pb.ClusterInfoType.PING),
                                                      timeout=timeout, metadata=metadata)
        else:
            from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc
            rpc.NodeInfoGcsServiceStub(channel).GetClusterId(pb.GetClusterIdRequest(), timeout=timeout,
                                                             metadata=metadata)
    except grpc.RpcError as err:
        print(err.code().name)
        sys.exit(0)
print("OK")
"""


def _probe(endpoint: Endpoint, token: str | None, timeout_s: float) -> str | None:
    """One cheap call to the GCS (its cluster id) or the Ray Client server (a ping); the gRPC status code's name
    on failure, None on success. The token travels in the child's environment, not on its command line."""
    import subprocess

    env = {**os.environ, "PROXYLESS_PROBE_TOKEN": token or ""}
    args = [sys.executable, "-c", _PROBE, endpoint.host, str(endpoint.port), "1" if endpoint.client else "0",
            str(timeout_s)]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        return "DEADLINE_EXCEEDED"
    lines = done.stdout.split()
    if done.returncode != 0 or not lines:
        raise ClusterError(f"could not probe the Ray cluster at {str(endpoint)!r}: {done.stderr.strip()[-300:]}")
    return None if lines[-1] == "OK" else lines[-1]


# -- while a run is in progress ------------------------------------------------------------------------------------


def resume_command() -> str:
    """The command line that continues this run (the CLI's own arguments plus ``--resume``)."""
    if os.path.basename(sys.argv[0]) != "proxyless-ray":
        return "the same command with --resume"
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    return shlex.join(["proxyless-ray", *args])


class HeadWatch:
    """Watches the head's port during a run; when it stops answering, the run ends with one line and the resume
    command instead of Ray's minute of GCS reconnect warnings followed by an abrupt exit.

    The main thread gets a ``KeyboardInterrupt``, which ``__exit__`` turns into :class:`ClusterLostError`; keep
    ``ray.shutdown()`` inside the ``with`` block. Ray Train's driver can stay blocked with its head gone, so if the
    ``with`` block has not ended ``exit_after_s`` later, the watch prints the line itself and exits with status 1.

    Args:
        endpoint: The cluster's endpoint (from :func:`attach`); None watches nothing.
        interval_s: Seconds between checks.
        misses: Consecutive failed checks that count as the head being gone.
        exit_after_s: Grace for the main thread to end the run after the interrupt.
    """

    def __init__(self, endpoint: Endpoint | None, interval_s: float = 2.0, misses: int = 3,
                 exit_after_s: float = 10.0):
        self.endpoint, self.interval_s, self.misses, self.exit_after_s = endpoint, interval_s, misses, exit_after_s
        self.lost: str | None = None
        self._stop = threading.Event()

    def message(self) -> str:
        return (f"the Ray head at {str(self.endpoint)!r} stopped answering ({self.lost}); the run's checkpoints are "
                f"kept: once the cluster is back, continue with: {resume_command()}")

    def _run(self) -> None:
        missed = 0
        while not self._stop.wait(self.interval_s):
            try:
                with socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=self.interval_s):
                    missed = 0
            except OSError as err:
                missed += 1
                if missed >= self.misses:
                    self.lost = str(err)
                    break
        if self.lost is None:
            return
        _thread.interrupt_main()
        if not self._stop.wait(self.exit_after_s):
            print(f"proxyless-ray: error: {self.message()}", file=sys.stderr, flush=True)
            os._exit(1)

    def __enter__(self) -> HeadWatch:
        if self.endpoint is not None:
            threading.Thread(target=self._run, name="proxyless-head-watch", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self.lost is not None:
            raise ClusterLostError(self.message()) from None
