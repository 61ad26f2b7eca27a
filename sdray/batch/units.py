"""Units: the input cut into shards' worth of rows, each a function of the input alone.

A unit is `rows_per_shard` consecutive rows of a *group*: a run of consecutive Parquet files
(their footers give their row counts, so units span files and each can be read on its own) or a
run of consecutive CSV / JSON-lines files (read from the top by one task). Its name says which
rows it holds: `part-<group>-<index>-<digest of its ids>`, the group being a hash of its first
file's path relative to the input. A unit is written as one shard per partition value, named
after it: a retried or resumed write of a unit can only write the same shard again, and a
resume knows what is done from the shard names alone.

The read task cuts each unit's rows still to generate into *calls*: runs of consecutive rows of
at most `batch.batches_per_call` engine batches and `batch.max_call_bytes` of raw pixels. Each
call flows through the pipeline as one Ray Data row and block (its rows packed as Arrow IPC):
one model actor call, one object of bounded size, whatever the shard size. The write tasks put
a unit's calls together again (`sdray.batch.sink`).
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
CALL_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),  # the unit's name
        ("call", pa.int32()),  # this call's place among the unit's calls
        ("calls", pa.int32()),  # the unit's calls
        ("rows", pa.int64()),  # input rows in the unit (on its first call; 0 on the others)
        ("done", pa.int64()),  # of which an earlier run committed this many (first call)
        # The call's rows, as an Arrow IPC stream (or null). 64-bit offsets: a call is bounded
        # by `batch.max_call_bytes`, but no offset of the path may overflow at any size.
        ("table", pa.large_binary()),
        ("read_at", pa.float64()),  # when each stage was done with it (for the start-up figures)
        ("actor_ready_at", pa.float64()),
        ("generated_at", pa.float64()),
        # the generating actor's running totals after this call, as JSON (see GenerateStage)
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


def pack(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def unpack(data: bytes | pa.Buffer) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()


def packed_cells(buffers: list[pa.Buffer | None]) -> pa.Array:
    """Packed tables as a `table` column; one table's buffer is used as it is (no copy)."""
    if len(buffers) == 1 and buffers[0] is not None:
        offsets = pa.py_buffer(np.array([0, buffers[0].size], np.int64))
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, buffers[0]])
    cells = [None if b is None else b.to_pybytes() for b in buffers]
    return pa.array(cells, pa.large_binary())


def call_rows(calls: pa.Table) -> Iterator[dict[str, Any]]:
    """The calls of a block as dicts, each `table` as a buffer of the block (no copy)."""
    names = [n for n in calls.column_names if n != "table"]
    tables = calls.column("table")
    for index, row in enumerate(calls.select(names).to_pylist()):
        cell = tables[index]
        row["table"] = cell.as_buffer() if cell.is_valid else None
        yield row


def call_row(name: str, call: int, calls: int, rows: int, done: int, table) -> pa.Table:
    """The one-row table that carries one call of a unit through the pipeline."""
    packed = pack(table) if table is not None and table.num_rows else None
    return pa.table(
        {
            "unit": [name],
            "call": [call],
            "calls": [calls],
            "rows": [rows],
            "done": [done],
            "table": packed_cells([packed]),
            "read_at": [time.time()],
            "actor_ready_at": [None],
            "generated_at": [None],
            "actor_figures": [None],
        },
        schema=CALL_SCHEMA,
    )


def unit_row(name: str, rows: int, done: int, table) -> pa.Table:
    """A unit in one call (all its rows, or none left to generate)."""
    return call_row(name, 0, 1, rows, done, table)


def row_pixel_bytes(table: pa.Table, preview_every: int = 0, unknown_area: int = 0) -> np.ndarray:
    """Raw pixel bytes each row brings to and takes from a model actor: its image, its previews,
    and its init and mask images; none for a row already in error. A row whose size is not
    known yet (an image-to-image row sized by its picture) counts `unknown_area` pixels."""
    import pyarrow.compute as pc

    area = pc.multiply(table.column("width"), table.column("height")).to_numpy(zero_copy_only=False)
    area = np.nan_to_num(area.astype(np.float64), nan=unknown_area).astype(np.int64)
    images = np.ones(table.num_rows, np.int64)
    if preview_every:
        from sdray.requests import denoising_start

        steps = table.column("steps").to_pylist()
        strength = table.column("strength").to_pylist()
        images += [
            (s - denoising_start(s, g)) // preview_every if s else 0
            for s, g in zip(steps, strength, strict=True)
        ]
    inputs = [{"img2img": 3, "inpaint": 4}.get(m, 0) for m in table.column("mode").to_pylist()]
    per_row = area * (3 * images + np.array(inputs, np.int64))
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    return np.where(ok, per_row, 0)


def cut_calls(
    table: pa.Table,
    rows_per_call: int,
    max_bytes: int,
    preview_every: int = 0,
    unknown_area: int = 0,
) -> list[tuple[int, int]]:
    """(start, stop) of runs of consecutive rows, each at most `rows_per_call` rows to generate
    and `max_bytes` of raw pixels (but at least one row); rows in error ride along for free.
    Rows whose size their init image decides count as `unknown_area` (the largest allowed)."""
    sizes = row_pixel_bytes(table, preview_every, unknown_area)
    if np.count_nonzero(sizes) <= rows_per_call and sizes.sum() <= max_bytes:
        return [(0, table.num_rows)]  # the unit in one call
    bounds, start, rows, held = [], 0, 0, 0
    for index, size in enumerate(sizes.tolist()):
        if rows and (rows + (size > 0) > rows_per_call or held + size > max_bytes):
            bounds.append((start, index))
            start, rows, held = index, 0, 0
        rows += size > 0
        held += size
    bounds.append((start, len(sizes)))
    return bounds


class UnitStage:
    """The model actor's stage over calls: builds `stage` (a class, such as `GenerateStage`)
    once per process from `stage_kwargs` and applies it to the rows of each call of a batch,
    `rows_per_call` rows at a time. Each call it hands on records when this process was ready
    and when it was done with it (the start-up figures in the manifest), and a copy of the
    stage's running `figures` where it keeps them (the per-node figures).
    """

    def __init__(
        self,
        stage: type,
        rows_per_call: int | None = None,
        stage_kwargs: dict[str, Any] | None = None,
    ) -> None:
        # An error building the stage (a model that cannot load, changed since the job began)
        # is raised by the actor's first call, where it reaches the driver as its own type: an
        # actor whose constructor raises dies, and Ray keeps only the text of why.
        self.stage, self.init_error = None, None
        try:
            self.stage = stage(**(stage_kwargs or {}))
        except Exception as error:  # noqa: BLE001 - raised again, whole, by __call__
            self.init_error = error
        self.rows_per_call = rows_per_call
        self.ready_at = time.time()

    def __call__(self, units: pa.Table) -> pa.Table:
        if self.init_error is not None:
            raise self.init_error
        packed = []
        for call in call_rows(units):
            if call["table"] is None:
                packed.append(None)
                continue
            rows = unpack(call["table"])
            step = self.rows_per_call or rows.num_rows
            parts = [self.stage(rows.slice(i, step)) for i in range(0, rows.num_rows, step)]
            packed.append(pack(pa.concat_tables(parts, promote_options="permissive")))
        units = _set(units, "table", packed_cells(packed))
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
    batches stay homogeneous, cut the rows still to generate into calls (`cut_calls`), and hand
    each call to `fetch` (the image-input stage, where one is given); one Ray Data row per call,
    so a read task never holds more than one call's init images."""

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
        rows_per_call: int = 1 << 30,
        max_call_bytes: int = 1 << 62,
        preview_every: int = 0,
    ) -> None:
        from sdray.batch.stages import PrepareStage

        self.prepare = PrepareStage(generation)
        self.rows_per_unit = rows_per_unit
        self.rows_per_call, self.max_call_bytes = rows_per_call, max_call_bytes
        self.preview_every = preview_every
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
            yield from self._calls(name, prepared.num_rows, todo)
        if committed:
            raise self._changed(task, min(committed))

    def _calls(self, name: str, rows: int, todo: pa.Table) -> Iterator[pa.Table]:
        """The unit's rows still to generate, one call at a time (the unit's counts on the
        first), each with its init and mask images fetched."""
        done = rows - todo.num_rows
        if not todo.num_rows:
            yield unit_row(name, rows, done, None)
            return
        generation = self.prepare.generation
        bounds = cut_calls(
            todo,
            self.rows_per_call,
            self.max_call_bytes,
            self.preview_every,
            unknown_area=generation.max_width * generation.max_height,
        )
        for call, (start, stop) in enumerate(bounds):
            part = todo.slice(start, stop - start)
            if self.fetch is not None:
                part = self.fetch(part)
            first = call == 0
            yield call_row(
                name, call, len(bounds), rows if first else 0, done if first else 0, part
            )

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
