"""Read prompt tables (Parquet, CSV, JSONL; files or directories; any fsspec URI) into Ray Data."""

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
from sdray.storage import filesystem, is_local, with_retries

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
READ_CHUNK_ROWS = 65_536
# How much of a file the driver reads to learn its column types (Parquet: the footer; CSV: the
# header, every column being text; JSON lines: this many lines).
PEEK_JSON_LINES = 1000
PEEK_THREADS = 16


def _format_of(path: str) -> str | None:
    lower = path.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if lower.endswith(suffix)), None)


def list_prompt_files(
    uri: str, storage_options: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """The prompt files under `uri`, sorted, each with its path relative to `uri` (its source)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise InputError(f"input {uri!r} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if fs.isdir(path):
        base = path.rstrip("/") + "/"
        found = [
            p
            for p in sorted(fs.find(path))
            if _format_of(p)
            and not any(part.startswith((".", "_")) for part in p[len(base) :].split("/"))
        ]
        files = [
            {"uri": prefix + p, "source": p[len(base) :], "format": _format_of(p)} for p in found
        ]
        if not files:
            raise InputError(f"input directory {uri!r} holds no .parquet, .csv or .jsonl files")
        return files
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(
            f"input {uri!r}: unknown table format; use .parquet, .csv or .jsonl (or .json lines)"
        )
    return [{"uri": prefix + path, "source": path.rsplit("/", 1)[-1], "format": fmt}]


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


def _text_array(column: pa.ChunkedArray, *, as_id: bool = False) -> pa.ChunkedArray | pa.Array:
    """A column as a string array (see `_as_text`)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    return pa.array([_as_text(v, as_id=as_id) for v in column.to_pylist()], pa.string())


def _jsonl_table(handle, uri: str, max_lines: int | None = None) -> pa.Table:
    """JSON lines into a table; a column whose values disagree in type becomes strings.

    So one bad value (say width "abc" among numbers) is a row error later, not a failed read.
    `id` is always text: "id": 7 is the id "7". `max_lines` reads only the first lines (to peek
    at the types).
    """
    rows = []
    for number, line in enumerate(handle, start=1):
        if max_lines is not None and number > max_lines:
            break
        line = line.strip()
        if not line:
            continue
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


def _csv_table(handle, uri: str) -> pa.Table:
    from pyarrow import csv

    data = handle.read()
    options = _csv_options(_csv_names(pa.BufferReader(data)))
    return csv.read_csv(pa.BufferReader(data), convert_options=options)


def read_prompt_file(
    file: dict[str, str], storage_options: dict[str, Any] | None = None
) -> Iterator[pa.Table]:
    """Read one prompt file in chunks, adding its source and each row's position in it."""
    fs, path = filesystem(file["uri"], storage_options)
    offset = 0

    def tag(table: pa.Table) -> pa.Table:
        nonlocal offset
        rows = table.num_rows
        table = table.append_column(SOURCE_COLUMN, pa.array([file["source"]] * rows, pa.string()))
        table = table.append_column(ROW_COLUMN, pa.array(range(offset, offset + rows), pa.int64()))
        offset += rows
        return table

    with fs.open(path, "rb") as handle:
        if file["format"] == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_CHUNK_ROWS):
                yield tag(pa.Table.from_batches([batch]))
            return
        if file["format"] == "csv":
            table = _csv_table(handle, file["uri"])
        else:
            table = _jsonl_table(io.TextIOWrapper(handle, encoding="utf-8"), file["uri"])
    for start in range(0, max(table.num_rows, 1), READ_CHUNK_ROWS):
        yield tag(table.slice(start, READ_CHUNK_ROWS))


def peek_schema(file: dict[str, str], storage_options: dict[str, Any] | None = None) -> pa.Schema:
    """A prompt file's columns and their types, read cheaply and inferred as the real read does.

    Parquet: the footer. CSV: the first block, with the real read's conversion options. JSON
    lines: the first `PEEK_JSON_LINES` lines.
    """
    fs, path = filesystem(file["uri"], storage_options)
    try:
        with fs.open(path, "rb") as handle:
            if file["format"] == "parquet":
                import pyarrow.parquet as pq

                return pq.read_schema(handle)
            if file["format"] == "csv":
                return pa.schema([(name, pa.string()) for name in _csv_names(handle)])
            text = io.TextIOWrapper(handle, encoding="utf-8")
            return _jsonl_table(text, file["uri"], max_lines=PEEK_JSON_LINES).schema
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputError(f"{file['uri']} cannot be read as {file['format']}: {error}") from None


def peek_schemas(
    files: list[dict[str, str]], storage_options: dict[str, Any] | None = None
) -> list[pa.Schema]:
    """Every file's `peek_schema`, several at a time (object stores answer slowly, not busily)."""
    if not files:
        return []
    fs, _ = filesystem(files[0]["uri"], storage_options)
    remote = not is_local(fs)

    def peek(file: dict[str, str]) -> pa.Schema:
        def attempt() -> pa.Schema:
            return peek_schema(file, storage_options)

        return with_retries(attempt, f"reading {file['uri']}") if remote else attempt()

    if len(files) == 1:
        return [peek(files[0])]
    with ThreadPoolExecutor(max_workers=min(PEEK_THREADS if remote else 4, len(files))) as pool:
        return list(pool.map(peek, files))


def _compatible(*types: pa.DataType) -> pa.DataType | None:
    """The type Arrow promotes these to when it combines blocks (as Ray Data does), or None.

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
    """How read tasks make one table of many files: (columns to read as text, expected types).

    A column whose types disagree across files (`tag` int64 in one, string in another) becomes
    text in every file; Ray Data could not combine the blocks otherwise. The expected schema
    holds the agreed type of each column that two or more files give a type (not null): a read
    task checks its chunks against it, since a CSV's or JSON file's later rows can change a
    column's type after the part the driver peeked at.
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
    """Make a chunk's column types agree with the other files' (see `column_plan`).

    Columns in `text_columns` become text. A column whose type changed past the peeked rows is
    made text when the others agreed on text; a row-contract column (width "wide" among
    numbers) keeps the agreed type and the bad values become row errors; any other column
    cannot be combined, and the read stops with a message naming it.
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
        if pa.types.is_null(column.type) or _compatible(column.type, want) is not None:
            continue
        if pa.types.is_string(want) or pa.types.is_large_string(want):
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
                f"while the other input files give it {want}; make its values one type in "
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
    files: list[dict[str, str]], storage_options: dict[str, Any] | None = None
) -> tuple[list[str], pa.Schema | None]:
    """Refuse, before any task runs, tables without `prompt` or with sdray's own columns.

    Peeks at every file and returns the `column_plan` its read tasks follow (the expected
    schema only when there are several files: one file's chunks always agree).
    """
    from sdray.requests import check_columns

    schemas = peek_schemas(files, storage_options)
    check_columns(list(dict.fromkeys(name for schema in schemas for name in schema.names)))
    text_columns, expected = column_plan(schemas)
    return text_columns, expected if len(files) > 1 else None


def _read_files_udf(
    batch: dict[str, Any],
    storage_options: dict[str, Any] | None,
    text_columns: list[str] | None = None,
    expected: pa.Schema | None = None,
):
    for uri, source, fmt in zip(batch["uri"], batch["source"], batch["format"], strict=True):
        file = {"uri": uri, "source": source, "format": fmt}
        for chunk in read_prompt_file(file, storage_options):
            yield conform_chunk(chunk, text_columns or (), expected, str(source))


def read_prompts(uri: str, storage_options: dict[str, Any] | None = None):
    """A lazy Ray Dataset of every prompt row under `uri`, one read task per file.

    Column types are made to agree across files first (see `column_plan`), so files that
    disagree (`tag` int64 in a.parquet, text in b.csv) still make one dataset.
    """
    import ray

    files = list_prompt_files(uri, storage_options)
    text_columns, expected = check_prompt_files(files, storage_options)
    return ray.data.from_items(files).map_batches(
        _read_files_udf,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "storage_options": storage_options,
            "text_columns": text_columns,
            "expected": expected,
        },
        num_cpus=0.25,
    )
