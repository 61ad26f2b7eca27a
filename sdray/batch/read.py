"""Read prompt tables (Parquet, CSV, JSONL; files or directories; any fsspec URI) into Ray Data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from sdray.errors import InputError
from sdray.requests import READ_ERROR_COLUMN, ROW_COLUMN, SOURCE_COLUMN, is_unicode_text
from sdray.storage import filesystem

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
READ_CHUNK_ROWS = 65_536


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


def _jsonl_table(handle, uri: str) -> pa.Table:
    """JSON lines into a table; a column whose values disagree in type becomes strings.

    So one bad value (say width "abc" among numbers) is a row error later, not a failed read.
    """
    rows = []
    for number, line in enumerate(handle, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{uri}: line {number} is not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise InputError(f"{uri}: line {number} is not a JSON object")
        rows.append(_unicode_row(row))
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array(
                [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                pa.string(),
            )
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


def _csv_table(handle, uri: str) -> pa.Table:
    from pyarrow import csv

    data = handle.read()
    # In CSV an empty field means "not given": read it as null, not as "".
    options = csv.ConvertOptions(strings_can_be_null=True)
    try:
        return csv.read_csv(pa.BufferReader(data), convert_options=options)
    except pa.ArrowInvalid:
        # Types that change part-way through the file: read everything as text instead.
        header = csv.open_csv(pa.BufferReader(data)).schema.names
        options.column_types = {name: pa.string() for name in header}
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
            import io

            table = _jsonl_table(io.TextIOWrapper(handle, encoding="utf-8"), file["uri"])
    for start in range(0, max(table.num_rows, 1), READ_CHUNK_ROWS):
        yield tag(table.slice(start, READ_CHUNK_ROWS))


def peek_columns(file: dict[str, str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """A prompt file's column names, read cheaply (Parquet footer, CSV header, first JSON lines)."""
    fs, path = filesystem(file["uri"], storage_options)
    with fs.open(path, "rb") as handle:
        if file["format"] == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(handle).names
        if file["format"] == "csv":
            from pyarrow import csv

            return csv.open_csv(handle).schema.names
        names: dict[str, None] = {}
        for number, line in enumerate(handle):
            if number >= 1000:
                break
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{file['uri']}: line {number + 1} is not valid JSON ({error})"
                ) from None
            names.update(dict.fromkeys(row if isinstance(row, dict) else ()))
        return list(names)


def check_prompt_files(
    files: list[dict[str, str]], storage_options: dict[str, Any] | None = None
) -> None:
    """Refuse, before any task runs, tables without `prompt` or with sdray's own columns."""
    from sdray.requests import check_columns

    names: dict[str, None] = {}
    for file in files[:64]:
        names.update(dict.fromkeys(peek_columns(file, storage_options)))
    check_columns(list(names))


def _read_files_udf(batch: dict[str, Any], storage_options: dict[str, Any] | None):
    for uri, source, fmt in zip(batch["uri"], batch["source"], batch["format"], strict=True):
        yield from read_prompt_file({"uri": uri, "source": source, "format": fmt}, storage_options)


def read_prompts(uri: str, storage_options: dict[str, Any] | None = None):
    """A lazy Ray Dataset of every prompt row under `uri`, one read task per file."""
    import ray

    files = list_prompt_files(uri, storage_options)
    check_prompt_files(files, storage_options)
    return ray.data.from_items(files).map_batches(
        _read_files_udf,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"storage_options": storage_options},
        num_cpus=0.25,
    )
