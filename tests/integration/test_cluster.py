"""sdray on a real multi-node Ray cluster on this machine (see multinode.py): a head with no work
resources and three worker nodes with one (declared) GPU each and their own model caches.

One cluster for the module. The tests run the `sdray` CLI, `ray job submit` and `serve run`
against it, read its state over the dashboard's HTTP API, and search everything Ray wrote for
the secrets they handed it. The serving test, which loses a node, runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray.models import resolve_model

from .cli import read_metadata, run_cli
from .multinode import (
    BIN,
    LocalCluster,
    dashboard_jobs,
    files_containing,
    free_port,
    job_logs,
    job_status,
    mount_namespace_prefix,
    ray_job,
    wait_for_job,
)
from .s3 import MotoServer

pytestmark = pytest.mark.integration

BUCKET = "sdray-cluster"
WORKERS = ("w1", "w2", "w3")
FAST = [
    "--no-progress",
    "--set",
    "generation.steps=2",
    "--set",
    "generation.width=64",
    "--set",
    "generation.height=64",
    "--set",
    "batch.batch_size=8",
]
# One model actor per (declared) GPU: actors reserve a GPU each, the engine runs on CPU.
ON_GPUS = [
    "--set",
    "model.reserve_gpus_on_cpu=true",
    "--set",
    "batch.min_actors=3",
    "--set",
    "batch.max_actors=4",  # one more than there are GPUs: GPUs, not this, must bound the pool
]


# Replicas and proxies report load to Serve's autoscaler every 10 s by default; every second
# here, so that scaling up and down is seen in seconds, not minutes.
SERVE_METRICS_EVERY_SECOND = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}


def secret(kind: str) -> str:
    return f"sdray-{kind}-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3fs_client(s3):
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": s3.endpoint},
        use_listings_cache=False,
    )
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    """Unique values that must reach the workers but appear in nothing Ray writes."""
    return {
        "driver": secret("driver-aws-secret"),  # AWS_SECRET_ACCESS_KEY of a CLI driver
        "head": secret("head-aws-secret"),  # the head node's, as a Kubernetes Secret gives it
        "options": secret("storage-options-secret"),  # storage.storage_options.secret
        "api_key": secret("api-key"),  # SDRAY_API_KEYS on every node
    }


@pytest.fixture(scope="module")
def cluster(s3, secrets, model_cache):
    """Head (no CPUs, no GPUs; dashboard) + w1, w2, w3 (2 CPUs, 1 GPU each). w3 runs in its own
    mount namespace where `node_private` is an empty tmpfs, as another machine's disk would be.
    Worker nodes get no storage credentials: only what the driver forwards."""
    # A short root: Ray's Unix sockets live under it (paths are limited to 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="sdray-cluster-", dir="/tmp"))
    node_private = root / "node-private"
    node_private.mkdir()
    namespace = mount_namespace_prefix()
    local = LocalCluster(root, dict(os.environ))
    node_env = {"SDRAY_API_KEYS": secrets["api_key"], **SERVE_METRICS_EVERY_SECOND}
    try:
        local.start_head(
            env={
                **node_env,
                "AWS_ACCESS_KEY_ID": "head-key-id",
                "AWS_SECRET_ACCESS_KEY": secrets["head"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": s3.endpoint,
            }
        )
        for name in WORKERS:
            hidden = (node_private,) if name == "w3" and namespace else ()
            local.add_node(
                name,
                num_cpus=2,
                num_gpus=1,
                hidden=hidden,
                namespace_prefix=namespace,
                env=node_env,
            )
        local.node_private = node_private if namespace else None
        yield local
    finally:
        local.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def driver_env(cluster: LocalCluster, s3: MotoServer, aws_secret: str) -> dict[str, str]:
    """A CLI driver on the head's machine with its own storage credentials."""
    return cluster.client_env(
        AWS_ACCESS_KEY_ID="driver-key-id",
        AWS_SECRET_ACCESS_KEY=aws_secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=s3.endpoint,
    )


def put_prompts(fs, path: str, rows: int) -> list[str]:
    ids = [f"r{i:04d}" for i in range(rows)]
    table = pa.table({"id": ids, "prompt": [f"a lighthouse, variation {i}" for i in range(rows)]})
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle)
    return ids


def assert_secret_nowhere(cluster: LocalCluster, value: str, *more: str) -> None:
    """Neither Ray's files (session logs, runtime envs, job tables of every node) nor the
    dashboard's job info nor the given texts hold `value`."""
    written_by_ray = [cluster.temp_dir, *(cluster.root / name for name in ("head", *WORKERS))]
    leaks = [path for directory in written_by_ray for path in files_containing(directory, value)]
    assert not leaks, f"secret found in {[str(p.relative_to(cluster.root)) for p in leaks]}"
    assert value not in dashboard_jobs(cluster)
    for text in more:
        assert value not in text


@pytest.mark.parametrize("what", ["--input", "--output", "model.source"])
def test_a_local_path_one_node_cannot_see_is_refused_before_the_job(
    cluster, tmp_path, what, model_cache
):
    if cluster.node_private is None:
        pytest.skip("this machine cannot give a Ray node its own mount namespace (unshare)")
    hidden = cluster.node_private / what.strip("-").replace(".", "_")
    hidden.mkdir()
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na lighthouse\n")
    model = hidden / "model"
    args = {"--input": str(prompts), "--output": str(tmp_path / "out")}
    if what == "model.source":
        shutil.copytree(resolve_model("tiny").directory, model)
    elif what == "--input":
        args["--input"] = str(shutil.copy(prompts, hidden / "prompts.csv"))
    else:
        args["--output"] = str(hidden / "out")
    extra = ["--set", f"model.source={model}"] if what == "model.source" else []
    result = run_cli(
        ["generate", *(x for kv in args.items() for x in kv), *FAST, *extra],
        cluster.client_env(),
        timeout=240,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"sdray generate: error: {what} "), message
    assert cluster.nodes["w3"].node_id[:12] in message
    assert "shared storage" in message and "object store URI" in message
    assert not (tmp_path / "out" / "metadata").exists()


def test_a_run_spreads_over_every_node_once_per_row_with_per_node_figures(
    cluster, s3, s3fs_client, secrets
):
    fs = s3fs_client
    model = f"{BUCKET}/models/spread/"
    fs.put(str(resolve_model("tiny").directory) + "/", model, recursive=True)
    ids = put_prompts(fs, f"{BUCKET}/spread/prompts.parquet", 240)
    output = f"{BUCKET}/spread/out"
    result = run_cli(
        [
            "generate",
            "--input",
            f"s3://{BUCKET}/spread/prompts.parquet",
            "--output",
            f"s3://{output}",
            "--set",
            f"model.source=s3://{model}",
            "--set",
            "output.rows_per_shard=40",
            *FAST,
            *ON_GPUS,
        ],
        # Ray Data hands out blocks as soon as the first actor is ready, so on a run this small
        # actors that load later may find nothing left; start once all three are up.
        {
            **driver_env(cluster, s3, secrets["driver"]),
            "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
        },
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    rows = read_metadata(output, filesystem=fs)
    assert sorted(r["id"] for r in rows) == ids  # every row, once
    assert {r["status"] for r in rows} == {"ok"}
    manifest_text = fs.cat(f"{output}/manifest.json").decode()
    manifest = json.loads(manifest_text)
    workers = {cluster.nodes[name].node_id: name for name in WORKERS}
    per_node = {workers.get(n["node_id"], n["node_id"]): n for n in manifest["nodes"]}
    # A model actor on every worker node, exactly one per GPU, each making images.
    assert sorted(per_node) == sorted(WORKERS), manifest["nodes"]
    assert [n["actors"] for n in per_node.values()] == [1, 1, 1]
    assert len(manifest["actors"]) == 3
    assert all(n["images"] > 0 and n["images_per_s"] > 0 for n in per_node.values())
    assert sum(n["images"] for n in per_node.values()) == len(ids)
    # The model was copied once per worker node, into that node's own cache; never on the head.
    assert s3.requests("GET", "models/spread/unet/diffusion_pytorch_model.safetensors") == 3
    for name in WORKERS:
        copies = [p for p in (cluster.nodes[name].cache_dir / "remote").iterdir() if p.is_dir()]
        assert len(copies) == 1, (name, copies)
    print(
        f"\nspread run: {manifest['timings']}, per node: "
        + ", ".join(f"{k}={v['images']} at {v['images_per_s']}/s" for k, v in per_node.items())
    )
    # The driver's secret reached the workers (they have no credentials of their own) and
    # appears nowhere Ray or sdray wrote.
    assert_secret_nowhere(cluster, secrets["driver"], manifest_text, result.stdout, result.stderr)


REPO = Path(__file__).resolve().parents[2]


def submit(cluster: LocalCluster, script: str, *args: str) -> str:
    """`ray job submit --working-dir . -- python pipelines/SCRIPT ARGS`, as the README says;
    returns the job's submission id without waiting."""
    job_id = f"sdray-test-{uuid.uuid4().hex[:8]}"
    result = ray_job(
        cluster,
        "submit",
        "--no-wait",
        "--submission-id",
        job_id,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        f"pipelines/{script}",
        *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return job_id


def test_ray_job_submit_runs_the_generate_and_sweep_pipelines(
    cluster, s3, s3fs_client, secrets, tmp_path
):
    fs = s3fs_client
    prompts = cluster.root / "job-prompts.csv"  # local, on storage every node shares
    prompts.write_text("id,prompt\n" + "".join(f"j{i},a red fox take {i}\n" for i in range(24)))
    # Storage credentials in the config, as storage.storage_options (outside the working dir,
    # which Ray copies into its session directory).
    options = cluster.root / "options.yaml"
    options.write_text(
        json.dumps(
            {
                "storage": {
                    "storage_options": {
                        "key": "options-key-id",
                        "secret": secrets["options"],
                        "client_kwargs": {"endpoint_url": s3.endpoint},
                    }
                }
            }
        )
    )
    generate = submit(
        cluster,
        "generate.py",
        "--input",
        str(prompts),
        "--output",
        f"s3://{BUCKET}/job-generate/",  # with the head's own credentials (its pod's Secret)
        *FAST,
    )
    sweep = submit(
        cluster,
        "sweep.py",
        "configs/sweeps/guidance-vs-steps.yaml",
        "--output",
        f"s3://{BUCKET}/job-sweep/",
        "--config",
        str(options),
        "--no-progress",
    )
    for job_id in (generate, sweep):
        status = wait_for_job(cluster, job_id, timeout=480)
        assert status == "SUCCEEDED", job_logs(cluster, job_id)[-4000:]

    rows = read_metadata(f"{BUCKET}/job-generate", filesystem=fs)
    assert sorted(r["id"] for r in rows) == sorted(f"j{i}" for i in range(24))
    assert {r["status"] for r in rows} == {"ok"}
    swept = read_metadata(f"{BUCKET}/job-sweep", filesystem=fs)
    assert len(swept) == 36 and len({r["id"] for r in swept}) == 36  # 2 prompts x 3 x 3 x 2
    assert fs.exists(f"{BUCKET}/job-sweep/index.html")
    assert fs.find(f"{BUCKET}/job-sweep/contact_sheets/")
    manifests = fs.cat(f"{BUCKET}/job-sweep/manifest.json").decode()
    logs = job_logs(cluster, generate) + job_logs(cluster, sweep)
    for value in (secrets["head"], secrets["options"]):
        assert_secret_nowhere(cluster, value, manifests, logs)


@pytest.mark.timeout(900)
def test_ray_job_stop_leaves_an_output_that_resume_completes(cluster, tmp_path):
    prompts = cluster.root / "stop-prompts.csv"
    ids = [f"s{i:03d}" for i in range(72)]
    prompts.write_text("id,prompt\n" + "".join(f"{i},a lighthouse at dusk {i}\n" for i in ids))
    output = cluster.root / "stop-out"
    # Slow enough per image that the run is still going when it is stopped.
    args = ["--input", str(prompts), "--output", str(output), *FAST]
    args += ["--set", "generation.steps=8", "--set", "batch.batch_size=2"]
    args += ["--set", "output.rows_per_shard=6"]
    # One model actor, so units are generated and committed one after another, not all at
    # once at the end: the stop lands mid-run. (The resume may use more: actors can change.)
    one_actor = ["--set", "batch.min_actors=1", "--set", "batch.max_actors=1"]
    first = submit(cluster, "generate.py", *args, *one_actor)
    deadline = time.monotonic() + 300
    while not list(output.glob("metadata/*.parquet")):  # wait for a committed shard
        assert time.monotonic() < deadline, job_logs(cluster, first)[-4000:]
        assert job_status(cluster, first) in ("PENDING", "RUNNING"), job_logs(cluster, first)[
            -3000:
        ]
        time.sleep(0.5)
    stopped = ray_job(cluster, "stop", first)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert wait_for_job(cluster, first, timeout=120) == "STOPPED"
    committed = len(read_metadata(output))
    assert 0 < committed < len(ids), f"{committed} rows committed: the job was not stopped mid-run"

    second = submit(cluster, "generate.py", *args, "--resume")
    assert wait_for_job(cluster, second, timeout=480) == "SUCCEEDED", job_logs(cluster, second)
    rows = read_metadata(output)
    assert sorted(r["id"] for r in rows) == ids  # none lost, none twice
    assert {r["status"] for r in rows} == {"ok"}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["counts"]["generated_this_run"] == len(ids) - committed
    print(
        f"\nray job stop after {committed}/{len(ids)} rows; --resume made the other "
        f"{len(ids) - committed}: {manifest['timings']}"
    )


SERVE_TIMEOUT_S = 120


def serve_config(port: int) -> dict:
    """A Ray Serve config for `serve run`: the proxy on the head only (all nodes of this test
    cluster share one machine, so one port), replicas with a (declared) GPU each."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": SERVE_TIMEOUT_S},
        "applications": [
            {
                "name": "sdray",
                "route_prefix": "/",
                "import_path": "sdray.serve:build_app",
                "args": {
                    "config": {
                        "model": {"source": "tiny", "device": "cpu", "reserve_gpus_on_cpu": True},
                        "generation": {"steps": 4, "width": 64, "height": 64},
                        "serve": {
                            "min_replicas": 0,
                            "max_replicas": 2,
                            "target_ongoing_requests": 1,
                            "upscale_delay_s": 1,
                            "downscale_delay_s": 3,
                            "look_back_period_s": 12,  # above Serve's 10 s metrics interval
                            "max_ongoing_requests": 2,
                            "max_queued_requests": 8,
                            "request_timeout_s": SERVE_TIMEOUT_S,
                            "num_cpus_per_replica": 0.5,
                            "num_gpus_per_replica": 1,
                        },
                    }
                },
            }
        ],
    }


class ReplicaWatch:
    """Samples the app's running replicas (and their nodes) from the dashboard once a second."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.started = time.monotonic()
        self.samples: list[tuple[float, list[tuple[str, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def app(self) -> dict:
        """The sdray application as the dashboard reports it ({} before it exists)."""
        apps = httpx.get(f"{self.cluster.dashboard_url}/api/serve/applications/", timeout=30)
        return (apps.json().get("applications") or {}).get("sdray") or {}

    def replicas(self, stopping: bool = False) -> list[tuple[str, str]]:
        """(node name, state) of each replica now; those stopping only if asked."""
        return sorted(
            (self.cluster.name_of(r.get("node_id") or "") or "unplaced", r["state"])
            for d in (self.app().get("deployments") or {}).values()
            for r in d.get("replicas", [])
            if stopping or r.get("state") != "STOPPING"
        )

    def running(self) -> list[str]:
        """Node names of the RUNNING replicas now."""
        return [node for node, state in self.replicas() if state == "RUNNING"]

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append((time.monotonic() - self.started, self.replicas()))
            except (httpx.HTTPError, ValueError):
                pass

    def wait_for(self, predicate, what: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.running()
            if predicate(nodes):
                return nodes
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout}s; replicas over time: {self.timeline()}")

    def timeline(self) -> str:
        """Serving replicas over time, one entry per change: `t=12s: 2 (w1, w2 draining)`
        (RUNNING, and PENDING_MIGRATION = still serving on a draining node; STARTING apart)."""
        out, last = [], None
        for t, replicas in self.samples:
            if replicas == last:
                continue
            last = replicas
            serving = [
                f"{n} draining" if s == "PENDING_MIGRATION" else n
                for n, s in replicas
                if s in ("RUNNING", "PENDING_MIGRATION")
            ]
            starting = [n for n, s in replicas if s not in ("RUNNING", "PENDING_MIGRATION")]
            more = f" +{len(starting)} starting" if starting else ""
            out.append(f"t={t:.0f}s: {len(serving)} ({', '.join(serving)}){more}")
        return "; ".join(out)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class SteadyLoad:
    """`clients` threads posting /v1/generate back to back; every answer (or hang) recorded."""

    def __init__(self, url: str, key: str, clients: int) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}
        self.answers: list[int | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=SERVE_TIMEOUT_S + 30) as client:
            seed = index * 100_000
            while not self._stop.is_set():
                seed += 1
                body = {"prompt": "a lighthouse", "seed": seed}
                try:
                    response = client.post(
                        f"{self.url}/v1/generate", json=body, headers=self.headers
                    )
                    self.answers.append(response.status_code)
                except httpx.HTTPError as error:  # a hang shows as a timeout here
                    self.answers.append(type(error).__name__)

    def stop(self) -> Counter:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=SERVE_TIMEOUT_S + 60)
        return Counter(self.answers)


def post_one(url: str, key: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(
        f"{url}/v1/generate",
        json={"prompt": "a red fox", "seed": 7},
        headers={"Authorization": f"Bearer {key}"},
        timeout=SERVE_TIMEOUT_S + 30,
    )
    return response.status_code, time.monotonic() - started


@pytest.mark.timeout(900)
def test_serving_spreads_scales_and_survives_a_preempted_node(cluster, secrets, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config_path = cluster.root / "serve.yaml"
    config_path.write_text(json.dumps(serve_config(port)))
    log_path = tmp_path / "serve-run.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(BIN / "serve"), "run", str(config_path)],
            env=cluster.client_env(SDRAY_API_KEYS=secrets["api_key"]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    watch = ReplicaWatch(cluster)
    load = None
    try:
        deadline = time.monotonic() + 240
        while watch.app().get("status") != "RUNNING":
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert watch.running() == []  # min_replicas 0: nothing runs until asked
        cold_status, cold_s = post_one(url, secrets["api_key"])
        assert cold_status == 200 and cold_s < SERVE_TIMEOUT_S

        load = SteadyLoad(url, secrets["api_key"], clients=4)
        spread = watch.wait_for(lambda n: len(set(n)) == 2, "2 replicas on 2 nodes", 180)
        # A preemption notice for a node holding a replica: Serve starts one elsewhere first.
        doomed = spread[0]
        # Notice longer than the replicas' graceful shutdown (request_timeout_s + 10 s).
        cluster.drain_node(cluster.nodes[doomed], deadline_s=300)
        moved = watch.wait_for(
            lambda n: len(n) == 2 and doomed not in n, "2 replicas off the drained node", 180
        )
        # The machine goes once its replica has finished its last requests (at the latest, at
        # the notice's deadline; Serve stops replicas before it).
        deadline = time.monotonic() + 300
        while any(node == doomed for node, _ in watch.replicas(stopping=True)):
            assert time.monotonic() < deadline, watch.timeline()
            time.sleep(0.5)
        cluster.remove_node(doomed)
        answered = len(load.answers)
        deadline = time.monotonic() + 120
        while len(load.answers) < answered + 20:  # still serving, at full strength
            assert time.monotonic() < deadline, Counter(load.answers)
            time.sleep(0.5)
        assert watch.running() == moved
        answers = load.stop()
        load = None
        assert set(answers) <= {200, 503, 429}, answers  # no 500s, no hangs
        assert answers[200] > 0

        watch.wait_for(lambda n: n == [], "scale back to 0 replicas", 180)
        print(
            f"\nserve: first request after idle answered in {cold_s:.1f}s; under load "
            f"{dict(answers)}; replicas over time: {watch.timeline()}"
        )
        assert_secret_nowhere(cluster, secrets["api_key"], log_path.read_text())
    finally:
        if load is not None:
            load.stop()
        watch.stop()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            LocalCluster._kill_tree(server.pid, signal.SIGKILL)
