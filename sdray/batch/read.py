"""Read prompt tables (Parquet, CSV, JSON lines; files or directories; any fsspec URI) in chunks.

Parsing is pyarrow's: Parquet's reader, its streaming CSV reader, its JSON reader. Only JSON
that pyarrow cannot read as sdray must (see `_jsonl_chunk`) goes through Python's `json`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from sdray.errors import InputError
from sdray.requests import (
    READ_ERROR_COLUMN,
    REQUEST_COLUMNS,
    ROW_COLUMN,
    SOURCE_COLUMN,
    is_unicode_text,
)
from sdray.storage import filesystem, is_local

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
READ_CHUNK_ROWS = 65_536
# How much of a file the driver reads to learn its column types (Parquet: the footer, which
# also gives its row count; CSV: the header, every column being text; JSON lines: this many).
PEEK_JSON_LINES = 1000
PEEK_BYTES = 1 << 20
PEEK_THREADS = 16
# A double at or above this may have lost digits of the integer it was written as.
EXACT_DOUBLE = 2**53


def _format_of(path: str) -> str | None:
    lower = path.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if lower.endswith(suffix)), None)


def list_prompt_files(
    uri: str, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The prompt files under `uri`, sorted, each with its path relative to `uri` (its source)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise InputError(f"input {uri!r} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if fs.isdir(path):
        base = path.rstrip("/") + "/"
        listing = fs.find(path, detail=True)
        found = [
            p
            for p in sorted(listing)
            if _format_of(p)
            and not any(part.startswith((".", "_")) for part in p[len(base) :].split("/"))
        ]
        files = [
            {
                "uri": prefix + p,
                "source": p[len(base) :],
                "format": _format_of(p),
                "size": listing[p].get("size") or 0,
            }
            for p in found
        ]
        if not files:
            raise InputError(f"input directory {uri!r} holds no .parquet, .csv or .jsonl files")
        return files
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(
            f"input {uri!r}: unknown table format; use .parquet, .csv or .jsonl (or .json lines)"
        )
    source = path.rsplit("/", 1)[-1]
    return [{"uri": prefix + path, "source": source, "format": fmt, "size": fs.size(path) or 0}]


# ---------------------------------------------------------------------------------------------
# Text as sdray reads it.


def _as_text(value: Any, *, as_id: bool = False) -> str | None:
    """A value as text: numbers and booleans as JSON writes them, lists and objects as JSON.

    An id that is an integral float reads as the integer, as the row contract derives it, so
    `7`, `7.0` and `"7"` are one id wherever they come from.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if as_id and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, list, tuple, dict)):
        return json.dumps(value, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _text_array(column: pa.ChunkedArray | pa.Array, *, as_id: bool = False) -> pa.Array:
    """A column as a string array (see `_as_text`)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    return pa.array([_as_text(v, as_id=as_id) for v in column.to_pylist()], pa.string())


# ---------------------------------------------------------------------------------------------
# CSV: pyarrow's streaming reader, every column text.


def _csv_options(names: Iterable[str] = ()):
    """How every CSV is converted, by the peek and the real read alike.

    CSV has no types, so every column (`names`, the header's) is read as the text the file
    holds: carried columns ride through unchanged ("02139" stays "02139"), and the row
    contract's numbers are parsed per row by validation, exactly (a seed is never rounded
    through a float) and with a row error naming a value that is not one. Only an empty field
    means "not given": "NA", "null" or "None" are text like any other.
    """
    from pyarrow import csv

    return csv.ConvertOptions(
        null_values=[""],
        strings_can_be_null=True,
        column_types={name: pa.string() for name in names},
    )


def _csv_names(source) -> list[str]:
    """The header of a CSV (a buffer or an open file), read from its first block only."""
    from pyarrow import csv

    return csv.open_csv(source, convert_options=_csv_options()).schema.names


def _csv_chunks(handle, uri: str) -> Iterator[pa.Table]:
    """A CSV file in record batches, streamed (never the whole file in memory)."""
    from pyarrow import csv

    if not handle.read(1 << 16).strip():
        return  # an empty file
    try:
        handle.seek(0)
        names = _csv_names(handle)  # the header, from the first block
        handle.seek(0)
        for batch in csv.open_csv(handle, convert_options=_csv_options(names)):
            yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as error:
        raise InputError(f"{uri} cannot be read as csv: {error}") from None


def _csv_table(handle, uri: str) -> pa.Table:
    """A whole CSV file as one table."""
    chunks = list(_csv_chunks(handle, uri))
    return pa.concat_tables(chunks) if chunks else pa.table({"prompt": pa.array([], pa.string())})


# ---------------------------------------------------------------------------------------------
# JSON lines: pyarrow's reader, chunk by chunk; Python's `json` for what it cannot read as sdray
# must.


def _jsonl_chunks(handle, uri: str, chunk_rows: int) -> Iterator[pa.Table]:
    """JSON lines in chunks of `chunk_rows` rows (blank lines skipped), streamed."""
    lines: list[tuple[int, bytes]] = []
    for number, line in enumerate(handle, start=1):
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogatepass")
        if not line.strip():
            continue
        lines.append((number, line))
        if len(lines) == chunk_rows:
            yield _jsonl_chunk(lines, uri)
            lines = []
    if lines:
        yield _jsonl_chunk(lines, uri)


def _jsonl_chunk(lines: list[tuple[int, bytes]], uri: str) -> pa.Table:
    """Numbered JSON lines as a table: pyarrow's reader, else `_python_jsonl`.

    pyarrow refuses a chunk in which a column's values disagree in type (id 7 beside "007",
    width "wide" among numbers) and text that is not Unicode (lone surrogates), and reads an
    integer beyond int64 as an inexact double. Python's `json` reads all of them exactly, so
    one odd value becomes a row error (or text) later, never a failed read.
    """
    from pyarrow import json as pa_json

    data = b"\n".join(line.rstrip() for _, line in lines)
    try:
        table = pa_json.read_json(io.BytesIO(data))
        if _has_timestamps(table.schema):  # pyarrow reads "2024-01-01" as a time: keep the text
            options = pa_json.ParseOptions(
                explicit_schema=pa.schema([_timestamps_as_text(f) for f in table.schema]),
                unexpected_field_behavior="infer",
            )
            table = pa_json.read_json(io.BytesIO(data), parse_options=options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _python_jsonl(lines, uri)
    if table.num_rows != len(lines) or any(_inexact(c) for c in table.columns):
        return _python_jsonl(lines, uri)
    if "id" in table.column_names and not pa.types.is_string(table.schema.field("id").type):
        table = table.set_column(
            table.column_names.index("id"), "id", _text_array(table.column("id"), as_id=True)
        )
    return table


def _has_timestamps(schema: pa.Schema) -> bool:
    return any(_timestamps_as_text(field) != field for field in schema)


def _timestamps_as_text(field: pa.Field) -> pa.Field:
    """The field with every timestamp in it (nested too) made a string."""
    kind = field.type
    if pa.types.is_timestamp(kind):
        return field.with_type(pa.string())
    if pa.types.is_struct(kind):
        return field.with_type(
            pa.struct([_timestamps_as_text(kind.field(i)) for i in range(kind.num_fields)])
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = _timestamps_as_text(kind.value_field)
        return field.with_type(pa.list_(item) if pa.types.is_list(kind) else pa.large_list(item))
    return field


def _inexact(column: pa.ChunkedArray) -> bool:
    """Whether a column holds doubles that may have been integers too big for an exact double."""
    import pyarrow.compute as pc

    if not pa.types.is_floating(column.type) or column.null_count == len(column):
        return False
    biggest = pc.max(pc.abs(column)).as_py()
    return biggest is not None and biggest >= EXACT_DOUBLE


def _python_jsonl(lines: list[tuple[int, bytes]], uri: str) -> pa.Table:
    """JSON lines read by Python's `json`: a column whose values disagree in type becomes text,
    `id` is always text ("id": 7 is the id "7"), and text that is not valid Unicode marks its
    row (see `_unicode_row`)."""
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except ValueError as error:  # JSONDecodeError, or an integer of over 4300 digits
            raise InputError(f"{uri}: line {number} is not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise InputError(f"{uri}: line {number} is not a JSON object")
        rows.append(_unicode_row(row))
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == "id":
            columns[name] = pa.array([_as_text(v, as_id=True) for v in values], pa.string())
            continue
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([_as_text(v) for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({"prompt": pa.array([], pa.string())})


def _jsonl_table(handle, uri: str, max_lines: int | None = None) -> pa.Table:
    """JSON lines (a text or binary file) as one table; `max_lines`: only the first lines."""
    lines = []
    for number, line in enumerate(handle, start=1):
        if max_lines is not None and number > max_lines:
            break
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogatepass")
        if line.strip():
            lines.append((number, line))
    if not lines:
        return pa.table({"prompt": pa.array([], pa.string())})
    return _jsonl_chunk(lines, uri)


def _unicode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A JSON row whose text Arrow can store.

    JSON can carry text that is not valid Unicode (lone surrogates such as "\\ud800"). Such text
    is kept backslash-escaped and the row is marked, so it becomes an error row naming the field
    instead of failing the whole read.
    """

    def escaped(text: str) -> str:
        return text.encode("utf-8", "backslashreplace").decode()

    bad = [
        k
        for k, v in row.items()
        if not is_unicode_text(k) or (isinstance(v, str) and not is_unicode_text(v))
    ]
    if not bad:
        return row
    fixed = {escaped(k): escaped(v) if isinstance(v, str) else v for k, v in row.items()}
    fixed[READ_ERROR_COLUMN] = "; ".join(
        f"{escaped(k)}={row[k]!r}: is not valid Unicode text" for k in bad
    )
    return fixed


# ---------------------------------------------------------------------------------------------
# Parquet: only the row groups a read needs.


def _parquet_chunks(handle, start: int, chunk_rows: int) -> tuple[int, Iterator[pa.Table]]:
    """(first row, chunks) of a Parquet file from the row group that holds row `start` on."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(handle)
    first, row_groups = 0, []
    for index in range(reader.num_row_groups):
        rows = reader.metadata.row_group(index).num_rows
        if first + rows <= start and not row_groups:
            first += rows
            continue
        row_groups.append(index)
    batches = reader.iter_batches(batch_size=chunk_rows, row_groups=row_groups)
    return first, (pa.Table.from_batches([b]) for b in batches)


def read_prompt_file(
    file: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    start: int = 0,
    stop: int | None = None,
    chunk_rows: int = READ_CHUNK_ROWS,
) -> Iterator[pa.Table]:
    """Rows [start, stop) of one prompt file, in chunks, with its source and each row's position
    in it (Parquet seeks to them; text formats are read from the top)."""
    fs, path = filesystem(file["uri"], storage_options)
    with fs.open(path, "rb") as handle:
        if file["format"] == "parquet":
            offset, chunks = _parquet_chunks(handle, start, chunk_rows)
        elif file["format"] == "csv":
            offset, chunks = 0, _csv_chunks(handle, file["uri"])
        else:
            offset, chunks = 0, _jsonl_chunks(handle, file["uri"], chunk_rows)
        for chunk in chunks:
            lo, offset = offset, offset + chunk.num_rows
            if offset <= start:
                continue
            first = max(lo, start)
            end = offset if stop is None else min(offset, stop)
            yield _tag(chunk.slice(first - lo, end - first), file["source"], first)
            if stop is not None and offset >= stop:
                return


def _tag(table: pa.Table, source: str, first: int) -> pa.Table:
    rows = table.num_rows
    table = table.append_column(SOURCE_COLUMN, pa.array([source] * rows, pa.string()))
    return table.append_column(ROW_COLUMN, pa.array(range(first, first + rows), pa.int64()))


# ---------------------------------------------------------------------------------------------
# Types that agree across files and chunks.


def peek_schema(file: dict[str, Any], storage_options: dict[str, Any] | None = None) -> pa.Schema:
    """A prompt file's columns and their types, read cheaply and inferred as the real read does.

    Parquet: the footer, whose row count lands in `file["rows"]`. CSV: the header, every column
    text. JSON lines: the first `PEEK_JSON_LINES` lines. For text files `file["rows_estimate"]`
    gets a guess at their rows from the lines in their first megabyte (for sizing shards).
    """
    fs, path = filesystem(file["uri"], storage_options)
    try:
        with fs.open(path, "rb") as handle:
            if file["format"] == "parquet":
                import pyarrow.parquet as pq

                metadata = pq.read_metadata(handle)
                file["rows"] = metadata.num_rows
                return metadata.schema.to_arrow_schema()
            head = handle.read(PEEK_BYTES)
            lines = head.count(b"\n") + (0 if not head or head.endswith(b"\n") else 1)
            whole = len(head) < PEEK_BYTES
            per_line = len(head) / max(1, lines)
            file["rows_estimate"] = lines if whole else int(file.get("size", 0) / per_line)
            if file["format"] == "csv":
                file["rows_estimate"] -= 1  # the header
                names = _csv_names(pa.BufferReader(head)) if head.strip() else []
                return pa.schema([(name, pa.string()) for name in names])
            handle.seek(0)
            return _jsonl_table(handle, file["uri"], max_lines=PEEK_JSON_LINES).schema
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputError(f"{file['uri']} cannot be read as {file['format']}: {error}") from None


def peek_schemas(
    files: list[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> list[pa.Schema]:
    """Every file's `peek_schema`, several at a time (object stores answer slowly, not busily)."""
    if not files:
        return []
    fs, _ = filesystem(files[0]["uri"], storage_options)
    remote = not is_local(fs)

    def peek(file: dict[str, Any]) -> pa.Schema:
        return peek_schema(file, storage_options)  # transient store errors: s3fs/botocore retry

    if len(files) == 1:
        return [peek(files[0])]
    with ThreadPoolExecutor(max_workers=min(PEEK_THREADS if remote else 4, len(files))) as pool:
        return list(pool.map(peek, files))


def _compatible(*types: pa.DataType) -> pa.DataType | None:
    """The type Arrow promotes these to when it combines tables, or None.

    int64 and double agree (double), anything agrees with null; int64 and string do not.
    """
    distinct = list(dict.fromkeys(types))
    if len(distinct) == 1:
        return distinct[0]
    try:
        unified = pa.unify_schemas(
            [pa.schema([("c", t)]) for t in distinct], promote_options="permissive"
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return unified.field(0).type


def column_plan(schemas: Iterable[pa.Schema]) -> tuple[list[str], pa.Schema]:
    """How many files make one table: (columns to read as text, types two or more files agree on).

    A column whose types disagree across files (`tag` int64 in one, string in another) becomes
    text in every file. The second part holds the agreed type of each column that two or more
    files give a type (not null).
    """
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            if not field.name.startswith("__sdray") and not pa.types.is_null(field.type):
                types.setdefault(field.name, []).append(field.type)
    text, expected = [], []
    for name, found in types.items():
        agreed = _compatible(*found)
        if agreed is None:
            text.append(name)
        elif len(found) > 1:
            expected.append(pa.field(name, agreed))
    return text, pa.schema(expected)


def conform_chunk(
    table: pa.Table,
    text_columns: Iterable[str] = (),
    expected: pa.Schema | None = None,
    source: str = "",
) -> pa.Table:
    """Make a chunk's column types those of the whole table (see `check_prompt_files`), so every
    shard of the output holds each column in one type.

    Columns in `text_columns` become text. A column whose values widen to the expected type is
    cast to it. One whose type changed past the peeked rows is made text when the table's type
    is text; a row-contract column (width "wide" among numbers) keeps its type and the bad
    values become row errors; any other column cannot be combined, and the read stops with a
    message naming it.
    """
    text_columns = set(text_columns)
    read_errors: list[str | None] | None = None
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if name in text_columns:
            if not pa.types.is_string(column.type):
                table = table.set_column(index, name, _text_array(column, as_id=name == "id"))
            continue
        if expected is None or expected.get_field_index(name) < 0:
            continue
        want = expected.field(name).type
        if column.type == want:
            continue
        if pa.types.is_null(column.type) or _compatible(column.type, want) == want:
            table = table.set_column(index, name, column.cast(want))
        elif pa.types.is_string(want) or pa.types.is_large_string(want):
            table = table.set_column(index, name, _text_array(column, as_id=name == "id"))
        elif name in REQUEST_COLUMNS:
            converted, errors = _convert_values(column.to_pylist(), want, name)
            table = table.set_column(index, name, converted)
            read_errors = read_errors or [None] * table.num_rows
            read_errors = [
                "; ".join(e for e in pair if e) or None
                for pair in zip(read_errors, errors, strict=True)
            ]
        else:
            raise InputError(
                f"{source}: column {name!r} holds {column.type} values past its first rows, "
                f"while the input's first rows give it {want}; make its values one type in "
                "every file (or quote them all, in CSV)"
            )
    if read_errors is None:
        return table
    if READ_ERROR_COLUMN in table.column_names:
        earlier = table.column(READ_ERROR_COLUMN).to_pylist()
        read_errors = [
            "; ".join(e for e in pair if e) or None
            for pair in zip(earlier, read_errors, strict=True)
        ]
        table = table.drop_columns([READ_ERROR_COLUMN])
    return table.append_column(READ_ERROR_COLUMN, pa.array(read_errors, pa.string()))


def _convert_values(
    values: list[Any], want: pa.DataType, name: str
) -> tuple[pa.Array, list[str | None]]:
    """Values of a row-contract column in the agreed type; the ones that do not convert become
    null, each with an error naming the field and the value."""
    kind = (
        "an integer"
        if pa.types.is_integer(want)
        else "a number"
        if pa.types.is_floating(want)
        else str(want)
    )
    converted: list[Any] = []
    errors: list[str | None] = []
    for value in values:
        try:
            converted.append(None if value is None else pa.array([value]).cast(want)[0].as_py())
            errors.append(None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            converted.append(None)
            errors.append(f"{name}={value!r}: must be {kind}")
    return pa.array(converted, want), errors


def check_prompt_files(
    files: list[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> tuple[list[str], pa.Schema]:
    """Refuse, before any task runs, tables without `prompt` or with sdray's own columns.

    Peeks at every file and returns how its chunks are conformed: (columns read as text, the
    type of every other typed column), from `column_plan` and each file's own types.
    """
    text_columns, expected, _ = inspect_prompt_files(files, storage_options)
    return text_columns, expected


def inspect_prompt_files(
    files: list[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> tuple[list[str], pa.Schema, list[str]]:
    """`check_prompt_files`, plus the names of every column of the input."""
    from sdray.requests import check_columns

    schemas = peek_schemas(files, storage_options)
    names = list(dict.fromkeys(name for schema in schemas for name in schema.names))
    check_columns(names)
    text_columns, agreed = column_plan(schemas)
    expected = {field.name: field for field in agreed}
    for schema in schemas:  # a column only one file types keeps that file's type
        for field in schema:
            if field.name not in text_columns and not pa.types.is_null(field.type):
                expected.setdefault(field.name, pa.field(field.name, field.type))
    return text_columns, pa.schema(list(expected.values())), names
