"""Two test hosts on this machine: network namespaces joined by a veth pair, a Ray head in one and a
Ray worker node in the other, token authentication on, and an S3 server on the head host.

This is as close to a real two-node cluster as a single CI machine gets: separate network stacks,
real TCP between the nodes, one shared token. Needs root and iproute2 (`ip netns`); tests that use it
skip with the reason when either is missing.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HEAD_NS, WORKER_NS = "vs-head", "vs-work"
HEAD_IP, WORKER_IP = "10.77.0.1", "10.77.0.2"
RAY_PORT, S3_PORT = 6379, 5999
IFACE = {HEAD_NS: "vsh0", WORKER_NS: "vsw0"}


def available() -> str | None:
    """None when two test hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@dataclass
class Cluster:
    token: str
    env: dict = field(default_factory=dict)
    address: str = f"{HEAD_IP}:{RAY_PORT}"
    s3_endpoint: str = f"http://{HEAD_IP}:{S3_PORT}"
    temp_dir: str = ""

    def host_env(self, namespace: str) -> dict:
        # torch.distributed's gloo finds its peers through the host name, which resolves to loopback on
        # every test host: name the host's own interface instead, as multi-homed cluster nodes do.
        return {**self.env, "GLOO_SOCKET_IFNAME": IFACE[namespace]}

    def run(self, namespace: str, cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", namespace, *cmd], env=self.host_env(namespace),
                              timeout=timeout, capture_output=True, text=True, **kwargs)

    def popen(self, namespace: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", namespace, *cmd], env=self.host_env(namespace), **kwargs)


def _make_hosts() -> None:
    _sh("ip", "netns", "add", HEAD_NS)
    _sh("ip", "netns", "add", WORKER_NS)
    _sh("ip", "link", "add", "vsh0", "type", "veth", "peer", "name", "vsw0")
    _sh("ip", "link", "set", "vsh0", "netns", HEAD_NS)
    _sh("ip", "link", "set", "vsw0", "netns", WORKER_NS)
    for ns, ip in ((HEAD_NS, HEAD_IP), (WORKER_NS, WORKER_IP)):
        dev = IFACE[ns]
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "set", dev, "up")


def _remove_hosts() -> None:
    # Everything the cluster started lives in the two namespaces: end exactly those processes
    # (never `ray stop`, which would end every Ray on the machine).
    for ns in (HEAD_NS, WORKER_NS):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
    time.sleep(0.5)
    for ns in (HEAD_NS, WORKER_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _wait_for_nodes(cluster: Cluster, count: int, timeout: float = 60) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run(HEAD_NS, [sys.executable, "-c", probe, cluster.address], timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes within {timeout:.0f} s")


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 1, s3: bool = True, env: dict | None = None):
    """Yield a `Cluster` with a head and a worker node on two hosts, and an S3 server on the head host.

    Every process on either host sees `env` and the S3 credentials and endpoint, as a cluster's nodes would."""
    _remove_hosts()  # leftovers of an interrupted run
    cluster = Cluster(token=secrets.token_hex(16))
    cluster.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token,
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": cluster.s3_endpoint,
                   "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    cluster.env.pop("RAY_ADDRESS", None)
    # With this at 0 (how single-host runs keep Ray on loopback) Ray refuses to add a second node.
    cluster.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    _make_hosts()
    try:
        ray = shutil.which("ray") or "ray"
        # A private temp dir keeps this cluster out of /tmp/ray/ray_current_cluster, which a bare
        # `ray.init()` elsewhere on the machine would otherwise follow to these hosts.
        cluster.temp_dir = tempfile.mkdtemp(prefix="vs-ray-")
        common = ["--num-cpus", str(cpus_per_node), "--disable-usage-stats", "--temp-dir", cluster.temp_dir]
        head = cluster.run(HEAD_NS, [ray, "start", "--head", "--node-ip-address", HEAD_IP, "--port",
                                     str(RAY_PORT), "--include-dashboard=false", *common], timeout=120)
        if head.returncode:
            raise RuntimeError(f"ray head failed to start:\n{head.stdout}\n{head.stderr}")
        worker = cluster.run(WORKER_NS, [ray, "start", "--address", cluster.address, "--node-ip-address",
                                         WORKER_IP, *common], timeout=120)
        if worker.returncode:
            raise RuntimeError(f"ray worker node failed to start:\n{worker.stdout}\n{worker.stderr}")
        if s3:
            cluster.popen(HEAD_NS, [sys.executable, "-m", "moto.server", "-H", HEAD_IP, "-p", str(S3_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        _remove_hosts()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
