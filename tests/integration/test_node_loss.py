"""A node killed outright mid-run, the way spot GPU nodes die: its raylet and every process under
it SIGKILLed at once, no drain. Jobs are submitted as the README says (`ray job submit
--working-dir . -- python pipelines/...`) to `ray start` nodes (see multinode.py) whose GCS
keeps Ray's default health checks, so a lost node is declared dead only after tens of seconds,
as on a real cluster — the window in which Ray calls its actors "temporarily unavailable".

Each job must end SUCCEEDED, `ray job submit` must return 0, and the output must hold every
input row exactly once with no image missing or orphaned; losing every node that holds model
actors waits `batch.actor_wait_s`, then fails saying so; losing the head ends the job, and
`--resume` from a new head completes it. The figures print with `-s`.

SDRAY_NODE_LOSS_REPEATS=N repeats each kill moment N times (1 in CI); from 2, a run without a
kill is timed too, for the figures.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdray.cli import SHUTDOWN_WAIT_S

from .cli import check_output_once, read_metadata
from .multinode import RAY, LocalCluster, job_logs, job_status, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("SDRAY_NODE_LOSS_REPEATS", "1"))
ROWS = 48
# The job, at a size this machine runs in about half a minute: shards of 8 rows,
# batches of 2, two to three model actors (half a CPU each) over two worker nodes.
JOB = [
    "--no-progress",
    *("--set", "generation.steps=4", "--set", "generation.width=64"),
    *("--set", "generation.height=64", "--set", "batch.batch_size=2"),
    *("--set", "output.rows_per_shard=8"),
    *("--set", "batch.min_actors=2", "--set", "batch.max_actors=3"),
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MODEL_ACTOR = "UnitStage"


def start_cluster(root: Path) -> LocalCluster:
    """A head (GCS, dashboard, drivers; no CPUs for work) and worker nodes w0, w1 of 2 CPUs,
    with Ray's default health checks."""
    cluster = LocalCluster(root, dict(os.environ))
    cluster.start_head(fast_node_death=False)
    for _ in range(2):
        add_worker(cluster)
    return cluster


def add_worker(cluster: LocalCluster):
    name = f"w{len(cluster.nodes) + len(cluster.removed)}"
    return cluster.add_node(name, num_cpus=2)


@pytest.fixture(scope="module")
def cluster(model_cache):
    root = Path(tempfile.mkdtemp(prefix="sdray-loss-", dir="/tmp"))  # short: Ray's sockets
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def two_workers(cluster: LocalCluster) -> None:
    """Tests leave the cluster as their kills made it: top it up to two worker nodes."""
    while len(cluster.nodes) < 2:
        add_worker(cluster)


def write_prompts(path: Path, n: int = ROWS) -> list[str]:
    ids = [f"p{i:03d}" for i in range(n)]
    path.write_text("id,prompt\n" + "".join(f"{i},a boat at dawn take {i}\n" for i in ids))
    return ids


@dataclass
class Submitted:
    """A `ray job submit` (blocking, as a user runs it) in the background."""

    job_id: str
    proc: subprocess.Popen
    started: float

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"`ray job submit` did not return in {timeout}s:\n{out[-3000:]}")
        return self.proc.returncode, out


def submit(cluster: LocalCluster, script: str, *args: str, python=("python",)) -> Submitted:
    job_id = f"loss-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", cluster.dashboard_url]
    command += ["--submission-id", job_id, "--working-dir", str(REPO), "--"]
    proc = subprocess.Popen(
        [*command, *python, f"pipelines/{script}", *args],
        env=cluster.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Submitted(job_id, proc, time.monotonic())


def generate_job(
    cluster: LocalCluster, tmp_path: Path, *extra: str, rows: int = ROWS, python=("python",)
) -> tuple[Submitted, Path, list[str], list[str]]:
    """`ray job submit ... pipelines/generate.py` over `rows` new prompts, on two worker
    nodes: the job, its output, the input's ids and the arguments (to --resume with)."""
    two_workers(cluster)
    ids = write_prompts(tmp_path / "prompts.csv", rows)
    output = tmp_path / "out"
    args = ["--input", str(tmp_path / "prompts.csv"), "--output", str(output), *JOB, *extra]
    return submit(cluster, "generate.py", *args, python=python), output, ids, args


def model_actors(cluster: LocalCluster) -> list[dict]:
    """The model actors (Ray Data's MapWorkers of UnitStage) the cluster knows: state, node."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, limit=1000, raise_on_missing_output=False)
    found = [a if isinstance(a, dict) else a.__dict__ for a in actors]
    return [a for a in found if MODEL_ACTOR in (a.get("class_name") or "")]


def running_writes(cluster: LocalCluster) -> list[dict]:
    """Write tasks running now, with their nodes."""
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=cluster.dashboard_url,
        filters=[("state", "=", "RUNNING")],
        limit=1000,
        raise_on_missing_output=False,
    )
    found = [t if isinstance(t, dict) else t.__dict__ for t in tasks]
    return [t for t in found if "Write" in (t.get("name") or "")]


def committed(output: Path) -> int:
    return len(list(output.glob("metadata/**/*.parquet")))


def status_of(cluster: LocalCluster, job: Submitted) -> str:
    """The job's status; PENDING while `ray job submit` is still uploading its working dir."""
    try:
        return job_status(cluster, job.job_id)
    except RuntimeError as error:
        if "does not exist" in str(error):
            return "PENDING"
        raise


def logs_of(cluster: LocalCluster, job: Submitted) -> str:
    return "" if status_of(cluster, job) == "PENDING" else job_logs(cluster, job.job_id)


def wait_until(condition, what: str, job: Submitted, cluster: LocalCluster, limit: float = 300):
    """Poll `condition` until it returns a truthy value (returned), bounded; fail if the job
    ends first."""
    deadline = time.monotonic() + limit
    while True:
        found = condition()
        if found:
            return found
        if job.proc.poll() is not None or status_of(cluster, job) in TERMINAL:
            pytest.fail(f"the job ended before {what}:\n{job_logs(cluster, job.job_id)[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def worker_of(cluster: LocalCluster, node_id: str | None) -> str | None:
    name = cluster.name_of(node_id) if node_id else None
    return name if name in cluster.nodes else None


# When to kill: each returns the worker node to kill once the moment has come, else None.
def actor_starting(cluster: LocalCluster, output: Path) -> str | None:
    """A model actor placed on a worker and no shard committed yet: actors are loading."""
    if committed(output):
        pytest.fail("a shard committed before the moment to kill came")
    for actor in model_actors(cluster):
        if actor.get("state") in ("PENDING_CREATION", "ALIVE") and worker_of(
            cluster, actor.get("node_id")
        ):
            return worker_of(cluster, actor["node_id"])
    return None


def mid_unit(cluster: LocalCluster, output: Path) -> str | None:
    """Shards committing, and a worker holding a live model actor (which holds units)."""
    if committed(output) < 2:
        return None
    for actor in model_actors(cluster):
        if actor.get("state") == "ALIVE" and worker_of(cluster, actor.get("node_id")):
            return worker_of(cluster, actor["node_id"])
    return None


def mid_write(cluster: LocalCluster, output: Path) -> str | None:
    """A write task (encode, store images, commit) running on a worker."""
    if committed(output) < 1:
        return None
    for task in running_writes(cluster):
        if worker_of(cluster, task.get("node_id")):
            return worker_of(cluster, task["node_id"])
    return None


MOMENTS = {"actor-starting": actor_starting, "mid-unit": mid_unit, "mid-write": mid_write}
FIGURES: list[str] = []


def figure(line: str) -> None:
    FIGURES.append(line)
    print(f"\nnode loss: {line}")


def summary_seconds(logs: str) -> float | None:
    """The run's own wall time from its summary line (`... images/s, 37.4s; output: ...`)."""
    found = re.search(r"images ok, .*?, ([0-9.]+)s; output:", logs)
    return float(found.group(1)) if found else None


@pytest.mark.skipif(REPEATS < 2, reason="a figures run only (SDRAY_NODE_LOSS_REPEATS >= 2)")
def test_a_run_without_a_kill_for_the_figures(cluster, tmp_path):
    job, output, ids, _ = generate_job(cluster, tmp_path)
    code, out = job.wait()
    assert code == 0, out[-3000:]
    check_output_once(output, ids)
    figure(f"no kill: wall {time.monotonic() - job.started:.1f}s")


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_worker_node_killed_outright_is_a_non_event(cluster, tmp_path, moment, repeat):
    job, output, ids, _ = generate_job(cluster, tmp_path)
    victim = wait_until(lambda: MOMENTS[moment](cluster, output), moment, job, cluster)
    before, killed_at = committed(output), time.monotonic()
    cluster.remove_node(victim)  # SIGKILL to its raylet and every process under it
    code, out = job.wait()
    ended = time.monotonic()
    logs = job_logs(cluster, job.job_id)
    assert code == 0, f"`ray job submit` returned {code}:\n{out[-4000:]}"
    assert job_status(cluster, job.job_id) == "SUCCEEDED"
    check_output_once(output, ids)
    figure(
        f"{moment} #{repeat}: SUCCEEDED, wall {ended - job.started:.1f}s (run "
        f"{summary_seconds(logs)}s), {before} shards committed before the kill, job ended "
        f"{ended - killed_at:.1f}s after it; rows lost 0, duplicated 0"
    )


# The script after `python -c`, then its arguments: a driver whose exit would block forever.
HANGING_EXIT = """
import atexit, runpy, sys, threading
never = threading.Event()
threading.Thread(target=never.wait, name="never-ends").start()  # not a daemon: exit joins it
atexit.register(never.wait)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_job_that_is_done_ends_within_seconds_of_its_summary(cluster, tmp_path):
    """The driver exits once its summary prints, also when Ray's shutdown would block it: here
    a thread that never ends and an exit hook that never returns stand for a core worker
    waiting on a node that is gone."""
    job, output, ids, _ = generate_job(
        cluster, tmp_path, rows=16, python=("python", "-c", HANGING_EXIT)
    )
    summary_at = wait_until(
        lambda: summary_seconds(logs_of(cluster, job)) is not None and time.monotonic(),
        "the run's summary",
        job,
        cluster,
    )
    code, out = job.wait(timeout=120)
    ended = time.monotonic()
    assert code == 0, out[-3000:]
    check_output_once(output, ids)
    waited = ended - summary_at
    assert waited < SHUTDOWN_WAIT_S + 10, f"the job ended {waited:.0f}s after its summary"
    figure(f"a driver whose exit would block: the job ended {waited:.1f}s after its summary")


def test_every_model_actor_node_lost_waits_then_fails_and_resume_completes(cluster, tmp_path):
    job, output, ids, args = generate_job(cluster, tmp_path, "--set", "batch.actor_wait_s=10")
    wait_until(lambda: mid_unit(cluster, output), "shards committing", job, cluster)
    killed_at = time.monotonic()
    for name in list(cluster.nodes):  # all but the head
        cluster.remove_node(name)
    code, out = job.wait()
    failed_after = time.monotonic() - killed_at
    assert code != 0 and job_status(cluster, job.job_id) == "FAILED"
    logs = job_logs(cluster, job.job_id)
    assert "no model actor has been alive for 10s (batch.actor_wait_s)" in logs, logs[-3000:]
    assert "--resume" in logs
    kept = len(read_metadata(output)) if committed(output) else 0
    assert 0 < kept < len(ids)

    two_workers(cluster)
    again = submit(cluster, "generate.py", *args, "--resume")
    code, out = again.wait()
    assert code == 0, out[-3000:]
    check_output_once(output, ids)
    figure(
        f"every worker lost: FAILED {failed_after:.0f}s after the kill (actor_wait_s=10), "
        f"{kept} rows kept; --resume SUCCEEDED, rows lost 0, duplicated 0"
    )


def test_a_sweep_survives_a_worker_node_killed_outright(cluster, tmp_path):
    two_workers(cluster)
    output = tmp_path / "sweep"
    job = submit(
        cluster,
        "sweep.py",
        "configs/sweeps/guidance-vs-steps.yaml",
        "--output",
        str(output),
        "--no-progress",
        *("--set", "output.rows_per_shard=4", "--set", "batch.batch_size=2"),
    )
    victim = wait_until(lambda: mid_unit(cluster, output), "sweep shards committing", job, cluster)
    cluster.remove_node(victim)
    code, out = job.wait()
    assert code == 0, out[-3000:]
    assert job_status(cluster, job.job_id) == "SUCCEEDED"
    rows = read_metadata(output)
    check_output_once(output, sorted(row["id"] for row in rows))
    assert len(rows) == 36  # 2 prompts x 3 guidance scales x 3 step counts x 2 seeds
    figure(f"sweep, mid-unit: SUCCEEDED, wall {time.monotonic() - job.started:.1f}s")


def test_losing_the_head_ends_the_job_and_resume_from_a_new_head_completes(cluster, tmp_path):
    """Last in the module: it replaces the module's cluster with a new one."""
    job, output, ids, args = generate_job(cluster, tmp_path)
    wait_until(lambda: mid_unit(cluster, output), "shards committing", job, cluster)
    drivers = [
        (pid, line)
        for pid, line in _processes()
        if "pipelines/generate.py" in line and "job submit" not in line
    ]
    assert drivers, "the job's driver runs on the head"
    LocalCluster._kill_tree(cluster.head.proc.pid, signal.SIGKILL)
    cluster.head.proc.wait(timeout=60)
    code, out = job.wait(timeout=120)
    assert code != 0, "`ray job submit` cannot report success without a head"
    assert not [pid for pid, _ in drivers if _alive(pid)], "the driver died with its head"
    kept = len(read_metadata(output)) if committed(output) else 0
    assert kept < len(ids)
    # The old workers cannot rejoin a new GCS: a new cluster, as after a head pod is replaced.
    for name in list(cluster.nodes):
        cluster.remove_node(name)
    cluster.head = None
    fresh = start_cluster(cluster.root / "second")
    try:
        again = submit(fresh, "generate.py", *args, "--resume")
        code, out = again.wait()
        assert code == 0, out[-3000:]
        assert wait_for_job(fresh, again.job_id, timeout=60) == "SUCCEEDED"
        check_output_once(output, ids)
    finally:
        fresh.shutdown()
    figure(f"head lost: job ended, {kept} rows kept; --resume from a new head SUCCEEDED")


def _processes() -> list[tuple[int, str]]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        found.append((proc.info["pid"], " ".join(proc.info["cmdline"] or [])))
    return found


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
