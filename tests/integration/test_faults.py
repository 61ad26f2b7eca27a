"""Faults on a real multi-node Ray cluster (several raylets on this machine): a node lost or
added mid-run, a commit Ray never heard of, a driver lost and its run resumed from another
machine while the old run, still alive, is fenced off. Every input row ends up in the output
exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .cli import SDRAY

pytestmark = pytest.mark.integration

ROWS = 16
JOB = [  # generation, not writing, is the slow part: model actors are busy while shards commit
    "--no-progress",
    *("--set", "generation.steps=50", "--set", "generation.width=64"),
    *("--set", "generation.height=64", "--set", "batch.batch_size=2"),
    *("--set", "output.rows_per_shard=2"),
]
# A model actor needs 0.6 of a worker node's one CPU: at most one per node.
ONE_ACTOR_PER_NODE = ["--set", "batch.num_cpus_per_actor=0.6"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_cache):
    """A head without work resources and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": str(root / "ray")},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def worker_nodes(cluster, count: int) -> list:
    """Exactly `count` worker nodes (tests leave the cluster as their faults made it)."""
    while len(cluster.worker_nodes) > count:
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return sorted(cluster.worker_nodes, key=lambda node: node.node_id)


@pytest.fixture
def env(cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}


def write_prompts(path: Path, n: int = ROWS) -> None:
    ids = [f"r{i:03d}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a harbour, view {i}" for i in ids]}), path)


def committed(output: Path) -> int:
    return (
        len(list((output / "metadata").glob("*.parquet"))) if (output / "metadata").exists() else 0
    )


def wait_for(condition, what: str, driver: subprocess.Popen | None = None, limit: float = 240):
    deadline = time.monotonic() + limit
    while not condition():
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{driver.communicate()[1][-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finish(driver: subprocess.Popen, limit: float = 600) -> tuple[str, str]:
    try:
        return driver.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
        pytest.fail(f"the run hung:\n{err[-4000:]}")


def check_every_row_once(output: Path, n: int = ROWS) -> list[dict]:
    import hashlib

    rows = pq.read_table(output / "metadata").to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n, "every input row exactly once"
    assert set(ids) == {f"r{i:03d}" for i in range(n)}
    for row in rows:
        assert row["status"] == "ok", row
        data = (output / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    stored = {p.relative_to(output).as_posix() for p in (output / "images").rglob("*.png")}
    assert stored == {r["image_path"] for r in rows}, "no image without its committed row"
    return rows


def model_actors(cluster) -> dict[str, list[str]]:
    """Node id -> states of the model actors (Ray Data's MapWorkers) that were placed there."""
    nodes: dict[str, list[str]] = {}
    for actor in cluster.global_state.actor_table(None).values():
        if "UnitStage" in actor["ActorClassName"] or actor["ActorClassName"] == "MapWorker":
            nodes.setdefault(actor["Address"]["NodeID"], []).append(actor["State"])
    return nodes


def test_a_node_lost_mid_run_and_a_commit_ray_never_heard_of(cluster, env, tmp_path):
    source, output = tmp_path / "prompts.parquet", tmp_path / "out"
    write_prompts(source)
    marker = tmp_path / "exited-after-commit"
    started = time.monotonic()
    driver = subprocess.Popen(
        [SDRAY, "generate", "--input", str(source), "--output", str(output), *JOB]
        + [*ONE_ACTOR_PER_NODE, "--set", "batch.min_actors=2", "--set", "batch.max_actors=2"],
        env={**env, "SDRAY_TEST_EXIT_AFTER_COMMIT": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lost = worker_nodes(cluster, 2)[-1]

    def busy() -> bool:  # shards committing, and the node still holding a model actor
        return committed(output) >= 1 and "ALIVE" in model_actors(cluster).get(lost.node_id, [])

    wait_for(busy, "a committed shard", driver)
    cluster.remove_node(lost)
    out, err = finish(driver)
    elapsed = time.monotonic() - started
    assert driver.returncode == 0, err[-4000:]
    assert marker.exists(), "a write task exited right after its commit"
    check_every_row_once(output)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    # The task that exited after committing was retried, and its retry found the shard done.
    assert manifest["committed_by_other_attempts"] >= 1
    print(f"run with a node lost: {elapsed:.0f}s")


def test_a_node_lost_while_reading_and_one_added_later(cluster, env, tmp_path):
    """Lost as soon as the job is planned (its read tasks and model actors starting): the run
    goes on with one model actor, the other waiting for room; a new node joins and gets it, so
    the pool is back at max_actors."""
    first, _ = worker_nodes(cluster, 2)
    source, output = tmp_path / "prompts.parquet", tmp_path / "out"
    write_prompts(source)
    driver = subprocess.Popen(
        [SDRAY, "generate", "--input", str(source), "--output", str(output), *JOB]
        + [*ONE_ACTOR_PER_NODE, "--set", "batch.min_actors=2", "--set", "batch.max_actors=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (output / "manifest.json").exists(), "the job to be planned", driver)
    cluster.remove_node(first)
    wait_for(lambda: committed(output) >= 2, "two committed shards", driver)
    added = cluster.add_node(num_cpus=1)
    wait_for(
        lambda: added.node_id in model_actors(cluster), "a model actor on the new node", driver
    )
    out, err = finish(driver)
    assert driver.returncode == 0, err[-4000:]
    check_every_row_once(output)


RESUME_ELSEWHERE = """
import sys
from sdray.batch import lease
here = lease._machine()
lease._machine = lambda: {**here, "host": "machine-b"}  # another machine, as the lease sees it
lease.STALE_AFTER_SECONDS, lease.HEARTBEAT_SECONDS = 3.0, 0.5
from sdray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_lost_driver_is_resumed_from_another_machine_and_the_old_run_is_fenced(
    cluster, env, tmp_path
):
    """Driver A is cut off mid-run (stopped: alive, but no longer renewing its lease); the same
    command with --resume on machine B takes the lease over once it has gone unrenewed and
    completes the output. When A comes back it commits nothing more and says why; a driver
    killed outright is resumed the same way."""
    worker_nodes(cluster, 2)
    source, output = tmp_path / "prompts.parquet", tmp_path / "out"
    write_prompts(source)
    command = ["generate", "--input", str(source), "--output", str(output), *JOB]
    small = ["--set", "batch.num_cpus_per_actor=0.25", "--set", "batch.max_actors=1"]
    a = subprocess.Popen(
        [SDRAY, *command, *small],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: committed(output) >= 2, "two committed shards", a)
    a_run = json.loads((output / ".sdray-lease.json").read_text())["run"]
    a.send_signal(signal.SIGSTOP)
    try:
        b = subprocess.Popen(
            [sys.executable, "-c", RESUME_ELSEWHERE, *command, *small, "--resume"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def taken() -> bool:
            try:
                return json.loads((output / ".sdray-lease.json").read_text())["run"] != a_run
            except (OSError, ValueError):
                return False

        wait_for(taken, "machine B to take the lease over", b)
    finally:
        a.send_signal(signal.SIGCONT)
    a_out, a_err = finish(a)
    b_out, b_err = finish(b)
    assert b.returncode == 0, b_err[-4000:]
    assert "watching for up to 3s whether that run still renews it" in b_err
    assert a.returncode != 0 and f"run {a_run} no longer holds the output's lease" in a_err
    rows = check_every_row_once(output)
    after = [r for r in rows if f"-{a_run[:8]}/" in r["image_path"]]
    assert len(after) < ROWS, "B wrote what A had not"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["status"] == "complete"

    # Killed outright this time (its Ray job goes with it), and resumed from machine B again.
    killed = tmp_path / "killed"
    a = subprocess.Popen(
        [SDRAY, *command[:4], str(killed), *command[5:], *small, "--set", "generation.steps=10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: committed(killed) >= 2, "two committed shards", a)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    resumed = subprocess.run(
        [sys.executable, "-c", RESUME_ELSEWHERE, *command[:4], str(killed), *command[5:]]
        + [*small, "--set", "generation.steps=10", "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    check_every_row_once(killed)
