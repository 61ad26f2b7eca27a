"""Writing units: images through interchangeable writers, then each shard's metadata, committed
once and only once.

A shard is a unit's rows of one partition value (see `sdray.batch.units`), named after the unit.
Its images are written first, under a name that adds the run's id: a container in one streaming
upload (webdataset, parquet), or files written concurrently. Its metadata Parquet file comes last,
written only if absent: that write is the commit. A shard is committed exactly when its metadata
exists, and of two attempts at one shard (a task retried after its node was lost, though it had
committed; a run that lost the output to another) exactly one commits; the other removes its
images. Before each commit the writer checks that its run still holds the output's lease, so a
run that lost it commits nothing more.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from sdray.batch.cluster import later_figures
from sdray.batch.lease import check_held
from sdray.batch.stages import IMAGE_COLUMN, STRIP_COLUMN
from sdray.batch.units import partition_dirs, unpack
from sdray.errors import SdrayError
from sdray.images import EXTENSIONS
from sdray.requests import PREPARED_SCHEMA
from sdray.storage import create_new, filesystem, join, read_json, upload, write_bytes_atomic

METADATA_DIR = "metadata"
MANIFEST = "manifest.json"
IMAGES_DIR = "images"
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
WRITE_THREADS = 16  # image files one write task stores at once (`files`)
EXAMPLES = 5
# Fault injection for tests: when set to a path, the first write task to commit a shard creates
# that file and exits at once, before Ray hears that it succeeded (as if its node died then).
EXIT_AFTER_COMMIT_ENV = "SDRAY_TEST_EXIT_AFTER_COMMIT"


def _maybe_exit_after_commit() -> None:
    marker = os.environ.get(EXIT_AFTER_COMMIT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


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

    def present(self) -> list[tuple[str, bytes, dict[str, Any], bytes | None]]:
        """(key, image, row, filmstrip) of each row that has an image."""
        return [
            (key, data, row, self.strip(i))
            for i, (key, data, row) in enumerate(
                zip(self.keys, self.images, self.rows, strict=True)
            )
            if data
        ]


STRIP_SUFFIX = ".strip.png"
# What a writer returns: each row's image path and filmstrip path (None where there is none).
WrittenPaths = tuple[list[str | None], list[str | None]]


class FilesWriter:
    """`files`: one object per image, `images/<partition>/<shard>/<key>.<ext>`, written by a
    pool of threads (object stores answer slowly, not busily)."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}"

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        paths = [
            None if data is None else f"{directory}{shard}/{key}.{self.extension}"
            for key, data in zip(batch.keys, batch.images, strict=True)
        ]
        strips = [
            None
            if path is None or batch.strip(index) is None
            else f"{directory}{shard}/{batch.keys[index]}{STRIP_SUFFIX}"
            for index, path in enumerate(paths)
        ]
        todo = [(p, d) for p, d in zip(paths, batch.images, strict=True) if p is not None]
        todo += [(p, batch.strip(i)) for i, p in enumerate(strips) if p is not None]
        if todo:
            with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(todo))) as pool:
                list(
                    pool.map(
                        lambda item: write_bytes_atomic(fs, join(root, item[0]), item[1]), todo
                    )
                )
        return paths, strips


class WebDatasetWriter:
    """`webdataset`: one tar per shard, streamed; each sample is `<key>.<ext>` with `<key>.json`."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}.tar"

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        relative = self.location(directory, shard)
        present = batch.present()
        if present:
            with (
                upload(fs, join(root, relative)) as handle,
                tarfile.open(fileobj=handle, mode="w|") as tar,
            ):
                for key, data, row, strip in present:
                    members = [
                        (f"{key}.{self.extension}", data),
                        (f"{key}.json", json.dumps(row, default=str).encode()),
                    ]
                    if strip is not None:
                        members.append((key + STRIP_SUFFIX, strip))
                    for name, payload in members:
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        paths = [
            f"{relative}#{key}.{self.extension}" if data is not None else None
            for key, data in zip(batch.keys, batch.images, strict=True)
        ]
        strips = [
            f"{relative}#{key}{STRIP_SUFFIX}"
            if data is not None and batch.strip(i) is not None
            else None
            for i, (key, data) in enumerate(zip(batch.keys, batch.images, strict=True))
        ]
        return paths, strips


class ParquetImageWriter:
    """`parquet`: one Parquet file per shard with the encoded image bytes in column `image`,
    streamed a row group at a time."""

    ROWS_PER_GROUP = 64

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}.parquet"

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        relative = self.location(directory, shard)
        present = batch.present()
        fields = [("id", pa.string()), ("key", pa.string()), ("image", pa.binary())]
        if batch.strips is not None:
            fields.append(("strip", pa.binary()))
        schema = pa.schema(fields)
        if present:
            with (
                upload(fs, join(root, relative)) as handle,
                pq.ParquetWriter(handle, schema, compression="zstd") as writer,
            ):
                for start in range(0, len(present), self.ROWS_PER_GROUP):
                    part = present[start : start + self.ROWS_PER_GROUP]
                    columns = {
                        "id": [r["id"] for _, _, r, _ in part],
                        "key": [k for k, _, _, _ in part],
                        "image": [d for _, d, _, _ in part],
                    }
                    if batch.strips is not None:
                        columns["strip"] = [s for _, _, _, s in part]
                    writer.write_table(pa.table(columns, schema=schema))
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


def committed_shards(fs, root: str, partition_depth: int) -> dict[str, dict[str, Any]]:
    """The committed shards of an output by unit: {unit: {"pieces": [partition dirs], "paths":
    [metadata files, relative to the output]}}, from the metadata file names alone (one listing
    per partition level, never a file read)."""
    base = join(root, METADATA_DIR)
    if not fs.exists(base):
        return {}
    units: dict[str, dict[str, Any]] = {}
    for path in fs.glob(f"{base}/{'*/' * partition_depth}part-*.parquet"):
        relative = path[len(base.rstrip("/")) + 1 :]
        directory, _, name = relative.rpartition("/")
        unit = name.removesuffix(".parquet")
        units.setdefault(unit, {"pieces": [], "paths": []})
        units[unit]["pieces"].append(directory + "/" if directory else "")
        units[unit]["paths"].append(f"{METADATA_DIR}/{relative}")
    return units


def remove_uncommitted(fs, root: str, partition_depth: int, images: str) -> int:
    """Delete what interrupted or losing attempts wrote for shards they never committed; return
    how many entries.

    Image shards (a `files` directory, a tar, a Parquet file) named after a unit whose metadata
    does not exist, temporary files of interrupted local writes, and, where a committed shard
    has images from two runs, those its metadata does not point to. Lists shard names only (one
    level per partition), never every image.
    """
    levels = "*/" * partition_depth
    metadata_root = join(root, METADATA_DIR)
    images_root = join(root, IMAGES_DIR)

    def listed(base: str, pattern: str) -> list[str]:
        return fs.glob(f"{base}/{levels}{pattern}") if fs.exists(base) else []

    def relative(path: str, base: str) -> str:
        return path[len(base.rstrip("/")) + 1 :]

    committed = {
        relative(p, metadata_root).removesuffix(".parquet")
        for p in listed(metadata_root, "part-*.parquet")
    }
    by_shard: dict[str, list[str]] = {}
    stale = []
    for path in listed(images_root, "part-*" if images == "files" else "part-*.*"):
        name = relative(path, images_root)
        for suffix in (".parquet", ".tar"):
            name = name.removesuffix(suffix)
        shard = name.rsplit("-", 1)[0]  # the unit's shard, less the run that wrote the images
        (by_shard.setdefault(shard, []) if shard in committed else stale).append(path)
    for shard, paths in by_shard.items():
        if len(paths) > 1:  # a losing attempt that died before removing its images
            table = pq.read_table(
                join(metadata_root, f"{shard}.parquet"), columns=["image_path"], filesystem=fs
            )
            used = {p.split("#")[0] for p in table.column("image_path").to_pylist() if p}
            stale += [p for p in paths if not any(join(root, u).startswith(p) for u in used)]
    stale += listed(metadata_root, ".part-*.tmp") + listed(images_root, ".part-*.tmp")
    for path in stale:
        fs.rm(path, recursive=True)
    return len(stale)


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Write statistics of two sets of units together (counts add, first times take the min)."""
    out = dict(total)
    for key, value in part.items():
        if key == "examples":
            out[key] = (out.get(key, []) + value)[:EXAMPLES]
        elif key == "partition_types":
            out[key] = {**value, **{k: v for k, v in out.get(key, {}).items() if v != "null"}}
        elif key == "actors":  # each model actor's latest running totals
            actors = dict(out.get(key, {}))
            for actor, figures in value.items():
                actors[actor] = (
                    later_figures(actors[actor], figures) if actor in actors else figures
                )
            out[key] = actors
        elif key.endswith("_at"):
            known = [t for t in (out.get(key), value) if t is not None]
            out[key] = min(known) if known else None
        else:
            out[key] = out.get(key, 0) + value
    return out


class ImageDatasink(Datasink):
    """Writes each unit's images (through the configured writer) and metadata shards, after
    `encode` (the encode stage) where one is given: a write task encodes and writes its units."""

    def __init__(
        self,
        output_uri: str,
        *,
        output_format: str,
        image_format: str,
        partition_by: list[str],
        run_id: str,
        lease_run: str | None,
        storage_options: dict[str, Any] | None = None,
        encode: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:
        self.output_uri = output_uri
        self.encode = encode  # the encode stage, run by the write task on each unit's rows
        self.output_format = output_format
        self.extension = EXTENSIONS[image_format]
        self.partition_by = list(partition_by)
        self.run_id = run_id
        self.lease_run = lease_run
        self.storage_options = storage_options
        self.stats: dict[str, Any] = {}

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        fs, root = filesystem(self.output_uri, self.storage_options)
        writer = WRITERS[self.output_format](self.extension)
        stats: dict[str, Any] = {}
        for block in blocks:
            for unit in BlockAccessor.for_block(block).to_arrow().to_pylist():
                stats = _merge_stats(stats, self._write_unit(fs, root, writer, unit))
        return stats

    def _write_unit(self, fs, root: str, writer, unit: dict[str, Any]) -> dict[str, Any]:
        stats = {
            "units": 1,
            "input_rows": unit["rows"],
            "done_before": unit["done"],
            **{k: unit[k] for k in ("read_at", "actor_ready_at", "generated_at")},
        }
        if unit.get("actor_figures"):
            figures = json.loads(unit["actor_figures"])
            stats["actors"] = {figures["actor_id"]: figures}
        if unit["table"] is None:
            return stats
        table = unpack(unit["table"])
        if self.encode is not None:
            table = self.encode(table)
        pieces: dict[str, list[int]] = {}  # each partition's rows, in the unit's order
        for index, directory in enumerate(partition_dirs(table, self.partition_by)):
            pieces.setdefault(directory, []).append(index)
        for directory, rows in pieces.items():
            piece = table if len(pieces) == 1 else table.take(pa.array(rows, pa.int64()))
            stats = _merge_stats(
                stats, self._write_shard(fs, root, writer, directory, unit["unit"], piece)
            )
        return stats

    def _write_shard(self, fs, root, writer, directory: str, unit: str, chunk: pa.Table) -> dict:
        import numpy as np
        import pyarrow.compute as pc

        check_held(fs, root, self.lease_run)  # a run that lost the output writes nothing more
        relative = f"{METADATA_DIR}/{directory}{unit}.parquet"
        if fs.exists(join(root, relative)):  # committed by an attempt Ray never heard back from
            return {"committed_elsewhere": chunk.num_rows}
        metadata = chunk.drop_columns([c for c in chunk.column_names if c.startswith("__sdray")])
        present = np.flatnonzero(chunk.column(IMAGE_COLUMN).is_valid())  # error rows: no image
        rows = metadata.take(present).to_pylist()
        keys = [sample_key(r["id"]) for r in rows]
        images = chunk.column(IMAGE_COLUMN).take(present).to_pylist()
        strips = (
            chunk.column(STRIP_COLUMN).take(present).to_pylist()
            if STRIP_COLUMN in chunk.column_names
            else None
        )
        shard = f"{unit}-{self.run_id}"
        stored, stored_strips = writer.write(
            fs, root, f"{IMAGES_DIR}/{directory}", shard, ShardImages(keys, images, rows, strips)
        )
        paths: list[str | None] = [None] * chunk.num_rows
        strip_paths: list[str | None] = [None] * chunk.num_rows
        for index, path, strip in zip(present, stored, stored_strips, strict=True):
            paths[index], strip_paths[index] = path, strip
        metadata = metadata.append_column("image_path", pa.array(paths, pa.string()))
        if strips is not None:
            metadata = metadata.append_column("preview_path", pa.array(strip_paths, pa.string()))
        ordered = [c for c in LEADING_COLUMNS if c in metadata.column_names]
        ordered += [c for c in metadata.column_names if c not in ordered]
        metadata = metadata.select([c for c in ordered if c not in self.partition_by])
        check_held(fs, root, self.lease_run)  # and checks again just before its commit
        if not create_new(fs, join(root, relative), _parquet_bytes(metadata)):  # the commit
            if len(present):
                fs.rm(join(root, IMAGES_DIR, writer.location(directory, shard)), recursive=True)
            return {"committed_elsewhere": chunk.num_rows}
        _maybe_exit_after_commit()
        ok = pc.equal(chunk.column("status"), "ok")
        # Rows in error before generation (invalid, or a duplicate id): no truncation flag.
        invalid = chunk.filter(pc.and_(pc.invert(ok), pc.is_null(chunk.column("truncated"))))
        examples = invalid.slice(0, EXAMPLES).select(["id", "error"]).to_pylist()
        return {
            "shards": 1,
            "rows": chunk.num_rows,
            "ok": pc.sum(ok).as_py() or 0,
            "error": chunk.num_rows - (pc.sum(ok).as_py() or 0),
            "invalid": invalid.num_rows,
            "examples": [f"{r['id']}: {r['error']}" if r["id"] else r["error"] for r in examples],
            "committed_at": time.time(),
            # Hive paths lose the partition columns' types; the manifest keeps them.
            "partition_types": {c: str(chunk.schema.field(c).type) for c in self.partition_by},
        }

    def on_write_complete(self, write_result) -> None:
        stats: dict[str, Any] = {}
        for part in write_result.write_returns:
            stats = _merge_stats(stats, part)
        self.stats = stats
