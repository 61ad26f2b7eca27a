"""Units: the input cut into shards' worth of rows, each a function of the input alone.

A unit is `rows_per_shard` consecutive rows of a *group*: a run of consecutive Parquet files
(their footers give their row counts, so units span files and each can be read on its own) or a
run of consecutive CSV / JSON-lines files (read from the top by one task). Its name says which
rows it holds: `part-<group>-<index>-<digest of its ids>`, the group being a hash of its first
file's path relative to the input. Each unit flows through the pipeline as one Ray Data row (its
rows packed as Arrow IPC), so no stage can split it, and is written as one shard per partition
value, named after it: a retried or resumed write of a unit can only write the same shard again,
and a resume knows what is done from the shard names alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from sdray.batch.read import conform_chunk, read_prompt_file
from sdray.errors import SdrayError
from sdray.requests import table_ids

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
READ_TASK_ROWS = 65_536  # rows a read task covers at least (where the format lets it choose)
TEXT_GROUP_BYTES = 64 << 20  # consecutive text files read by one task, up to this size
UNIT_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),  # the unit's name
        ("rows", pa.int64()),  # input rows in the unit
        ("done", pa.int64()),  # of which an earlier run committed this many
        ("table", pa.binary()),  # the rows still to write, as an Arrow IPC stream (or null)
        ("read_at", pa.float64()),  # when each stage was done with it (for the start-up figures)
        ("actor_ready_at", pa.float64()),
        ("generated_at", pa.float64()),
        # the generating actor's running totals after this unit, as JSON (see GenerateStage)
        ("actor_figures", pa.string()),
    ]
)


def unit_name(group: str, index: int, digest: str) -> str:
    return f"part-{group}-{index:07d}-{digest}"


def parse_unit_name(name: str) -> tuple[str, int, str] | None:
    """(group, index, digest) of a unit's shard name, or None for other names."""
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "part" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


def group_key(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def ids_digest(ids: list[str]) -> str:
    """A unit's fingerprint: a resume checks that the input still holds the rows committed."""
    return hashlib.sha256("\x00".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def partition_dir(columns: list[str], values: tuple) -> str:
    """`col=value/...` (Hive style) for a shard of these partition values."""
    parts = [
        f"{name}={HIVE_NULL if value is None else urllib.parse.quote(str(value), safe='')}"
        for name, value in zip(columns, values, strict=True)
    ]
    return "".join(p + "/" for p in parts)


def partition_dirs(table: pa.Table, columns: list[str]) -> list[str]:
    """Each row's `partition_dir`."""
    if not columns:
        return [""] * table.num_rows
    values = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    return [partition_dir(columns, row) for row in values]


# ---------------------------------------------------------------------------------------------
# Planning: which task reads which units (O(files) work in the driver).


def plan_read_tasks(files: list[dict[str, Any]], rows_per_unit: int) -> list[dict[str, Any]]:
    """Read tasks over the input's units: Parquet groups cut into stripes of whole units that
    read only their rows; each text group read whole by one task. Files carry `index` (their
    place in the input) and, for Parquet, `rows` (see `peek_schema`)."""
    tasks: list[dict[str, Any]] = []
    for group in _groups(files):
        key = group_key(group[0]["source"])
        if group[0]["format"] != "parquet":
            spans = [{**f, "start": 0, "stop": None} for f in group]
            tasks.append({"group": key, "first_unit": 0, "units": None, "files": spans})
            continue
        total = sum(f["rows"] for f in group)
        per_task = max(1, math.ceil(READ_TASK_ROWS / rows_per_unit))
        for first in range(0, math.ceil(total / rows_per_unit), per_task):
            lo = first * rows_per_unit
            hi = min(total, lo + per_task * rows_per_unit)
            tasks.append(
                {
                    "group": key,
                    "first_unit": first,
                    "units": math.ceil((hi - lo) / rows_per_unit),
                    "files": _spans(group, lo, hi),
                }
            )
    return tasks


def _groups(files: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive Parquet files together; consecutive text files together up to a size."""
    groups: list[list[dict[str, Any]]] = []
    for file in files:
        last = groups[-1] if groups else None
        parquet = file["format"] == "parquet"
        if last and (last[0]["format"] == "parquet") == parquet:
            size = sum(f.get("size", 0) for f in last)
            if parquet or size + file.get("size", 0) <= TEXT_GROUP_BYTES:
                last.append(file)
                continue
        groups.append([file])
    return groups


def _spans(group: list[dict[str, Any]], lo: int, hi: int) -> list[dict[str, Any]]:
    """The row ranges of the group's files that rows [lo, hi) of the group cover."""
    spans, offset = [], 0
    for file in group:
        start, stop = max(lo, offset), min(hi, offset + file["rows"])
        if start < stop:
            spans.append({**file, "start": start - offset, "stop": stop - offset})
        offset += file["rows"]
    return spans


def read_units(
    task: dict[str, Any],
    rows_per_unit: int,
    text_columns: list[str],
    expected: pa.Schema,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[tuple[int, pa.Table]]:
    """A read task's units in order: (index in the group, rows with source and position)."""
    index, pending, held = task["first_unit"], [], 0
    for file in task["files"]:
        chunks = read_prompt_file(file, storage_options, file["start"], file["stop"])
        for chunk in chunks:
            chunk = conform_chunk(chunk, text_columns, expected, file["source"])
            while chunk.num_rows:
                take = min(rows_per_unit - held, chunk.num_rows)
                pending.append(chunk.slice(0, take))
                held, chunk = held + take, chunk.slice(take)
                if held == rows_per_unit:
                    yield index, pa.concat_tables(pending, promote_options="permissive")
                    index, pending, held = index + 1, [], 0
    if held:
        yield index, pa.concat_tables(pending, promote_options="permissive")


# ---------------------------------------------------------------------------------------------
# Units as Ray Data rows.


def pack(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def unit_row(name: str, rows: int, done: int, table: pa.Table | None) -> pa.Table:
    """The one-row table that carries a unit through the pipeline."""
    packed = pack(table) if table is not None and table.num_rows else None
    return pa.table(
        {
            "unit": [name],
            "rows": [rows],
            "done": [done],
            "table": [packed],
            "read_at": [time.time()],
            "actor_ready_at": [None],
            "generated_at": [None],
            "actor_figures": [None],
        },
        schema=UNIT_SCHEMA,
    )


class UnitStage:
    """The model actor's stage over units: builds `stage` (a class, such as `GenerateStage`)
    once per process from `stage_kwargs` and applies it to the rows of each unit of a batch,
    `rows_per_call` rows at a time. Each unit it hands on records when this process was ready
    and when it was done with the unit (the start-up figures in the manifest), and a copy of
    the stage's running `figures` where it keeps them (the per-node figures).
    """

    def __init__(
        self,
        stage: type,
        rows_per_call: int | None = None,
        stage_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.stage = stage(**(stage_kwargs or {}))
        self.rows_per_call = rows_per_call
        self.ready_at = time.time()

    def __call__(self, units: pa.Table) -> pa.Table:
        packed = []
        for data in units.column("table").to_pylist():
            if data is None:
                packed.append(None)
                continue
            rows = unpack(data)
            step = self.rows_per_call or rows.num_rows
            parts = [self.stage(rows.slice(i, step)) for i in range(0, rows.num_rows, step)]
            packed.append(pack(pa.concat_tables(parts, promote_options="permissive")))
        units = _set(units, "table", pa.array(packed, pa.binary()))
        units = _set(units, "actor_ready_at", [self.ready_at] * units.num_rows)
        units = _set(units, "generated_at", [time.time()] * units.num_rows)
        figures = getattr(self.stage, "figures", None)
        copy = json.dumps(figures) if figures is not None else None
        return _set(units, "actor_figures", pa.array([copy] * units.num_rows, pa.string()))


def _set(table: pa.Table, name: str, values) -> pa.Table:
    column = values if isinstance(values, pa.Array) else pa.array(values, pa.float64())
    return table.set_column(table.column_names.index(name), name, column)


class InputChanged(SdrayError):
    """A resumed run found other rows where its committed shards came from."""


class PrepareUnits:
    """The read stage: read each unit of a batch of read tasks, validate it (`PrepareStage`),
    leave out what an earlier run committed, settle duplicate ids, order its rows so denoising
    batches stay homogeneous, and hand the rows still to generate to `fetch` (the image-input
    stage, where one is given); one Ray Data row per unit."""

    def __init__(
        self,
        generation: Any,
        *,
        rows_per_unit: int,
        text_columns: list[str],
        expected: pa.Schema,
        partition_by: list[str],
        order_by: list[str],
        registry: Any = None,
        storage_options: dict[str, Any] | None = None,
        output_uri: str = "",
        fetch: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:
        from sdray.batch.stages import PrepareStage

        self.prepare = PrepareStage(generation)
        self.rows_per_unit = rows_per_unit
        self.text_columns, self.expected = text_columns, expected
        self.partition_by, self.order_by = partition_by, order_by
        self.registry = registry
        self.storage_options = storage_options
        self.output_uri = output_uri
        self.fetch = fetch

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for spec in batch.column("task").to_pylist():
            yield from self._units(json.loads(spec))

    def _units(self, task: dict[str, Any]) -> Iterator[pa.Table]:
        committed = {int(index): done for index, done in task.get("committed", {}).items()}
        read = read_units(
            task, self.rows_per_unit, self.text_columns, self.expected, self.storage_options
        )
        for index, table in read:
            earlier = committed.pop(index, None)
            if earlier is not None and not self.partition_by and "" in earlier["pieces"]:
                # committed whole by an earlier run: only its ids are checked, nothing validated
                name = unit_name(task["group"], index, ids_digest(table_ids(table)))
                if earlier["digest"] != parse_unit_name(name)[2]:
                    raise self._changed(task, index)
                yield unit_row(name, table.num_rows, table.num_rows, None)
                continue
            prepared = self.prepare(table)
            name = unit_name(task["group"], index, ids_digest(prepared.column("id").to_pylist()))
            todo, owners = prepared, _owners(table, task["files"])
            if earlier is not None:
                if earlier["digest"] != parse_unit_name(name)[2]:
                    raise self._changed(task, index)
                dirs = partition_dirs(prepared, self.partition_by)
                keep = np.array([d not in earlier["pieces"] for d in dirs], bool)
                todo, owners = prepared.filter(pa.array(keep)), owners[keep]
            if self.registry is not None and todo.num_rows:
                todo = self._settle_duplicates(todo, owners)
            if self.order_by and todo.num_rows > 1:
                todo = todo.sort_by([(column, "ascending") for column in self.order_by])
            if self.fetch is not None and todo.num_rows:
                todo = self.fetch(todo)
            yield unit_row(name, prepared.num_rows, prepared.num_rows - todo.num_rows, todo)
        if committed:
            raise self._changed(task, min(committed))

    def _settle_duplicates(self, table: pa.Table, owners: np.ndarray) -> pa.Table:
        """Rows whose id another row claimed first: error rows naming it, with a null id."""
        ids = table.column("id").to_pylist()
        lost = self.registry.claim(ids, owners)
        if not lost:
            return table
        status, error = table.column("status").to_pylist(), table.column("error").to_pylist()
        for i, where in lost.items():
            message = f"id={ids[i]!r}: also the id of {where}, which keeps it"
            status[i], error[i] = "error", "; ".join(e for e in (error[i], message) if e)
            ids[i] = None
        for name, values in (("id", ids), ("status", status), ("error", error)):
            table = table.set_column(
                table.column_names.index(name), name, pa.array(values, pa.string())
            )
        return table

    def _changed(self, task: dict[str, Any], index: int) -> InputChanged:
        first = task["files"][0]["source"]
        return InputChanged(
            f"cannot resume {self.output_uri!r}: its committed shard of unit {index} of the "
            f"rows read from {first!r} on does not hold the rows the input has there now (the "
            "input changed since the run began). Resume with the input the run started from, "
            "or start over with --overwrite."
        )


def _owners(table: pa.Table, files: list[dict[str, Any]]) -> np.ndarray:
    """Each row's position in the input, as the id registry keys claims (see `sdray.batch.ids`)."""
    import pyarrow.compute as pc

    from sdray.batch.ids import FILE_SHIFT
    from sdray.requests import ROW_COLUMN, SOURCE_COLUMN

    sources = pa.array([file["source"] for file in files], pa.string())
    indices = np.array([file["index"] for file in files], np.int64)
    which = pc.index_in(table.column(SOURCE_COLUMN), value_set=sources).to_numpy()
    rows = table.column(ROW_COLUMN).to_numpy().astype(np.int64)
    return (indices[which] << FILE_SHIFT) | rows
