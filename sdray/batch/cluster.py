"""What a job needs from a cluster of several nodes: credentials on every worker (without
writing them into Ray's logs), local paths that every node can see, and who made what
(per-node statistics)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sdray.errors import SdrayError

log = logging.getLogger(__name__)

# The driver's variables that its workers get: storage credentials and endpoints (the standard
# AWS variables), sdray's own settings, and the offline switch of the model hub library.
FORWARDED_ENV_PREFIXES = ("AWS_", "SDRAY_", "HF_HUB_OFFLINE", "S3_")
# ...but not where a node keeps its model cache (each node's own), nor serving's API keys.
NOT_FORWARDED = ("SDRAY_CACHE_DIR", "SDRAY_API_KEYS")
PATH_CHECK_TIMEOUT_S = 120.0


def forwarded_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The driver's variables to set in every worker of the job (see `worker_setup_hook`)."""
    return {
        key: value
        for key, value in environ.items()
        if key.startswith(FORWARDED_ENV_PREFIXES) and key not in NOT_FORWARDED
    }


def worker_setup_hook(env: dict[str, str]) -> Callable[[], None]:
    """A Ray `worker_process_setup_hook` that sets `env` in each worker process as it starts.

    Ray stores a callable hook in the GCS's key-value store and puts only its key and name in
    the job's runtime_env, whereas `runtime_env={"env_vars": ...}` is written in full to the
    runtime-env agent's log, the dashboard's job info and the job table: the values (secret
    keys among them) stay out of all three this way.
    """

    def sdray_worker_env() -> None:
        os.environ.update(env)

    return sdray_worker_env


def runtime_env_for_driver() -> dict[str, Any] | None:
    """The runtime_env a driver passes to `ray.init`: its forwarded variables, as a hook."""
    env = forwarded_env()
    return {"worker_process_setup_hook": worker_setup_hook(env)} if env else None


# --- A Ray that the driver starts itself -------------------------------------------------------

# Ray keeps at most this many worker processes once they fall idle (default: one per CPU) and
# counts a run's actors in it: with a run's model actors, id registry and Ray Data's own actors
# on a small machine, every task worker idle for a second was killed, and the next task paid a
# new process (about 2 s of imports). Room for the task slots of sdray's quarter-CPU stages and
# the actors instead.
WORKER_POOL_ENV = "RAY_num_workers_soft_limit"


def worker_pool_size(cpus: int | None = None) -> int:
    return 4 * (cpus or os.cpu_count() or 1) + 8


@contextmanager
def local_ray_settings(cpus: int | None = None) -> Iterator[None]:
    """Around a `ray.init` that may start a local Ray: its raylet keeps `worker_pool_size` idle
    workers (unless this environment sets the limit itself). A Ray it connects to instead keeps
    its own settings; the driver's environment is left as it was."""
    if WORKER_POOL_ENV in os.environ:
        yield
        return
    os.environ[WORKER_POOL_ENV] = str(worker_pool_size(cpus))
    try:
        yield
    finally:
        os.environ.pop(WORKER_POOL_ENV, None)


# --- Local paths that every node must see -------------------------------------------------


def describe_path(path: str) -> tuple | None:
    """What a node sees at a local path: None when nothing; else its kind and, for a file, its
    size and modification time, for a directory its entry names (so that two different disks
    mounted at the same path on two machines tell apart)."""
    try:
        if os.path.isdir(path):
            return ("dir", tuple(sorted(os.listdir(path))))
        stat = os.stat(path)
        return ("file", stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None


def _describe_on_node(paths: list[str]) -> dict[str, Any]:
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "seen": [describe_path(path) for path in paths],
    }


def local_path(uri: str | None) -> str | None:
    """The path of a local (or file://) URI, None for object stores, `tiny` and unset."""
    if not uri or uri == "tiny":
        return None
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None if "://" in uri else uri


def check_paths_on_every_node(paths: dict[str, str | None], output: str | None = None) -> None:
    """Refuse a job whose local paths some node of the cluster cannot see, in one line.

    `paths` maps what a path is ("input", "model.source") to a URI; `output` is the output
    URI, whose directory gets a probe file that every node must see (a node may well have a
    directory of the same name on its own disk). Object store URIs need no check, nor does a
    one-node cluster. Runs a tiny task pinned to each alive node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    named = {label: p for label, uri in paths.items() if (p := local_path(uri)) is not None}
    output_dir = local_path(output)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or not (named or output_dir):
        return
    probe = None
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".sdray-probe-{uuid.uuid4().hex}")
        open(probe, "w").close()
        named["--output"] = probe
    try:
        labels, checked = list(named), list(named.values())
        expected = [describe_path(p) for p in checked]
        describe = ray.remote(num_cpus=0, max_retries=0)(_describe_on_node)
        refs = [
            describe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(checked)
            for n in nodes
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PATH_CHECK_TIMEOUT_S)
        if len(ready) < len(refs):
            raise SdrayError(
                f"could not check within {PATH_CHECK_TIMEOUT_S:.0f}s that every Ray node sees "
                f"the job's local paths ({', '.join(checked)}); a node is unresponsive"
            )
        for report in _reports(refs):
            for label, path, want, seen in zip(
                labels, checked, expected, report["seen"], strict=True
            ):
                if seen != want:
                    shown = output if label == "--output" else path
                    state = "does not exist" if seen is None else "holds something else"
                    raise SdrayError(
                        f"{label} {shown!r} {state} on Ray node {report['node_id'][:12]} "
                        f"({report['host']}): every node must see a local path; use shared "
                        "storage mounted at the same path on every node, or an object store "
                        "URI (s3://, gs://, ...)"
                    )
    finally:
        if probe is not None:
            os.remove(probe)


def _reports(refs) -> list[dict[str, Any]]:
    """The nodes' answers; a node that died meanwhile has nothing left to check."""
    import ray

    reports = []
    for ref in refs:
        try:
            reports.append(ray.get(ref))
        except ray.exceptions.RayError as error:
            log.warning("skipping a node that left during the path check: %s", error)
    return reports


# --- Per-node statistics ----------------------------------------------------------------


def actor_identity() -> dict[str, Any]:
    """Who a model actor is, for the per-node figures: its Ray actor and node, host and pid
    (outside Ray, the process alone)."""
    import ray

    identity = {"actor_id": f"process-{os.getpid()}", "node_id": "", "host": socket.gethostname()}
    if ray.is_initialized():
        context = ray.get_runtime_context()
        identity.update(
            actor_id=context.get_actor_id() or identity["actor_id"], node_id=context.get_node_id()
        )
    return {**identity, "pid": os.getpid()}


def later_figures(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Of two snapshots of one model actor's running totals, the later (the one with more done)."""
    key = lambda f: (f["images"] + f["errors"], f["busy_s"])  # noqa: E731
    return b if key(b) > key(a) else a


def summarize(actors: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per actor and per node: images made, rows failed, busy seconds, images per busy second
    (actors that generated nothing are left out)."""
    nodes: dict[str, dict[str, Any]] = {}
    actors = [dict(a) for a in actors if a["images"] or a["errors"]]
    for actor in actors:
        actor["images_per_s"] = (
            round(actor["images"] / actor["busy_s"], 4) if actor["busy_s"] else 0.0
        )
        actor["busy_s"] = round(actor["busy_s"], 3)
        node = nodes.setdefault(
            actor["node_id"],
            {
                "node_id": actor["node_id"],
                "host": actor["host"],
                "actors": 0,
                "images": 0,
                "errors": 0,
                "images_per_s": 0.0,
            },
        )
        node["actors"] += 1
        node["images"] += actor["images"]
        node["errors"] += actor["errors"]
        node["images_per_s"] = round(node["images_per_s"] + actor["images_per_s"], 4)
    key = lambda entry: (-entry["images"], entry["node_id"])  # noqa: E731
    return {"nodes": sorted(nodes.values(), key=key), "actors": sorted(actors, key=key)}
