"""Writing results: one Ray Datasink, with interchangeable image writers behind one interface.

A shard is `rows_per_shard` rows. Its images are written first, its metadata Parquet file last
and atomically: a shard is committed exactly when its metadata file exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from sdray.batch.stages import IMAGE_COLUMN, STRIP_COLUMN
from sdray.errors import SdrayError
from sdray.images import EXTENSIONS
from sdray.requests import PREPARED_SCHEMA
from sdray.storage import filesystem, join, read_json, write_bytes_atomic

METADATA_DIR = "metadata"
MANIFEST = "manifest.json"
IMAGES_DIR = "images"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
LEADING_COLUMNS = [
    *(f.name for f in PREPARED_SCHEMA if f.name not in ("mode", "status", "error")),
    "init_sha256",
    "mask_sha256",
    "model",
    "model_family",
    "mode",
    "status",
    "error",
    "truncated",
    "image_path",
    "sha256",
    "preview_path",
]


def sample_key(row_id: str) -> str:
    """The file-safe name of a row's image: a hash of its id, never the raw id."""
    return hashlib.sha256(row_id.encode()).hexdigest()[:32]


@dataclass
class ShardImages:
    """Images of one shard to store: keys, encoded bytes (None for error rows), metadata rows."""

    keys: list[str]
    images: list[bytes | None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    strips: list[bytes | None] | None = None  # filmstrips of previews (output.preview_every)

    def strip(self, index: int) -> bytes | None:
        return None if self.strips is None else self.strips[index]


STRIP_SUFFIX = ".strip.png"
# What a writer returns: each row's image path and filmstrip path (None where there is none).
WrittenPaths = tuple[list[str | None], list[str | None]]


class FilesWriter:
    """`files`: one object per image, `images/<partition>/<shard>/<key>.<ext>`."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        paths: list[str | None] = []
        strips: list[str | None] = []
        for index, (key, data) in enumerate(zip(batch.keys, batch.images, strict=True)):
            paths.append(None)
            strips.append(None)
            if data is None:
                continue
            relative = f"{directory}{shard}/{key}.{self.extension}"
            write_bytes_atomic(fs, join(root, relative), data)
            paths[-1] = relative
            strip = batch.strip(index)
            if strip is not None:
                strips[-1] = f"{directory}{shard}/{key}{STRIP_SUFFIX}"
                write_bytes_atomic(fs, join(root, strips[-1]), strip)
        return paths, strips


class WebDatasetWriter:
    """`webdataset`: one tar per shard; each sample is `<key>.<ext>` with `<key>.json` beside it."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        relative = f"{directory}{shard}.tar"
        buffer = io.BytesIO()
        paths: list[str | None] = []
        strips: list[str | None] = []
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index, (key, data, row) in enumerate(
                zip(batch.keys, batch.images, batch.rows, strict=True)
            ):
                paths.append(None)
                strips.append(None)
                if data is None:
                    continue
                member = f"{key}.{self.extension}"
                members = [(member, data), (f"{key}.json", json.dumps(row, default=str).encode())]
                strip = batch.strip(index)
                if strip is not None:
                    members.append((key + STRIP_SUFFIX, strip))
                    strips[-1] = f"{relative}#{key}{STRIP_SUFFIX}"
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                paths[-1] = f"{relative}#{member}"
        if any(p is not None for p in paths):
            write_bytes_atomic(fs, join(root, relative), buffer.getvalue())
        return paths, strips


class ParquetImageWriter:
    """`parquet`: one Parquet file per shard with the encoded image bytes in column `image`."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        relative = f"{directory}{shard}.parquet"
        present = [i for i, data in enumerate(batch.images) if data is not None]
        if present:
            columns = {
                "id": pa.array([batch.rows[i]["id"] for i in present], pa.string()),
                "key": pa.array([batch.keys[i] for i in present], pa.string()),
                "image": pa.array([batch.images[i] for i in present], pa.binary()),
            }
            if batch.strips is not None:
                columns["strip"] = pa.array([batch.strip(i) for i in present], pa.binary())
            write_bytes_atomic(fs, join(root, relative), _parquet_bytes(pa.table(columns)))
        paths = [
            f"{relative}#{key}" if data is not None else None
            for key, data in zip(batch.keys, batch.images, strict=True)
        ]
        strips = [
            f"{relative}#{key}#strip" if data is not None and batch.strip(i) is not None else None
            for i, (key, data) in enumerate(zip(batch.keys, batch.images, strict=True))
        ]
        return paths, strips


WRITERS = {"files": FilesWriter, "webdataset": WebDatasetWriter, "parquet": ParquetImageWriter}


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _partition_dir(columns: list[str], values: tuple) -> str:
    parts = [
        f"{name}={HIVE_NULL if value is None else urllib.parse.quote(str(value), safe='')}"
        for name, value in zip(columns, values, strict=True)
    ]
    return "".join(p + "/" for p in parts)


def _arrow_type(name: str) -> pa.DataType:
    try:
        return pa.type_for_alias(name)
    except ValueError:
        return pa.string()


def read_metadata(
    output_uri: str,
    storage_options: dict[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Every metadata row of an output as one Arrow table, partition columns included with the
    types they had when written (`manifest.json` records them: a Hive path says only "5")."""
    import pyarrow.dataset as ds

    fs, root = filesystem(output_uri, storage_options)
    manifest = read_json(fs, join(root, MANIFEST))
    if manifest is None:
        raise SdrayError(f"{output_uri!r} has no {MANIFEST}: not an sdray output")
    if "partitioning" in manifest:
        fields = [
            pa.field(c["name"], _arrow_type(c["type"])) for c in manifest["partitioning"]["columns"]
        ]
        partitioning = ds.partitioning(pa.schema(fields), flavor="hive") if fields else None
    else:  # written before manifests kept the types: infer them from the paths
        partitioned = manifest.get("config", {}).get("output", {}).get("partition_by")
        partitioning = "hive" if partitioned else None
    dataset = ds.dataset(
        join(root, METADATA_DIR), filesystem=fs, format="parquet", partitioning=partitioning
    )
    return dataset.to_table(columns=columns)


def partitioning_record(
    partition_by: list[str], shards: list[dict[str, Any]], previous: dict[str, Any] | None = None
) -> dict:
    """The manifest's record of how metadata is partitioned, with each column's Arrow type
    (from this run's shards, else from the `previous` manifest of a resumed run)."""
    types: dict[str, str] = {}
    earlier = ((previous or {}).get("partitioning") or {}).get("columns", [])
    for shard in [*shards, {"partition_types": {c["name"]: c["type"] for c in earlier}}]:
        for name, kind in shard.get("partition_types", {}).items():
            if kind != "null":
                types.setdefault(name, kind)
    return {
        "flavor": "hive",
        "columns": [{"name": c, "type": types.get(c, "string")} for c in partition_by],
    }


def remove_uncommitted(fs, root: str, partition_depth: int, images: str) -> int:
    """Delete what a killed run wrote for shards it never committed; return how many entries.

    A shard is committed when its metadata file exists (written last). Image shards without
    one (a `files` shard directory, a tar, a Parquet file) and temporary files of interrupted
    local writes are removed, so only committed images remain and a resume cannot duplicate
    them. Lists shard names only (one level per partition), never every image.
    """
    levels = "*/" * partition_depth
    metadata_root = join(root, METADATA_DIR)
    images_root = join(root, IMAGES_DIR)

    def shards(base: str, pattern: str) -> list[str]:
        return fs.glob(f"{base}/{levels}{pattern}") if fs.exists(base) else []

    def name(path: str, base: str) -> str:
        relative = path[len(base.rstrip("/")) + 1 :]
        for suffix in (".parquet", ".tar"):
            relative = relative.removesuffix(suffix)
        return relative

    committed = {name(p, metadata_root) for p in shards(metadata_root, "part-*.parquet")}
    pattern = "part-*" if images == "files" else "part-*.*"
    stale = [p for p in shards(images_root, pattern) if name(p, images_root) not in committed]
    stale += shards(metadata_root, ".part-*.tmp") + shards(images_root, ".part-*.tmp")
    for path in stale:
        fs.rm(path, recursive=True)
    return len(stale)


class ImageDatasink(Datasink):
    """Writes images (through the configured writer) and metadata shards under OUTPUT."""

    def __init__(
        self,
        output_uri: str,
        *,
        output_format: str,
        image_format: str,
        rows_per_shard: int,
        partition_by: list[str],
        run_id: str,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.output_uri = output_uri
        self.output_format = output_format
        self.extension = EXTENSIONS[image_format]
        self.rows_per_shard = rows_per_shard
        self.partition_by = list(partition_by)
        self.run_id = run_id
        self.storage_options = storage_options
        self.shards: list[dict[str, Any]] = []

    def write(self, blocks: Iterable[Block], ctx) -> list[dict[str, Any]]:
        # The job hands over blocks of exactly rows_per_shard rows (all but the last), so one
        # block is one shard; slicing only guards against callers that do not.
        fs, root = filesystem(self.output_uri, self.storage_options)
        writer = WRITERS[self.output_format](self.extension)
        stats: list[dict[str, Any]] = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            for values, part in self._partitions(table):
                directory = _partition_dir(self.partition_by, values)
                for start in range(0, part.num_rows, self.rows_per_shard):
                    chunk = part.slice(start, self.rows_per_shard)
                    shard = f"part-{self.run_id}-{ctx.task_idx:05d}-{len(stats):04d}"
                    stats.append(self._write_shard(fs, root, writer, directory, shard, chunk))
        return stats

    def _partitions(self, table: pa.Table):
        if not self.partition_by:
            yield (), table
            return
        keys = table.select(self.partition_by).to_pylist()
        groups: dict[tuple, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(tuple(key[c] for c in self.partition_by), []).append(index)
        for values, indices in groups.items():
            yield values, table.take(pa.array(indices))

    def _write_shard(self, fs, root, writer, directory: str, shard: str, chunk: pa.Table) -> dict:
        metadata = chunk.drop_columns([c for c in chunk.column_names if c.startswith("__sdray")])
        rows = metadata.to_pylist()
        keys = [sample_key(r["id"]) for r in rows]
        images = chunk.column(IMAGE_COLUMN).to_pylist()
        strips = (
            chunk.column(STRIP_COLUMN).to_pylist() if STRIP_COLUMN in chunk.column_names else None
        )
        paths, strip_paths = writer.write(
            fs, root, f"{IMAGES_DIR}/{directory}", shard, ShardImages(keys, images, rows, strips)
        )
        metadata = metadata.append_column("image_path", pa.array(paths, pa.string()))
        if strips is not None:
            metadata = metadata.append_column("preview_path", pa.array(strip_paths, pa.string()))
        ordered = [c for c in LEADING_COLUMNS if c in metadata.column_names]
        ordered += [c for c in metadata.column_names if c not in ordered]
        metadata = metadata.select([c for c in ordered if c not in self.partition_by])
        relative = f"{METADATA_DIR}/{directory}{shard}.parquet"
        write_bytes_atomic(fs, join(root, relative), _parquet_bytes(metadata))  # the commit
        status = [r["status"] for r in rows]
        return {
            "shard": relative,
            "rows": len(rows),
            "ok": sum(s == "ok" for s in status),
            "error": sum(s != "ok" for s in status),
            # Hive paths lose the partition columns' types; the manifest keeps them.
            "partition_types": {c: str(chunk.schema.field(c).type) for c in self.partition_by},
        }

    def on_write_complete(self, write_result) -> None:
        self.shards = [s for task in write_result.write_returns for s in task]
