"""Units cut into model actor calls of bounded size, and put together again by the write tasks:
each shard committed once, by one attempt, recording its run."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from sdray.batch.sink import (
    FINGERPRINT_KEY,
    RUN_KEY,
    STAGING_DIR,
    ImageDatasink,
    clean_staging,
    foreign_shards,
    remove_uncommitted,
)
from sdray.batch.stages import PIXELS_COLUMN, EncodeStage, pixel_array
from sdray.batch.units import call_row, cut_calls
from sdray.config import GenerationConfig, OutputConfig, SdrayConfig
from sdray.requests import prepare_table

UNIT = "part-0123456789ab-0000004-deadbeef"


def prepared(n: int, size: int = 8, **columns) -> pa.Table:
    table = pa.table({"id": [f"k{i}" for i in range(n)], "prompt": ["p"] * n, **columns})
    return prepare_table(table, GenerationConfig(width=size, height=size, max_width=4096))


def test_calls_are_bounded_by_rows_and_by_pixel_bytes_whatever_the_shard():
    table = prepared(10, size=1024)  # 3 MiB of pixels a row
    assert cut_calls(table, rows_per_call=4, max_bytes=1 << 40) == [(0, 4), (4, 8), (8, 10)]
    assert cut_calls(table, rows_per_call=100, max_bytes=7 << 20) == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 8),
        (8, 10),
    ]
    # A row larger than the cap still goes, alone; previews count as images of the row.
    assert cut_calls(prepared(3, size=2048), 8, 1 << 20) == [(0, 1), (1, 2), (2, 3)]
    with_previews = cut_calls(prepared(4, size=1024), 8, 19 << 20, preview_every=10)
    assert with_previews == [(0, 2), (2, 4)]  # 20 steps: 2 previews, 9 MiB a row
    # An image-to-image row sized by its picture (not known before it is fetched) counts as
    # the largest size allowed.
    sized_by_picture = prepared(3, size=64, init_image=["a.png"] * 3)
    assert sized_by_picture.column("width").null_count == 3
    assert cut_calls(sized_by_picture, 8, 40 << 20, unknown_area=2048 * 2048) == [
        (0, 1),
        (1, 2),
        (2, 3),
    ]  # 2048² x (3 + 3) bytes: its image and its init image, 24 MiB a row
    # Rows already in error cost nothing and ride along.
    mixed = prepared(6, size=1024, width=[1024, 1020, 1020, 1020, 1024, 1024])
    assert mixed.column("status").to_pylist()[1:4] == ["error"] * 3
    assert cut_calls(mixed, rows_per_call=2, max_bytes=1 << 40) == [(0, 5), (5, 6)]


def encoded_rows(n: int, lang: list[str] | None = None) -> pa.Table:
    """Generated rows as the model actor hands them on: raw pixels (row i: one flat grey),
    one row in error."""
    extra = {"lang": lang} if lang else {}
    rows = prepared(n, **extra)
    pixels = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(n)]
    pixels[2] = None
    status = rows.column("status").to_pylist()
    status[2] = "error"
    rows = rows.set_column(rows.column_names.index("status"), "status", pa.array(status))
    rows = rows.append_column("model", pa.array(["tiny"] * n))
    rows = rows.append_column("truncated", pa.array([False] * n))
    return rows.append_column(PIXELS_COLUMN, pixel_array(pixels))


def sink(output, fmt: str, run: str = "run1", partition_by=(), fingerprint: str = "f1"):
    return ImageDatasink(
        str(output),
        output_format=fmt,
        image_format="png",
        partition_by=list(partition_by),
        run_id=run,
        lease_run=None,
        encode=EncodeStage(OutputConfig()),
        run=run,
        fingerprint=fingerprint,
    )


def calls_of(table: pa.Table, bounds: list[tuple[int, int]]) -> list[pa.Table]:
    n = len(bounds)
    return [
        call_row(UNIT, i, n, table.num_rows if i == 0 else 0, 0, table.slice(a, b - a))
        for i, (a, b) in enumerate(bounds)
    ]


def files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def read_image(root, path: str) -> Image.Image:
    """An image by its metadata path: a file, `<tar>#<member>` or `<parquet>#<key>`."""
    import tarfile

    container, _, member = path.partition("#")
    if not member:
        return Image.open(io.BytesIO((root / container).read_bytes()))
    if container.endswith(".tar"):
        with tarfile.open(root / container) as tar:
            return Image.open(io.BytesIO(tar.extractfile(member).read()))
    table = pq.read_table(root / container).to_pylist()
    (row,) = [r for r in table if r["key"] == member]
    return Image.open(io.BytesIO(row["image"]))


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_a_unit_in_calls_written_in_any_order_by_any_tasks_commits_each_shard_once(tmp_path, fmt):
    """Three calls of one unit spanning two partitions reach three write tasks in a shuffled
    order: the last to be staged puts the unit together; one shard per partition, rows in the
    unit's order, each image where its metadata says; nothing staged is left."""
    langs = ["en", "fr", "en", "fr", "en", "en", "fr"]
    calls = calls_of(encoded_rows(7, langs), [(0, 3), (3, 5), (5, 7)])
    order = [2, 0, 1]
    random.Random(0).shuffle(order)
    stats = [sink(tmp_path, fmt, partition_by=["lang"]).write([calls[i]], None) for i in order]
    assert [s.get("shards", 0) for s in stats] == [0, 0, 2]  # the last staged assembles
    assert stats[order.index(0)]["input_rows"] == 7 and sum(s.get("units", 0) for s in stats) == 1
    for lang, expected in (("en", [0, 2, 4, 5]), ("fr", [1, 3, 6])):
        shard = pq.read_table(tmp_path / "metadata" / f"lang={lang}" / f"{UNIT}.parquet")
        assert shard.column("id").to_pylist() == [f"k{i}" for i in expected]
        footer = pq.read_metadata(tmp_path / "metadata" / f"lang={lang}" / f"{UNIT}.parquet")
        assert footer.metadata[RUN_KEY.encode()] == b"run1"
        assert footer.metadata[FINGERPRINT_KEY.encode()] == b"f1"
        for i, path in zip(expected, shard.column("image_path").to_pylist(), strict=True):
            if i == 2:
                assert path is None  # the row in error has no image
                continue
            assert read_image(tmp_path, path).getpixel((3, 3)) == (10 * i,) * 3
    # A retried write of a call after its unit was committed writes nothing more...
    again = sink(tmp_path, fmt, partition_by=["lang"]).write([calls[1]], None)
    assert "shards" not in again and again["committed_elsewhere"] >= 2  # nothing written again
    # ...and, once the run's end removed its pieces, every file under images/ is one the
    # metadata points to.
    clean_staging(LocalFileSystem(), str(tmp_path), "run1")
    assert not (tmp_path / STAGING_DIR).exists()
    used = {
        p.split("#")[0]
        for lang in ("en", "fr")
        for p in pq.read_table(tmp_path / "metadata" / f"lang={lang}" / f"{UNIT}.parquet")
        .column("image_path")
        .to_pylist()
        if p
    }
    assert {f for f in files(tmp_path) if f.startswith("images/")} == used


def test_a_call_written_again_after_its_unit_was_put_together_leaves_nothing(tmp_path, monkeypatch):
    """A retried write task whose call reaches staging after the unit was put together (the
    commit landed just after its check): the call's place is still taken (pieces stay until
    the run ends), so it removes the images it wrote; the run's end removes the pieces, and
    every image left is one the metadata points to."""
    calls = calls_of(encoded_rows(4), [(0, 2), (2, 4)])
    wds, plain = tmp_path / "webdataset", tmp_path / "files"
    for call in calls:
        sink(wds, "webdataset").write([call], None)
        sink(plain, "files").write([call], None)
    staged = list((wds / STAGING_DIR).rglob("*.parquet"))
    assert len(staged) == 2 and all(p.stat().st_size == 0 for p in staged)  # bytes freed
    monkeypatch.setattr(ImageDatasink, "_committed", lambda *args: False)
    late = sink(plain, "files").write([calls[0]], None)
    assert "shards" not in late and late["committed_elsewhere"] == 4  # the run counts again
    late = sink(wds, "webdataset").write([calls[1]], None)
    assert "shards" not in late and late["committed_elsewhere"] > 0
    for output in (wds, plain):
        clean_staging(LocalFileSystem(), str(output), "run1")
        assert not (output / STAGING_DIR).exists()
        shard = pq.read_table(output / "metadata" / f"{UNIT}.parquet")
        used = {p.split("#")[0] for p in shard.column("image_path").to_pylist() if p}
        assert {f for f in files(output) if f.startswith("images/")} == used


def test_shards_of_another_run_or_fingerprint_are_refused(tmp_path):
    """The end-of-run check: a shard committed by a run that lost the lease (between its lease
    check and its write) or with other settings is refused; this run's and the accepted
    earlier runs' are not."""
    table = encoded_rows(3)
    for run, fingerprint, unit in (
        ("now", "f1", "part-000000000000-0000000-aaaaaaaa"),
        ("earlier", "f1", "part-000000000000-0000001-bbbbbbbb"),
        ("zombie", "f1", "part-000000000000-0000002-cccccccc"),
        ("earlier", "f0", "part-000000000000-0000003-dddddddd"),
    ):
        row = call_row(unit, 0, 1, 3, 0, table)
        sink(tmp_path, "files", run=run, fingerprint=fingerprint).write([row], None)
    paths = [f for f in files(tmp_path) if f.startswith("metadata/")]
    fs = LocalFileSystem()
    refused = foreign_shards(fs, str(tmp_path), paths, "f1", ["earlier", "now"])
    assert [(p.split("/")[-1][:28], why) for p, why in refused] == [
        ("part-000000000000-0000002-cc", "run zombie, fingerprint f1"),
        ("part-000000000000-0000003-dd", "run earlier, fingerprint f0"),
    ]


def test_a_resume_removes_what_runs_staged(tmp_path):
    calls = calls_of(encoded_rows(4), [(0, 2), (2, 4)])
    sink(tmp_path, "files").write([calls[0]], None)  # the run died before the second call
    assert (tmp_path / STAGING_DIR).exists() and any(
        f.startswith("images/") for f in files(tmp_path)
    )
    assert remove_uncommitted(LocalFileSystem(), str(tmp_path), 0, images="files") == 2
    assert files(tmp_path) == []


def test_create_if_absent_is_probed_per_store(tmp_path):
    import fsspec

    from sdray.storage import create_is_atomic

    assert create_is_atomic(LocalFileSystem(), str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
    memory = fsspec.filesystem("memory")
    assert "no atomic create-if-absent on memory://" in create_is_atomic(memory, "/out")
    from sdray.batch.job import commit_warning

    assert commit_warning(LocalFileSystem(), str(tmp_path), str(tmp_path)) is None
    line = commit_warning(memory, "/out", "memory://out")
    assert (
        line.startswith("warning: output 'memory://out': sdray has no atomic") and "\n" not in line
    )


def test_auto_shards_hold_a_minute_of_a_gpus_work():
    output = SdrayConfig().output
    assert output.rows_per_shard == "auto"
    sizes = [(512, 512), (1024, 1024), (2048, 2048), (64, 64), (None, None)]
    assert [output.shard_rows(w, h) for w, h in sizes] == [341, 85, 21, 1000, 1000]
    assert output.shard_rows(512, 512, batch_size=8) == 336  # whole batches: 42 of 8
    assert output.shard_rows(2048, 2048, batch_size=32) == 32  # at least one batch
    assert OutputConfig(rows_per_shard=7).shard_rows(1024, 1024, batch_size=4) == 7
    with pytest.raises(ValueError, match="one image's pixels would exceed 2 GiB"):
        GenerationConfig(max_width=30000, max_height=30000)


def test_the_end_of_run_check_removes_a_shard_committed_in_the_lease_window(tmp_path):
    """A run that lost the lease commits between its last lease check and its write: the run
    that holds the output finds the shard at its end (neither listed at its start nor its
    own), removes it with its images, and fails saying what to do."""
    from types import SimpleNamespace

    from sdray.batch.job import _refuse_foreign_shards
    from sdray.errors import SdrayError

    ours, zombie = "part-000000000000-0000000-aaaaaaaa", "part-000000000000-0000001-bbbbbbbb"
    stats = sink(tmp_path, "files", run="now").write(
        [call_row(ours, 0, 1, 3, 0, encoded_rows(3))], None
    )
    sink(tmp_path, "files", run="zombie", fingerprint="f0").write(
        [call_row(zombie, 0, 1, 3, 0, encoded_rows(3))], None
    )
    plan = SimpleNamespace(committed_paths=[])
    this_run = SimpleNamespace(stats=stats, fingerprint="f1", run="now")
    with pytest.raises(SdrayError, match=r"1 shards of .* were committed during this run by a run"):
        _refuse_foreign_shards(LocalFileSystem(), str(tmp_path), plan, this_run, "out", 0)
    left = files(tmp_path)
    assert [f for f in left if f.startswith("metadata/")] == [f"metadata/{ours}.parquet"]
    assert all(zombie not in f for f in left) and any(ours in f for f in left if "images/" in f)
    # Once removed, the check passes (a --resume regenerates the zombie's rows).
    _refuse_foreign_shards(LocalFileSystem(), str(tmp_path), plan, this_run, "out", 0)


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_a_retried_task_puts_together_the_unit_its_dead_first_attempt_staged_last(
    tmp_path, monkeypatch, fmt
):
    """The task that staged a unit's last piece dies before its commit (a lost node, a failed
    upload): Ray retries it, the retry finds its piece written already, and still puts the
    unit together, so no unit is left staged and never committed."""
    calls = calls_of(encoded_rows(4), [(0, 2), (2, 4)])
    assert sink(tmp_path, fmt).write([calls[0]], None).get("shards") is None
    real = ImageDatasink._assemble

    def dies(*args, **kwargs):
        raise OSError("the node went away")

    monkeypatch.setattr(ImageDatasink, "_assemble", dies)
    with pytest.raises(OSError):
        sink(tmp_path, fmt).write([calls[1]], None)
    assert not (tmp_path / "metadata").exists()
    monkeypatch.setattr(ImageDatasink, "_assemble", real)
    retried = sink(tmp_path, fmt).write([calls[1]], None)
    assert (retried["shards"], retried["rows"]) == (1, 4)
    shard = pq.read_table(tmp_path / "metadata" / f"{UNIT}.parquet")
    assert shard.column("id").to_pylist() == ["k0", "k1", "k2", "k3"]
    clean_staging(LocalFileSystem(), str(tmp_path), "run1")
    used = {p.split("#")[0] for p in shard.column("image_path").to_pylist() if p}
    assert {f for f in files(tmp_path) if f.startswith("images/")} == used
