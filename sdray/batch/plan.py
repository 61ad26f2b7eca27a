"""Planning an offline job: which read task reads which units, what an earlier run committed,
and the id registry. O(files + shards) work in the driver; no row is read here, except that a
resume claims the committed ids in the registry, one shard's id column at a time."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdray.batch.ids import COMMITTED, IdRegistry
from sdray.batch.read import inspect_prompt_files, list_prompt_files
from sdray.batch.sink import committed_shards
from sdray.batch.units import parse_unit_name, plan_read_tasks
from sdray.config import SdrayConfig
from sdray.errors import SdrayError
from sdray.requests import REQUEST_COLUMNS
from sdray.storage import filesystem, join

CLAIM_THREADS = 8  # committed shards read at once when a resume reloads their ids


@dataclass
class JobPlan:
    """A job ready to stream: its read tasks (each with the units an earlier run committed)."""

    tasks: list[dict[str, Any]]
    text_columns: list[str]
    expected: Any  # pyarrow.Schema the read tasks conform chunks to
    rows_per_unit: int
    sources: list[str]  # the input files, in order
    has_ids: bool
    rows_estimate: int  # Parquet files' rows (from their footers) and text files' estimates
    committed_paths: list[str] = field(default_factory=list)


def plan_job(
    input_uri: str,
    config: SdrayConfig,
    *,
    output_uri: str,
    previous: dict[str, Any] | None,
) -> JobPlan:
    """List and peek at the input files, cut them into units (`sdray.batch.units`) and, on a
    resume, find the units already committed from the names of the output's metadata files.
    O(files + shards) work in the driver: no row is read here."""
    storage = config.storage.storage_options
    files = list_prompt_files(input_uri, storage)
    for index, file in enumerate(files):
        file["index"] = index
    text_columns, expected, names = inspect_prompt_files(files, storage)
    missing = [c for c in config.output.partition_by if c not in names and c not in REQUEST_COLUMNS]
    if missing:
        raise SdrayError(
            f"output.partition_by names columns the table does not have: {', '.join(missing)}"
        )
    rows = sum(f.get("rows", f.get("rows_estimate", 0)) for f in files)
    rows_per_unit = int((previous or {}).get("rows_per_unit") or _shard_rows(config))
    tasks = plan_read_tasks(files, rows_per_unit)
    plan = JobPlan(
        tasks=tasks,
        text_columns=text_columns,
        expected=expected,
        rows_per_unit=rows_per_unit,
        sources=[f["source"] for f in files],
        has_ids="id" in names,
        rows_estimate=rows,
    )
    if previous is not None:
        _attach_committed(plan, input_uri, output_uri, storage, len(config.output.partition_by))
    return plan


def _shard_rows(config: SdrayConfig) -> int:
    """`output.rows_per_shard` as a number (`auto`: by the default image size, in whole
    batches). A small table is not cut into smaller shards to spread it over the actors: its
    calls are spread."""
    gen = config.generation
    return config.output.shard_rows(gen.width, gen.height, config.batch.batch_size)


def rows_per_call(rows: int, config: SdrayConfig) -> int:
    """Rows one model actor call generates at most: `batch.batches_per_call` engine batches, or
    fewer for a small table (of about `rows` rows), so that every model actor gets a call."""
    batch = config.batch
    most = batch.batch_size * batch.batches_per_call
    if not rows:
        return most
    spread = batch.batch_size * math.ceil(rows / (batch.max_actors * batch.batch_size))
    return max(batch.batch_size, min(most, spread))


def _attach_committed(
    plan: JobPlan, input_uri: str, output_uri: str, storage: dict[str, Any], depth: int
) -> None:
    """Give each read task the units of its range that an earlier run committed; refuse shards
    that no unit of this input can have written."""
    fs, root = filesystem(output_uri, storage)
    committed = committed_shards(fs, root, depth)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for task in plan.tasks:
        by_group.setdefault(task["group"], []).append(task)
    old = [name for name in committed if parse_unit_name(name) is None]
    if old:
        raise SdrayError(
            f"cannot resume {output_uri!r}: an earlier version of sdray wrote it (its shards, "
            f"such as {old[0]!r}, are not named after the input rows they hold). Finish it "
            "with that version, or start over with --overwrite."
        )
    foreign = []
    for name, shard in committed.items():
        plan.committed_paths += shard["paths"]
        group, index, digest = parse_unit_name(name)
        task = next(
            (
                t
                for t in by_group.get(group, [])
                if t["units"] is None or t["first_unit"] <= index < t["first_unit"] + t["units"]
            ),
            None,
        )
        if task is None:
            foreign += shard["paths"]
            continue
        task.setdefault("committed", {})[str(index)] = {"digest": digest, "pieces": shard["pieces"]}
    if foreign:
        import pyarrow.parquet as pq

        def rows(paths: list[str]) -> int:
            return sum(pq.read_metadata(join(root, p), filesystem=fs).num_rows for p in paths)

        raise SdrayError(
            f"cannot resume {output_uri!r}: {rows(foreign)} of its {rows(plan.committed_paths)} "
            f"committed rows have ids that are not in {input_uri!r}. Resume with the input the "
            "run started from, or start over with --overwrite."
        )


def start_registry(
    plan: JobPlan, output_uri: str, storage: dict[str, Any], say
) -> IdRegistry | None:
    """The duplicate-id registry, when rows bring ids (derived ids are unique by construction),
    holding the ids committed earlier first."""
    import numpy as np
    import pyarrow.parquet as pq

    if not plan.has_ids:
        return None
    # An actor per 25M ids (about 600 MB of digests each), and at least two from a million
    # rows so that concurrent read tasks' claims spread over two processes (a 10M-row run was
    # 3-5% slower with one); one below that, so a small job starts a process fewer.
    rows = plan.rows_estimate
    shards = 1 if rows <= 1_000_000 else max(2, math.ceil(rows / 25_000_000))
    registry = IdRegistry.start(shards, plan.sources)
    if plan.committed_paths:
        # From the driver, a shard at a time (a few threads for object-store latency): a
        # separate Ray Data job here cost more in worker start-up than the reading itself.
        say(f"loading the ids of {len(plan.committed_paths)} committed shards")
        fs, root = filesystem(output_uri, storage)

        def claim(path: str) -> None:
            with fs.open(join(root, path), "rb") as handle:
                column = pq.read_table(handle, columns=["id"]).column("id")
            ids = [i for i in column.to_pylist() if i is not None]
            if ids:
                registry.claim(ids, np.full(len(ids), COMMITTED, np.int64))

        with ThreadPoolExecutor(CLAIM_THREADS) as pool:
            list(pool.map(claim, plan.committed_paths))
    return registry
