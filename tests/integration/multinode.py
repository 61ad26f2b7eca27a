"""A real multi-node Ray cluster on this machine: `ray start --head` plus `ray start --address`
worker nodes, each a separate raylet with its own resources, environment and model cache.

Each node is one `ray start --block` process (its own process group, explicit free ports, its
own --temp-dir), so a test can lose a node the way a cloud does: kill its whole process tree,
or drain it first (`ray drain-node`, a preemption notice). A node can be started in its own
mount namespace with empty tmpfs mounts over chosen directories, so that a path the driver sees
does not exist there — what a separate machine looks like.

Nothing here calls `ray.init` in the test process: tests drive the cluster through subprocesses
(`sdray`, `ray job submit`, `serve run`) and read its state over the dashboard's HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 180
# Secrets a node must not inherit from the test process: workers get them from the driver.
PRIVATE_ENV_PREFIXES = ("AWS_", "SDRAY_API_KEYS", "RAY_ADDRESS")
# Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists (a local `ray.init`
# writes one); this cluster is private to a test, so it runs without, whatever that file says.
AUTH = {"RAY_AUTH_MODE": "disabled"}
# GCS declares a killed node dead after about period x threshold (default 3 s x 5).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mount_namespace_prefix() -> list[str] | None:
    """An `unshare` command line that gives a process its own mount namespace, or None where
    this machine does not allow it (no root and no user namespaces)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
    ):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            return prefix
    return None


@dataclass
class RayNode:
    """One `ray start --block` process: a raylet and its helpers."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    cache_dir: Path
    resource: str  # a custom resource only this node has, to find it in the cluster's state
    hidden: tuple[Path, ...] = ()  # directories this node sees as empty
    node_id: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """A head without work resources, and worker nodes added with `add_node`."""

    root: Path
    base_env: dict[str, str]
    head: RayNode | None = None
    nodes: dict[str, RayNode] = field(default_factory=dict)
    removed: dict[str, RayNode] = field(default_factory=dict)  # nodes lost, still named
    gcs_port: int = 0
    dashboard_port: int = 0
    node_private: Path | None = None  # a directory some node sees as empty, if any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a driver process (sdray CLI, serve run) that joins this cluster."""
        env = {**self.base_env, **AUTH, "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"}
        return {**env, **extra}

    def _node_env(self, name: str, cache_dir: Path, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["SDRAY_CACHE_DIR"] = str(cache_dir)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return {**env, **AUTH, **extra}

    def _ports(self) -> list[str]:
        return [
            "--node-manager-port",
            str(free_port()),
            "--object-manager-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
        ]

    def _launch(
        self,
        name: str,
        args: list[str],
        resources: dict[str, float],
        env_extra: dict[str, str],
        hidden: tuple[Path, ...] = (),
        namespace_prefix: list[str] | None = None,
    ) -> RayNode:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        cache_dir = directory / "cache"
        resource = f"sdray_test_node_{name}"
        command = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            # Each node its own temp dir, as on separate machines: nodes sharing one would share
            # runtime_resources/, where each node's runtime-env agent unpacks a job's working
            # dir afresh, deleting the copy a driver on another node is running in.
            "--temp-dir",
            str(self.temp_dir if name == "head" else directory / "ray"),
            "--object-store-memory",
            str(300 * 1024 * 1024),
            "--resources",
            json.dumps({**resources, resource: 1}),
            *self._ports(),
            *args,
        ]
        if hidden:
            if namespace_prefix is None:
                raise RuntimeError("this machine cannot give a node its own mount namespace")
            mounts = " && ".join(f"mount -t tmpfs tmpfs '{path}'" for path in hidden)
            command = [*namespace_prefix, "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]
        log_path = directory / "ray-start.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._node_env(name, cache_dir, env_extra),
                start_new_session=True,
            )
        node = RayNode(name, proc, log_path, cache_dir, resource, tuple(hidden))
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in node.log():
            if not node.alive() or time.monotonic() > deadline:
                self._kill_tree(node.proc.pid, signal.SIGKILL)
                raise RuntimeError(f"ray node {name!r} did not start:\n{node.log()[-4000:]}")
            time.sleep(0.2)
        return node

    def start_head(
        self, env: dict[str, str] | None = None, num_cpus: int = 0, fast_node_death: bool = True
    ) -> RayNode:
        """The head: GCS and dashboard, and (by default) no CPUs or GPUs for work: drivers
        run here. `fast_node_death=False` keeps Ray's default health checks."""
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.head = self._launch(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--ray-client-server-port",
                str(free_port()),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--num-cpus",
                str(num_cpus),
                "--num-gpus",
                "0",
            ],
            {},
            {**(FAST_NODE_DEATH if fast_node_death else {}), **(env or {})},
        )
        self.head.node_id = self._joined(self.head)
        return self.head

    def add_node(
        self,
        name: str,
        *,
        num_cpus: int,
        num_gpus: int = 0,
        resources: dict[str, float] | None = None,
        hidden: tuple[Path, ...] = (),
        namespace_prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> RayNode:
        """A worker node: its own raylet, resources, model cache and (optionally) mounts."""
        node = self._launch(
            name,
            [
                "--address",
                self.address,
                "--num-cpus",
                str(num_cpus),
                "--num-gpus",
                str(num_gpus),
            ],
            resources or {},
            env or {},
            hidden,
            namespace_prefix,
        )
        self.nodes[name] = node
        node.node_id = self._joined(node)
        return node

    def _joined(self, node: RayNode) -> str:
        """The node's id once the cluster lists it; a node that never joins is killed."""
        try:
            return self._wait_for_node(node)
        except Exception:
            self._kill_tree(node.proc.pid, signal.SIGKILL)
            raise

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes as the dashboard reports them."""
        from ray.util.state import list_nodes

        nodes = list_nodes(
            address=self.dashboard_url,
            filters=[("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        return [node if isinstance(node, dict) else node.__dict__ for node in nodes]

    def name_of(self, node_id: str) -> str | None:
        """Which of this cluster's nodes has `node_id`."""
        for node in [self.head, *self.nodes.values(), *self.removed.values()]:
            if node is not None and node.node_id == node_id:
                return node.name
        return None

    def _wait_for_node(self, node: RayNode, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for info in self.alive_nodes():
                    if node.resource in (info.get("resources_total") or {}):
                        return info["node_id"]
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"node {node.name!r} did not join within {timeout}s:\n{node.log()[-3000:]}"
        )

    def wait_until_dead(self, node_id: str, timeout: float = 120) -> None:
        """Wait until the GCS no longer lists `node_id` as alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(info["node_id"] != node_id for info in self.alive_nodes()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {node_id} still alive after {timeout}s")

    def drain_node(self, node: RayNode, deadline_s: int = 120) -> None:
        """Give a node a preemption notice, as a cloud does before it takes a machine back."""
        subprocess.run(
            [
                RAY,
                "drain-node",
                "--address",
                self.address,
                "--node-id",
                node.node_id,
                "--reason",
                "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message",
                "test: node preempted",
                "--deadline-remaining-seconds",
                str(deadline_s),
            ],
            env=self.client_env(),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def remove_node(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Lose a worker node: kill its raylet and every process under it at once."""
        node = self.nodes.pop(name)
        self.removed[name] = node
        self._kill_tree(node.proc.pid, sig)
        node.proc.wait(timeout=60)

    @staticmethod
    def _kill_tree(pid: int, sig: signal.Signals) -> None:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)

    def shutdown(self) -> None:
        """Stop every node this cluster started (workers first), by process, never `ray stop`."""
        for name in list(self.nodes):
            self.remove_node(name, signal.SIGKILL)
        if self.head is not None:
            self._kill_tree(self.head.proc.pid, signal.SIGKILL)
            self.head.proc.wait(timeout=60)
            self.head = None


def files_containing(directory: Path, needle: str) -> list[Path]:
    """Every file under `directory` whose bytes contain `needle` (logs, databases, packages)."""
    data = needle.encode()
    found = []
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and data in path.read_bytes():
                found.append(path)
        except OSError:  # sockets, files removed while we looked
            pass
    return found


def ray_job(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job ARGS` against the cluster's dashboard, as a user types it."""
    return subprocess.run(
        [RAY, "job", *args[:1], "--address", cluster.dashboard_url, *args[1:]],
        env=cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_status(cluster: LocalCluster, job_id: str) -> str:
    """A submitted job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard_url).get_job_status(job_id).value)


def wait_for_job(cluster: LocalCluster, job_id: str, timeout: float) -> str:
    """Wait (bounded) until a submitted job ends; return its final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(cluster, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    logs = job_logs(cluster, job_id)[-3000:]
    raise TimeoutError(f"job {job_id} still running after {timeout}s; its log ends:\n{logs}")


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url).get_job_logs(job_id)


def dashboard_jobs(cluster: LocalCluster) -> str:
    """Everything the dashboard tells about the cluster's jobs (submitted and driver jobs)."""
    import httpx

    texts = [httpx.get(f"{cluster.dashboard_url}/api/jobs/", timeout=30).text]
    for job in json.loads(texts[0]):
        job_id = job.get("submission_id") or job.get("job_id")
        if job_id:
            texts.append(httpx.get(f"{cluster.dashboard_url}/api/jobs/{job_id}", timeout=30).text)
    return "\n".join(texts)
