"""Writing units: images through interchangeable writers, then each shard's metadata, committed
once and only once.

A shard is a unit's rows of one partition value (see `sdray.batch.units`), named after the unit.
Its images are written first, under a name that adds the write *attempt* (the run's id and a
token of its own): a container in one streaming upload (webdataset, parquet), or files written
concurrently into a folder. Its metadata Parquet file comes last, written only if absent: that
write is the commit, and the file's footer records the run and its fingerprint. A shard is
committed exactly when its metadata exists, and of two attempts at one shard (a task retried
after its node was lost, though it had committed; a run that lost the output to another)
exactly one commits; the other removes its own images, never another attempt's. Before each
commit the writer checks that its run still holds the output's lease, so a run that lost it
commits nothing more (and the run that holds it refuses, at its end, any shard committed in
the window between such a check and its write: `foreign_shards`).

A unit the read task cut into several calls (`cut_calls`) reaches the write tasks one call at a
time, in any order and in any task. Each call is *staged*: its images written (`files`, into a
folder of its attempt) or kept encoded in the staged piece (containers), and the piece written
once, create-if-absent, as `.sdray-staging/<run>/<unit>/<call>.parquet`. The task that stages
a unit's last piece (it lists the unit's pieces after writing its own) puts the unit together:
the shard's container from the pieces' images, in the unit's order, and its commit as above.
A piece holds one call's images at most, so no task holds a whole shard of pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from sdray.batch.cluster import later_figures
from sdray.batch.lease import check_held
from sdray.batch.stages import IMAGE_COLUMN, STRIP_COLUMN
from sdray.batch.units import call_rows, partition_dirs, unpack
from sdray.errors import SdrayError
from sdray.images import EXTENSIONS
from sdray.requests import PREPARED_SCHEMA
from sdray.storage import create_new, filesystem, join, read_json, upload, write_bytes_atomic

METADATA_DIR = "metadata"
MANIFEST = "manifest.json"
IMAGES_DIR = "images"
STAGING_DIR = ".sdray-staging"  # pieces of units cut into several calls, until committed
# A committed shard's footer (Parquet key-value metadata): the run that committed it and that
# run's fingerprint (`sdray.batch.job.fingerprint`).
RUN_KEY, FINGERPRINT_KEY = "sdray.run", "sdray.fingerprint"
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


def attempt_name(run_id: str) -> str:
    """A write attempt's own name: the run's id and a token no other attempt has. An image
    shard is `<shard>-<attempt>`, so two attempts at one shard never write the same files."""
    return f"{run_id}.{uuid.uuid4().hex[:8]}"


def image_shard_unit(name: str) -> str:
    """The unit of an image shard's name (`<unit>-<attempt>[.tar|.parquet]`)."""
    for suffix in (".parquet", ".tar"):
        name = name.removesuffix(suffix)
    return name.rsplit("-", 1)[0]


@dataclass
class ShardImages:
    """Images of one shard to store: keys, encoded bytes (None for error rows), metadata rows."""

    keys: list[str]
    images: list[bytes | None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    strips: list[bytes | None] | None = None  # filmstrips of previews (output.preview_every)

    def strip(self, index: int) -> bytes | None:
        return None if self.strips is None else self.strips[index]

    def paths(self, image: Callable[[str], str], strip: Callable[[str], str]) -> WrittenPaths:
        """Each row's image path and filmstrip path (by its key), None where it has none."""
        images = [
            image(key) if data is not None else None
            for key, data in zip(self.keys, self.images, strict=True)
        ]
        strips = [
            strip(self.keys[i]) if path is not None and self.strip(i) is not None else None
            for i, path in enumerate(images)
        ]
        return images, strips

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
# What a writer's `add` returns: each row's image path and filmstrip path (None where none).
WrittenPaths = tuple[list[str | None], list[str | None]]
# An open image shard: add one batch of images, get their paths (see the writers' `open`).
AddImages = Callable[[ShardImages], WrittenPaths]


class ImageWriter:
    """An output format: where an image shard goes (`location`), and `open`, which starts one
    and gives a function that adds images to it, a batch at a time."""

    def __init__(self, extension: str) -> None:
        self.extension = extension

    def location(self, directory: str, shard: str) -> str:
        raise NotImplementedError

    def open(self, fs, root: str, directory: str, shard: str):
        raise NotImplementedError

    def write(self, fs, root: str, directory: str, shard: str, batch: ShardImages) -> WrittenPaths:
        """An image shard of one batch of images."""
        with self.open(fs, root, directory, shard) as add:
            return add(batch)


class FilesWriter(ImageWriter):
    """`files`: one object per image, `images/<partition>/<shard>/<key>.<ext>`, written by a
    pool of threads (object stores answer slowly, not busily)."""

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}"

    @contextmanager
    def open(self, fs, root: str, directory: str, shard: str) -> Iterator[AddImages]:
        def add(batch: ShardImages) -> WrittenPaths:
            folder = f"{directory}{shard}"
            paths, strips = batch.paths(
                lambda key: f"{folder}/{key}.{self.extension}",
                lambda key: f"{folder}/{key}{STRIP_SUFFIX}",
            )
            todo = [(p, d) for p, d in zip(paths, batch.images, strict=True) if p is not None]
            todo += [(p, batch.strip(i)) for i, p in enumerate(strips) if p is not None]
            if todo:
                with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(todo))) as pool:
                    list(
                        pool.map(
                            lambda item: write_bytes_atomic(fs, join(root, item[0]), item[1]),
                            todo,
                        )
                    )
            return paths, strips

        yield add


class WebDatasetWriter(ImageWriter):
    """`webdataset`: one tar per shard, streamed; each sample is `<key>.<ext>` with `<key>.json`."""

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}.tar"

    @contextmanager
    def open(self, fs, root: str, directory: str, shard: str) -> Iterator[AddImages]:
        relative = self.location(directory, shard)
        with ExitStack() as stack:
            tar = None

            def add(batch: ShardImages) -> WrittenPaths:
                nonlocal tar
                present = batch.present()
                if present and tar is None:  # no empty tar for a shard of error rows
                    handle = stack.enter_context(upload(fs, join(root, relative)))
                    tar = stack.enter_context(tarfile.open(fileobj=handle, mode="w|"))
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
                return batch.paths(
                    lambda key: f"{relative}#{key}.{self.extension}",
                    lambda key: f"{relative}#{key}{STRIP_SUFFIX}",
                )

            yield add


class ParquetImageWriter(ImageWriter):
    """`parquet`: one Parquet file per shard with the encoded image bytes in column `image`,
    streamed a row group at a time."""

    ROWS_PER_GROUP = 64

    def location(self, directory: str, shard: str) -> str:
        return f"{directory}{shard}.parquet"

    @contextmanager
    def open(self, fs, root: str, directory: str, shard: str) -> Iterator[AddImages]:
        relative = self.location(directory, shard)
        with ExitStack() as stack:
            writer = None

            def add(batch: ShardImages) -> WrittenPaths:
                nonlocal writer
                present = batch.present()
                fields = [("id", pa.string()), ("key", pa.string()), ("image", pa.binary())]
                if batch.strips is not None:
                    fields.append(("strip", pa.binary()))
                schema = pa.schema(fields)
                if present and writer is None:  # no empty file for a shard of error rows
                    handle = stack.enter_context(upload(fs, join(root, relative)))
                    writer = stack.enter_context(
                        pq.ParquetWriter(handle, schema, compression="zstd")
                    )
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
                return batch.paths(
                    lambda key: f"{relative}#{key}", lambda key: f"{relative}#{key}#strip"
                )

            yield add


WRITERS = {"files": FilesWriter, "webdataset": WebDatasetWriter, "parquet": ParquetImageWriter}


def _parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
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
    does not exist, temporary files of interrupted local writes, the pieces that runs staged
    (`STAGING_DIR`: every run that staged them is over, this run holds the lease), and, where a
    committed shard has image shards of several attempts, those its metadata does not point to.
    Lists shard names only (one level per partition), never every image.
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
        shard = image_shard_unit(relative(path, images_root))  # less the attempt that wrote it
        (by_shard.setdefault(shard, []) if shard in committed else stale).append(path)
    for shard, paths in by_shard.items():
        if len(paths) > 1:  # a losing attempt that died before removing its images, or calls
            used = _used_image_shards(fs, join(metadata_root, f"{shard}.parquet"))
            stale += [p for p in paths if relative(p, root) not in used]
    stale += listed(metadata_root, ".part-*.tmp") + listed(images_root, ".part-*.tmp")
    if fs.exists(join(root, STAGING_DIR)):
        stale.append(join(root, STAGING_DIR))
    for path in stale:
        fs.rm(path, recursive=True)
    return len(stale)


def _used_image_shards(fs, metadata_path: str) -> set[str]:
    """The image shards (relative to the output) a committed shard's metadata points to."""
    table = pq.read_table(metadata_path, columns=["image_path"], filesystem=fs)
    return {_image_shard_of(p) for p in table.column("image_path").to_pylist() if p}


def _image_shard_of(image_path: str) -> str:
    """`images/…/<shard>-<attempt>` (files: the folder) or the container, of an image path."""
    container = image_path.split("#")[0]
    return container if "#" in image_path else container.rsplit("/", 1)[0]


def foreign_shards(
    fs, root: str, paths: Iterable[str], fingerprint: str, accepted_runs: Iterable[str]
) -> list[tuple[str, str]]:
    """Of these committed metadata files (relative to the output), those that a run other than
    the accepted ones, or with another fingerprint, committed: (path, what it records)."""
    accepted = set(accepted_runs)

    def refused(path: str) -> tuple[str, str] | None:
        footer = pq.read_metadata(join(root, path), filesystem=fs).metadata or {}
        run = footer.get(RUN_KEY.encode(), b"").decode()
        recorded = footer.get(FINGERPRINT_KEY.encode(), b"").decode()
        if run in accepted and recorded == fingerprint:
            return None
        return path, f"run {run or '?'}, fingerprint {recorded[:12] or '?'}"

    with ThreadPoolExecutor(8) as pool:
        return [r for r in pool.map(refused, sorted(paths)) if r is not None]


def remove_shards(fs, root: str, paths: Iterable[str]) -> None:
    """Delete committed shards: their metadata, then the image shards it points to."""
    for path in paths:
        used = _used_image_shards(fs, join(root, path))
        fs.rm(join(root, path))
        for shard in used:
            if fs.exists(join(root, shard)):
                fs.rm(join(root, shard), recursive=True)


def clean_staging(fs, root: str, run_id: str) -> None:
    """After a run: remove the pieces it staged (its units are committed)."""
    staging = join(root, STAGING_DIR)
    fs.invalidate_cache(staging)
    if fs.exists(join(staging, run_id)):
        fs.rm(join(staging, run_id), recursive=True)
    try:
        if not fs.ls(staging, detail=False):
            fs.rm(staging, recursive=True)
    except FileNotFoundError:
        pass


class _Emptied(Exception):
    """A staged piece was emptied: its unit is committed."""


def _read_piece(fs, path: str, columns: list[str] | None = None, schema_only: bool = False):
    """A staged piece's rows (or schema); `_Emptied` once the unit's commit emptied it."""
    with fs.open(path, "rb") as handle:
        if handle.size == 0:
            raise _Emptied(path)
        if schema_only:
            return pq.read_schema(handle)
        return pq.read_table(handle, columns=columns)


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Write statistics of two sets of units together (counts add, lists join, first times take
    the min)."""
    out = dict(total)
    for key, value in part.items():
        if key == "examples":
            out[key] = (out.get(key, []) + value)[:EXAMPLES]
        elif isinstance(value, list):  # the metadata files this run committed
            out[key] = out.get(key, []) + value
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
    """Writes each call's images (through the configured writer) and its unit's metadata
    shards, after `encode` (the encode stage) where one is given: a write task encodes and
    writes its calls, and puts together a unit cut into several calls once all are staged."""

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
        run: str | None = None,
        fingerprint: str = "",
    ) -> None:
        self.output_uri = output_uri
        self.encode = encode  # the encode stage, run by the write task on each call's rows
        self.output_format = output_format
        self.extension = EXTENSIONS[image_format]
        self.partition_by = list(partition_by)
        self.run_id = run_id  # in the names of what this run writes
        self.lease_run = lease_run
        self.run = run or run_id  # recorded in each shard it commits, with the fingerprint
        self.fingerprint = fingerprint
        self.storage_options = storage_options
        self.stats: dict[str, Any] = {}

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        fs, root = filesystem(self.output_uri, self.storage_options)
        writer = WRITERS[self.output_format](self.extension)
        stats: dict[str, Any] = {}
        for block in blocks:
            for call in call_rows(BlockAccessor.for_block(block).to_arrow()):
                stats = _merge_stats(stats, self._write_call(fs, root, writer, call))
        return stats

    def _write_call(self, fs, root: str, writer, call: dict[str, Any]) -> dict[str, Any]:
        stats: dict[str, Any] = {k: call[k] for k in ("read_at", "actor_ready_at", "generated_at")}
        if call["call"] == 0:  # the unit's own counts ride on its first call
            stats.update(units=1, input_rows=call["rows"], done_before=call["done"])
        if call.get("actor_figures"):
            figures = json.loads(call["actor_figures"])
            stats["actors"] = {figures["actor_id"]: figures}
        if call["table"] is None:
            return stats
        check_held(fs, root, self.lease_run)  # a run that lost the output writes nothing more
        table = unpack(call["table"])
        if call["calls"] > 1:
            return _merge_stats(stats, self._stage(fs, root, writer, call, table))
        if self._committed(fs, root, call["unit"], table):  # by an attempt Ray never heard of
            return _merge_stats(stats, {"committed_elsewhere": table.num_rows})
        for directory, piece in self._by_partition(self._encoded(table)):
            stored = self._store_images(fs, root, writer, directory, call["unit"], [piece])
            stats = _merge_stats(stats, self._commit(fs, root, directory, call["unit"], *stored))
        return stats

    def _encoded(self, table: pa.Table) -> pa.Table:
        """The rows with their images encoded (the encode stage), once they are to be written."""
        return table if self.encode is None else self.encode(table)

    def _by_partition(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """The table's rows by partition directory, each in the table's order."""
        pieces: dict[str, list[int]] = {}
        for index, directory in enumerate(partition_dirs(table, self.partition_by)):
            pieces.setdefault(directory, []).append(index)
        if len(pieces) == 1:
            return [(next(iter(pieces)), table)]
        return [(d, table.take(pa.array(rows, pa.int64()))) for d, rows in pieces.items()]

    def _store_images(
        self, fs, root: str, writer, directory: str, unit: str, tables: Iterable[pa.Table]
    ) -> tuple[pa.Table, list[str]]:
        """Write the images of encoded rows (`tables`, in order) as one image shard of a new
        attempt; return their metadata with `image_path` (and `preview_path`), and the image
        shard written (none when no row had an image)."""
        shard = f"{unit}-{attempt_name(self.run_id)}"
        parts, wrote = [], False
        with writer.open(fs, root, f"{IMAGES_DIR}/{directory}", shard) as add:
            for chunk in tables:
                hidden = [c for c in chunk.column_names if c.startswith("__sdray")]
                metadata = chunk.drop_columns(hidden)
                present = chunk.column(IMAGE_COLUMN).is_valid().to_numpy(zero_copy_only=False)
                present = present.nonzero()[0]  # error rows: no image
                strips = STRIP_COLUMN in chunk.column_names
                batch = ShardImages(
                    keys=[sample_key(i) for i in metadata.column("id").take(present).to_pylist()],
                    images=chunk.column(IMAGE_COLUMN).take(present).to_pylist(),
                    rows=metadata.take(present).to_pylist(),
                    strips=chunk.column(STRIP_COLUMN).take(present).to_pylist() if strips else None,
                )
                stored, stored_strips = add(batch)
                wrote |= bool(len(present))
                paths: list[str | None] = [None] * chunk.num_rows
                strip_paths: list[str | None] = [None] * chunk.num_rows
                for index, path, strip in zip(present, stored, stored_strips, strict=True):
                    paths[index], strip_paths[index] = path, strip
                metadata = metadata.append_column("image_path", pa.array(paths, pa.string()))
                if strips:
                    metadata = metadata.append_column(
                        "preview_path", pa.array(strip_paths, pa.string())
                    )
                parts.append(metadata)
        own = [writer.location(f"{IMAGES_DIR}/{directory}", shard)] if wrote else []
        return pa.concat_tables(parts, promote_options="permissive"), own

    def _commit(
        self, fs, root: str, directory: str, unit: str, metadata: pa.Table, own: list[str]
    ) -> dict[str, Any]:
        """Commit one shard (its metadata, create-if-absent), or, where another attempt did,
        remove the image shards `own` that its metadata does not point to."""
        import pyarrow.compute as pc

        relative = f"{METADATA_DIR}/{directory}{unit}.parquet"
        types = {c: str(metadata.schema.field(c).type) for c in self.partition_by}
        ordered = [c for c in LEADING_COLUMNS if c in metadata.column_names]
        ordered += [c for c in metadata.column_names if c not in ordered]
        stored = metadata.select([c for c in ordered if c not in self.partition_by])
        stored = stored.replace_schema_metadata(
            {RUN_KEY: self.run, FINGERPRINT_KEY: self.fingerprint}
        )
        check_held(fs, root, self.lease_run)  # checked again just before the commit
        if not create_new(fs, join(root, relative), _parquet_bytes(stored)):  # the commit
            used = _used_image_shards(fs, join(root, relative))
            for shard in own:
                if shard not in used:  # only this attempt's own images, never the winner's
                    fs.rm(join(root, shard), recursive=True)
            return {"committed_elsewhere": metadata.num_rows}
        _maybe_exit_after_commit()
        ok = pc.equal(metadata.column("status"), "ok")
        # Rows in error before generation (invalid, or a duplicate id): no truncation flag.
        invalid = metadata.filter(pc.and_(pc.invert(ok), pc.is_null(metadata.column("truncated"))))
        examples = invalid.slice(0, EXAMPLES).select(["id", "error"]).to_pylist()
        ok_rows = pc.sum(ok).as_py() or 0
        return {
            "shards": 1,
            "rows": metadata.num_rows,
            "ok": ok_rows,
            "error": metadata.num_rows - ok_rows,
            "invalid": invalid.num_rows,
            "examples": [f"{r['id']}: {r['error']}" if r["id"] else r["error"] for r in examples],
            "committed_at": time.time(),
            "committed_paths": [relative],
            # Hive paths lose the partition columns' types; the manifest keeps them.
            "partition_types": types,
        }

    # -- units cut into several calls ----------------------------------------------------------

    def _staged(self, root: str, unit: str) -> str:
        return join(root, STAGING_DIR, self.run_id, unit)

    def _stage(self, fs, root: str, writer, call: dict[str, Any], table: pa.Table) -> dict:
        """Stage one call of a unit: its piece written once (its images too, for `files`). A
        task that finds every piece staged once its own is (or was, by an earlier attempt: a
        retried task whose first attempt staged the last piece and died) puts the unit together
        and commits what is not committed yet."""
        unit, staged = call["unit"], self._staged(root, call["unit"])
        stats: dict[str, Any] = {}
        if self._committed(fs, root, unit, table):  # a retried task, after its rows' commit
            stats["committed_elsewhere"] = table.num_rows
        else:
            self._stage_piece(fs, root, writer, call, self._encoded(table))
        fs.invalidate_cache(staged)
        if len(fs.glob(join(staged, "*.parquet"))) < call["calls"]:
            return stats
        return _merge_stats(stats, self._assemble(fs, root, writer, unit, call["calls"]))

    def _stage_piece(self, fs, root: str, writer, call: dict[str, Any], table: pa.Table) -> None:
        """Write one call's piece, create-if-absent; an attempt that finds it written removes
        the images it wrote itself."""
        unit, own = call["unit"], []
        if self.output_format == "files":  # images in their place now; the piece says where
            parts = []
            for directory, rows in self._by_partition(table):
                metadata, wrote = self._store_images(fs, root, writer, directory, unit, [rows])
                parts.append(metadata)
                own += wrote
            table = pa.concat_tables(parts, promote_options="permissive")
        hidden = [c for c in table.column_names if c.startswith("__sdray")]
        piece = table.drop_columns([c for c in hidden if c not in (IMAGE_COLUMN, STRIP_COLUMN)])
        path = join(self._staged(root, unit), f"{call['call']:06d}.parquet")
        if not create_new(fs, path, _parquet_bytes(piece, compression="none")):
            for shard in own:  # another attempt staged this call: its images are the ones
                fs.rm(join(root, shard), recursive=True)

    def _committed(self, fs, root: str, unit: str, table: pa.Table) -> bool:
        """Whether the unit's shards of every partition of these rows are committed."""
        return all(
            self._shard_exists(fs, root, directory, unit)
            for directory in set(partition_dirs(table, self.partition_by))
        )

    @staticmethod
    def _shard_exists(fs, root: str, directory: str, unit: str) -> bool:
        path = join(root, f"{METADATA_DIR}/{directory}{unit}.parquet")
        fs.invalidate_cache(path.rsplit("/", 1)[0])  # another process may have committed it
        return fs.exists(path)

    def _assemble(self, fs, root: str, writer, unit: str, calls: int) -> dict[str, Any]:
        """Put a unit together from its staged pieces, shard by shard (partition), rows in the
        unit's order, one piece in memory at a time; shards committed already are left alone
        (putting a unit together twice is harmless: the commit is create-if-absent). The
        pieces stay where they are until the run ends (`clean_staging`), so a late attempt at
        a call finds its place taken; once every shard of the unit is committed, a
        container's pieces are emptied, to free their images' bytes."""
        staged = self._staged(root, unit)
        fs.invalidate_cache(staged)  # the pieces' sizes as they are now, not as listed
        pieces = [join(staged, f"{i:06d}.parquet") for i in range(calls)]
        stats: dict[str, Any] = {}
        rows = None
        try:
            columns = [
                name
                for name in _read_piece(fs, pieces[0], schema_only=True).names
                if name not in (IMAGE_COLUMN, STRIP_COLUMN)
            ]
            rows = pa.concat_tables(
                [_read_piece(fs, p, columns) for p in pieces], promote_options="permissive"
            )
            for directory, part in self._by_partition(rows):
                if self._shard_exists(fs, root, directory, unit):
                    # committed by another task putting the unit together, whose figures may
                    # never have come back (it died after): the run counts what is stored
                    stats = _merge_stats(stats, {"committed_elsewhere": part.num_rows})
                    continue
                if self.output_format == "files":  # the pieces point to their images already
                    metadata = part
                    paths = metadata["image_path"].to_pylist()
                    own = sorted({_image_shard_of(p) for p in paths if p})
                else:

                    def parts(directory: str = directory) -> Iterator[pa.Table]:
                        for path in pieces:
                            yield self._partition_rows(_read_piece(fs, path), directory)

                    metadata, own = self._store_images(fs, root, writer, directory, unit, parts())
                stats = _merge_stats(stats, self._commit(fs, root, directory, unit, metadata, own))
        except _Emptied:  # another task put this unit together, and emptied its pieces
            elsewhere = rows.num_rows if rows is not None else 1
            return _merge_stats(stats, {"committed_elsewhere": elsewhere})
        if self.output_format != "files":
            for path in pieces:
                write_bytes_atomic(fs, path, b"")
        return stats

    def _partition_rows(self, table: pa.Table, directory: str) -> pa.Table:
        import numpy as np

        dirs = partition_dirs(table, self.partition_by)
        keep = np.array([d == directory for d in dirs], bool)
        return table if keep.all() else table.filter(pa.array(keep))

    def on_write_complete(self, write_result) -> None:
        stats: dict[str, Any] = {}
        for part in write_result.write_returns:
            stats = _merge_stats(stats, part)
        self.stats = stats
