"""A two-node Ray cluster on one machine whose nodes share no disk, for tests.

The head runs on the host side of a veth pair the test makes, with no CPUs (so every trial runs
on the worker); the worker runs in its own network namespace (its own address) and its own mount
namespace, where the head's home, cache and working folders are hidden under empty tmpfs mounts.
The two share only what a real cluster's nodes would: the network to the head, an MLflow server,
an S3 server (moto), one folder that stands for a shared mount and, with ``disk_mb``, a small
tmpfs (:attr:`Cluster.disk`) that stands for a shared storage disk a test can fill.

Faults a test can inject: :meth:`Cluster.kill_worker` (then :meth:`Cluster.start_worker`),
:meth:`Cluster.kill_mlflow` (then :meth:`Cluster.start_mlflow`, same port and store) and
:meth:`Cluster.fill_disk` (then :meth:`Cluster.free_disk`).

Every process of a node runs in a PID namespace of its own (``unshare --pid --kill-child``): ending
the ``unshare`` ends the node, nothing else on the machine. Traffic goes only to the addresses the
test made. Needs root (network and mount namespaces); :func:`unavailable` says why not otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@functools.cache
def unavailable() -> str | None:
    """Why a namespaced cluster cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are not permitted here: {probe.stderr.strip()[:200]}"
    name = f"tlprobe{secrets.token_hex(3)}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` is not permitted here: {probe.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {log.read_text()[-2000:]}")


@dataclass
class Cluster:
    """Two Ray nodes, an MLflow server and an S3 server; see the module docstring."""

    root: Path  # everything of the test's own; the head's folders are under root/head
    head_ip: str
    worker_ip: str
    shared: Path  # the folder both nodes see (a shared mount)
    bucket: str = "multinode"  # made on the S3 server at start
    disk_mb: int = 0  # with >0, a tmpfs of that size at root/disk, seen by both nodes
    netns: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    mlflow_url: str = ""
    mlflow_port: int = 0
    s3_endpoint: str = ""
    env: dict = field(default_factory=dict)  # every node's environment (S3 endpoint and keys)
    procs: dict = field(default_factory=dict)  # name -> Popen

    @property
    def api(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    @property
    def disk(self) -> Path:
        """The small shared storage disk (``disk_mb``)."""
        return self.root / "disk"

    @property
    def hidden(self) -> list[Path]:
        """The head's folders the worker must not see."""
        return [self.root / "head", self.root / "driver"]

    def start(self) -> Cluster:
        suffix = secrets.token_hex(3)
        self.netns, host_if, ns_if = f"tl{suffix}", f"tlh{suffix}", f"tlw{suffix}"
        for d in (*self.hidden, self.shared, self.root / "logs", self.root / "worker"):
            d.mkdir(parents=True, exist_ok=True)
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", self.netns)
        _sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.worker_ip}/24", "dev", ns_if)
        _sh("ip", "netns", "exec", self.netns, "ip", "link", "set", ns_if, "up")
        _sh("ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up")
        if self.disk_mb:
            # Mounted before the nodes start: their mount namespaces copy it, one tmpfs for all.
            self.disk.mkdir(exist_ok=True)
            _sh("mount", "-t", "tmpfs", "-o", f"size={self.disk_mb}m", "tmpfs", str(self.disk))
        self._start_s3()
        self.start_mlflow()
        self._start_head()
        self.start_worker()
        return self

    def _popen(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "TRANSFERLAB_"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
        )
        env.update(MLFLOW_DISABLE_TELEMETRY="true", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")
        return env

    def _start_s3(self) -> None:
        port = _free_port(self.head_ip)
        self.s3_endpoint = f"http://{self.head_ip}:{port}"
        proc = self._popen("s3", [str(BIN / "moto_server"), "-H", self.head_ip, "-p", str(port)], self._base_env())
        _wait_http(self.s3_endpoint, 60, proc, self.root / "logs" / "s3.log")
        self.env = {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import boto3

        boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=self.bucket)  # fmt: skip

    def start_mlflow(self) -> None:
        """The tracking server; started again after :meth:`kill_mlflow` on the same port and store."""
        port = self.mlflow_port = self.mlflow_port or _free_port(self.head_ip)
        self.mlflow_url = f"http://{self.head_ip}:{port}"
        store = self.root / "mlflow"
        store.mkdir(exist_ok=True)
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
        cmd += ["--artifacts-destination", str(store / "artifacts"), "--host", self.head_ip, "--port", str(port)]
        cmd += ["--workers", "1", "--allowed-hosts", f"{self.head_ip}:{port},{self.head_ip}"]
        proc = self._popen("mlflow", cmd, self._base_env())
        _wait_http(f"{self.mlflow_url}/health", 300, proc, self.root / "logs" / "mlflow.log")

    def _ray_start(self, ip: str, home: Path) -> list[str]:
        return [str(BIN / "ray"), "start", "--node-ip-address", ip, "--disable-usage-stats", "--block",
                "--temp-dir", str(home / "ray")]  # fmt: skip

    def _start_head(self) -> None:
        head = self.root / "head"
        self.gcs_port, self.dashboard_port = _free_port(self.head_ip), _free_port(self.head_ip)
        env = {**self._base_env(), **self.env, "HOME": str(head), "TRANSFERLAB_CACHE": str(head / "cache")}
        cmd = self._ray_start(self.head_ip, head) + ["--head", "--num-cpus", "0", "--port", str(self.gcs_port)]
        cmd += [
            "--include-dashboard=true",
            "--dashboard-host",
            self.head_ip,
            "--dashboard-port",
            str(self.dashboard_port),
        ]
        # The head shares the host's ports with any other Ray here (a test session's own): Ray's
        # fixed defaults (the job agent's 52365 ...) would collide, and jobs would find no agent.
        for option in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        ):
            cmd += [f"--{option}", str(_free_port(""))]  # fmt: skip
        proc = self._popen("head", ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *cmd], env)
        _wait_http(f"{self.api}/api/version", 180, proc, self.root / "logs" / "head.log")

    def start_worker(self) -> None:
        """The worker node: its own address, its own disk view, 2 CPUs; joins the head."""
        worker = self.root / "worker"
        env = {**self._base_env(), **self.env, "HOME": str(worker), "TRANSFERLAB_CACHE": str(worker / "cache")}
        hide = " && ".join(f"mount -t tmpfs none {d}" for d in self.hidden)
        ray = self._ray_start(self.worker_ip, worker) + ["--address", f"{self.head_ip}:{self.gcs_port}"]
        ray += ["--num-cpus", "2"]
        script = f"{hide} && exec {' '.join(ray)}"
        cmd = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
               "--kill-child", "--mount-proc", "bash", "-c", script]  # fmt: skip
        self._popen("worker", cmd, env)
        self.wait_for_cpus(2)

    def alive_worker_cpus(self) -> float:
        """CPUs of the live nodes, as the head's state API lists them."""
        with urllib.request.urlopen(f"{self.api}/api/v0/nodes?limit=100", timeout=10) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
        return sum(n.get("resources_total", {}).get("CPU", 0) for n in nodes if n.get("state") == "ALIVE")

    def wait_for_cpus(self, cpus: float, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["worker"].poll() is not None:
                raise RuntimeError(f"the worker node exited: {(self.root / 'logs' / 'worker.log').read_text()[-2000:]}")
            try:
                if self.alive_worker_cpus() >= cpus:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the worker node did not join within {timeout:.0f}s")

    def kill_worker(self) -> None:
        """End the worker node at once, as a machine that fails does."""
        self._end("worker", signal.SIGKILL)

    def kill_mlflow(self) -> None:
        """End the tracking server at once (SIGKILL), as a crashed server or its machine does."""
        self._end("mlflow", signal.SIGKILL)

    def fill_disk(self) -> int:
        """Fill :attr:`disk` with one file until the OS says it is full; the bytes written."""
        written, chunk = 0, b"\0" * (1 << 20)
        with open(self.disk / "filler", "wb", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk)
                except OSError:  # ENOSPC, or a short write before it
                    break
        return written

    def free_disk(self) -> None:
        (self.disk / "filler").unlink(missing_ok=True)

    def _end(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            # A head whose worker was killed can take 30 s and more to end on SIGTERM (it waits
            # for the dead node's actors): a test cluster is then ended by SIGKILL instead.
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self) -> None:
        for name in ("worker", "head", "mlflow", "s3"):
            self._end(name)
        if self.netns:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        if self.disk_mb:
            subprocess.run(["umount", "--lazy", str(self.disk)], capture_output=True)
