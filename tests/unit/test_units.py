"""Units, id claims and commits without a cluster: what makes the offline job a stream that
writes every row once."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray.batch.ids import ClaimStore, digests
from sdray.batch.read import inspect_prompt_files, list_prompt_files
from sdray.batch.units import (
    InputChanged,
    PrepareUnits,
    parse_unit_name,
    plan_read_tasks,
    read_units,
    unpack,
)
from sdray.config import GenerationConfig


def _parquet(path, start: int, rows: int, row_group_size: int = 4) -> None:
    table = pa.table({"id": [f"r{i}" for i in range(start, start + rows)], "prompt": ["p"] * rows})
    pq.write_table(table, path, row_group_size=row_group_size)


def _planned(root, rows_per_unit: int):
    files = list_prompt_files(str(root))
    for index, file in enumerate(files):
        file["index"] = index
    text, expected, _ = inspect_prompt_files(files)
    return plan_read_tasks(files, rows_per_unit), text, expected


def _read_all(root, rows_per_unit: int) -> list[tuple[str, int, list[str]]]:
    tasks, text, expected = _planned(root, rows_per_unit)
    return [
        (task["group"], index, table.column("id").to_pylist())
        for task in tasks
        for index, table in read_units(task, rows_per_unit, text, expected)
    ]


def test_units_span_parquet_files_and_each_stripe_reads_only_its_rows(tmp_path, monkeypatch):
    from sdray.batch import units

    monkeypatch.setattr(units, "READ_TASK_ROWS", 6)  # stripes of 2 units of 3 rows
    _parquet(tmp_path / "a.parquet", 0, 5)
    _parquet(tmp_path / "b.parquet", 5, 5)
    tasks, _, _ = _planned(tmp_path, 3)
    assert [(t["first_unit"], t["units"]) for t in tasks] == [(0, 2), (2, 2)]
    assert [(f["source"], f["start"], f["stop"]) for f in tasks[1]["files"]] == [
        ("b.parquet", 1, 5)
    ]
    units = _read_all(tmp_path, 3)
    assert [(i, ids) for _, i, ids in units] == [
        (0, ["r0", "r1", "r2"]),
        (1, ["r3", "r4", "r5"]),  # across the two files
        (2, ["r6", "r7", "r8"]),
        (3, ["r9"]),  # only the table's last unit is short
    ]
    assert len({group for group, _, _ in units}) == 1


def test_text_files_are_read_whole_and_grouped_by_size(tmp_path, monkeypatch):
    from sdray.batch import units

    (tmp_path / "a.csv").write_text("id,prompt\na0,x\na1,x\n")
    (tmp_path / "b.jsonl").write_text(
        '{"id": "b0", "prompt": "y"}\n\n{"id": "b1", "prompt": "y"}\n'
    )
    _parquet(tmp_path / "c.parquet", 0, 2)
    (tmp_path / "d.csv").write_text("id,prompt\nd0,z\n")
    assert [ids for _, _, ids in _read_all(tmp_path, 3)] == [
        ["a0", "a1", "b0"],  # consecutive text files: one group, one task
        ["b1"],
        ["r0", "r1"],
        ["d0"],
    ]
    monkeypatch.setattr(units, "TEXT_GROUP_BYTES", 10)
    tasks, _, _ = _planned(tmp_path, 3)
    assert [[f["source"] for f in t["files"]] for t in tasks] == [
        ["a.csv"],
        ["b.jsonl"],
        ["c.parquet"],
        ["d.csv"],
    ]


def test_a_unit_name_says_which_rows_it_holds(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\na,x\nb,y\n")
    tasks, text, expected = _planned(tmp_path, 10)
    prepare = PrepareUnits(
        GenerationConfig(width=64, height=64),
        rows_per_unit=10,
        text_columns=text,
        expected=expected,
        partition_by=[],
        order_by=[],
    )
    batch = pa.table({"task": [json.dumps(tasks[0])]})
    (row,) = [r for t in prepare(batch) for r in t.to_pylist()]
    group, index, digest = parse_unit_name(row["unit"])
    assert (index, row["rows"], row["done"]) == (0, 2, 0)
    assert unpack(row["table"]).column("id").to_pylist() == ["a", "b"]
    # Resuming: a committed unit is skipped, and only if the input still holds its rows.
    tasks[0]["committed"] = {"0": {"digest": digest, "pieces": [""]}}
    (done,) = [
        r for t in prepare(pa.table({"task": [json.dumps(tasks[0])]})) for r in t.to_pylist()
    ]
    assert (done["rows"], done["done"], done["table"]) == (2, 2, None)
    (tmp_path / "p.csv").write_text("id,prompt\na,x\nc,y\n")
    with pytest.raises(InputChanged, match="the input changed since the run began"):
        list(prepare(pa.table({"task": [json.dumps(tasks[0])]})))


def test_a_1024_unit_of_700_rows_travels_in_calls_under_arrows_limits(tmp_path):
    """The failure this replaces: a unit of 700 rows at 1024x1024 went through the model actor
    as one call whose pixels (2.2 GB) overflowed an Arrow binary array. Its calls hold 64 MiB
    of pixels at most, each one block, and their sum is the unit."""
    from sdray.batch.stages import pixel_array

    (tmp_path / "p.csv").write_text("id,prompt\n" + "".join(f"r{i},x\n" for i in range(700)))
    (task,), text, expected = _planned(tmp_path, 700)
    prepare = PrepareUnits(
        GenerationConfig(width=1024, height=1024),
        rows_per_unit=700,
        text_columns=text,
        expected=expected,
        partition_by=[],
        order_by=[],
        rows_per_call=64,
        max_call_bytes=64 << 20,
    )
    calls = [row for t in prepare(pa.table({"task": [json.dumps(task)]})) for row in t.to_pylist()]
    assert len(calls) == 34 and {c["calls"] for c in calls} == {34}
    assert [c["call"] for c in calls] == list(range(34))
    assert [(c["rows"], c["done"]) for c in calls[:2]] == [(700, 0), (0, 0)]  # counts once
    sizes = [unpack(c["table"]).num_rows for c in calls]
    assert sum(sizes) == 700 and max(sizes) == 21  # 21 x 3 MiB = 63 MiB
    # What one call hands on: 21 images of 1024x1024 in one column, far from 2 GiB.
    images = [np.full((1024, 1024, 3), i, np.uint8) for i in range(21)]
    column = pixel_array([*images, None])
    assert column.type == pa.large_binary() and column.null_count == 1
    assert column[20].as_py() == bytes([20]) * (1024 * 1024 * 3)


def test_a_resumed_unit_redoes_only_its_uncommitted_partitions_and_claims_their_ids(tmp_path):
    """A unit whose `lang=en` shard an earlier run committed: only its `fr` rows are redone, they
    claim their ids as the rows at their places in the input, and a row whose id another row
    keeps becomes an error row naming it."""
    from sdray.batch.ids import FILE_SHIFT

    (tmp_path / "a.csv").write_text("id,prompt,lang\nz,q,fr\n")
    (tmp_path / "p.csv").write_text("id,prompt,lang\na,x,en\nb,y,fr\nc,z,en\nd,w,fr\n")
    (task,), text, expected = _planned(tmp_path, 10)  # one unit: both files' rows

    class Registry:  # stands in for the registry actors: "d" is kept by another row
        def __init__(self) -> None:
            self.claims: list = []

        def claim(self, ids, owners):
            self.claims.append((list(ids), owners.tolist()))
            return {i: "a.csv:0" for i, x in enumerate(ids) if x == "d"}

    def units(spec, registry=None):
        prepare = PrepareUnits(
            GenerationConfig(width=64, height=64),
            rows_per_unit=10,
            text_columns=text,
            expected=expected,
            partition_by=["lang"],
            order_by=[],
            registry=registry,
        )
        batch = pa.table({"task": [json.dumps(spec)]})
        return [r for t in prepare(batch) for r in t.to_pylist()]

    (first,) = units(task)
    digest = parse_unit_name(first["unit"])[2]
    task["committed"] = {"0": {"digest": digest, "pieces": ["lang=en/"]}}
    registry = Registry()
    (row,) = units(task, registry)
    assert (row["rows"], row["done"]) == (5, 2)
    redone = unpack(row["table"])
    assert redone.column("lang").to_pylist() == ["fr", "fr", "fr"]
    p = 1 << FILE_SHIFT  # p.csv is the input's second file; rows count from 0 in each file
    assert registry.claims == [(["z", "b", "d"], [0, p | 1, p | 3])]
    assert redone.column("id").to_pylist() == ["z", "b", None]
    assert redone.column("status").to_pylist() == ["ok", "ok", "error"]
    assert "id='d': also the id of a.csv:0" in redone.column("error")[2].as_py()


def test_the_first_claim_of_an_id_wins_and_claims_repeat_safely():
    store = ClaimStore()

    def claim(ids, owners):
        return store.claim(*digests(ids), np.array(owners)).tolist()

    assert claim(["a", "b", "a"], [5, 6, 2]) == [2, 6, 2]  # the smallest claimant
    assert claim(["a"], [5]) == [2]  # a later row loses
    assert claim(["a"], [2]) == [2]  # a retried task still wins
    rng = np.random.default_rng(0)
    owners: dict[int, int] = {}
    for start in range(0, 20_000, 1000):  # many batches: sorted runs merge as they grow
        ids = rng.integers(0, 5000, 1000)
        positions = np.arange(start, start + 1000)
        won = claim([f"x{i}" for i in ids], positions)
        for i, p, w in zip(ids.tolist(), positions.tolist(), won, strict=True):
            assert w == owners.setdefault(i, p)
    assert len(store) == 2 + len(owners) and len(store.runs) <= 15


def test_digests_equal_in_one_half_are_still_different_ids():
    store = ClaimStore()
    hi = np.array([7, 7, 7, 8], np.uint64)
    lo = np.array([1, 2, 1, 1], np.uint64)
    assert store.claim(hi, lo, np.array([10, 11, 12, 13])).tolist() == [10, 11, 10, 13]
    assert store.claim(hi[1:2], np.array([3], np.uint64), np.array([14])).tolist() == [14]
    assert store.owners(hi, lo).tolist() == [10, 11, 10, 13]


def _generated_unit(name: str, n: int = 3) -> pa.Table:
    """A unit as the encode stage hands it to the sink: rows with their encoded images."""
    from sdray.batch.stages import IMAGE_COLUMN
    from sdray.batch.units import unit_row
    from sdray.requests import prepare_table

    rows = prepare_table(
        pa.table({"id": [f"k{i}" for i in range(n)], "prompt": ["p"] * n}),
        GenerationConfig(width=64, height=64),
    )
    rows = rows.append_column("model", pa.array(["tiny"] * n))
    rows = rows.append_column("truncated", pa.array([False] * n))
    rows = rows.append_column(IMAGE_COLUMN, pa.array([b"png-%d" % i for i in range(n)]))
    rows = rows.append_column("sha256", pa.array(["x"] * n))
    return unit_row(name, n, 0, rows)


def _sink(output, run_id: str, lease_run: str | None = None, fmt: str = "webdataset"):
    from sdray.batch.sink import ImageDatasink

    return ImageDatasink(
        str(output),
        output_format=fmt,
        image_format="png",
        partition_by=[],
        run_id=run_id,
        lease_run=lease_run,
    )


UNIT = "part-0123456789ab-0000004-deadbeef"


def files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_model_actors_latest_running_totals_reach_the_sink_with_its_units(tmp_path):
    """Each generated unit carries a copy of its actor's running totals; the sink keeps each
    actor's latest, whatever order the units are written in."""
    from sdray.batch.units import UnitStage

    class Counting:  # a stage that keeps running totals, as GenerateStage does
        figures = {"actor_id": "a1", "node_id": "n1", "host": "h", "pid": 1}
        figures.update(images=0, errors=0, busy_s=0.0)

        def __call__(self, rows: pa.Table) -> pa.Table:
            self.figures["images"] += rows.num_rows
            self.figures["busy_s"] += 0.5
            return rows

    stage = UnitStage(Counting, rows_per_call=2)
    first = stage(_generated_unit("part-0123456789ab-0000001-deadbeef", n=3))
    second = stage(_generated_unit("part-0123456789ab-0000002-deadbeef", n=2))
    sink = _sink(tmp_path, "run1", fmt="parquet")

    class Written:
        write_returns = [sink.write([unit], None) for unit in (second, first)]

    sink.on_write_complete(Written())
    assert sink.stats["actors"] == {
        "a1": {"actor_id": "a1", "node_id": "n1", "host": "h", "pid": 1, "images": 5}
        | {"errors": 0, "busy_s": 1.5}
    }


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_a_shard_is_committed_once_however_often_it_is_written(tmp_path, fmt):
    """A write task retried after its node was lost (it had committed), or a run resumed over
    it: the same unit is written again, and its shard is not."""
    first = _sink(tmp_path, "run1", fmt=fmt).write([_generated_unit(UNIT)], None)
    assert (first["shards"], first["rows"], first["ok"]) == (1, 3, 3)
    before = files(tmp_path)
    again = _sink(tmp_path, "run2", fmt=fmt).write([_generated_unit(UNIT)], None)
    assert again == {**again, "committed_elsewhere": 3} and "shards" not in again
    assert files(tmp_path) == before
    assert pq.read_table(tmp_path / "metadata" / f"{UNIT}.parquet").num_rows == 3


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_an_attempt_that_loses_the_commit_removes_only_its_own_images(tmp_path, monkeypatch, fmt):
    """Two attempts of one write task of one run (a retried task whose first attempt still
    lives on a partitioned node): the second writes its images, the first commits meanwhile;
    the second removes its own images and leaves every image the commit points to."""
    from sdray.batch import sink

    real, checks = sink.check_held, []

    def first_attempt_commits_meanwhile(fs, root, run):
        checks.append(run)
        if len(checks) == 2:  # the second attempt's check just before its commit
            monkeypatch.setattr(sink, "check_held", real)
            first = _sink(tmp_path, "run1", fmt=fmt).write([_generated_unit(UNIT)], None)
            assert first["shards"] == 1

    monkeypatch.setattr(sink, "check_held", first_attempt_commits_meanwhile)
    second = _sink(tmp_path, "run1", fmt=fmt).write([_generated_unit(UNIT)], None)
    assert second["committed_elsewhere"] == 3 and "shards" not in second
    paths = pq.read_table(tmp_path / "metadata" / f"{UNIT}.parquet").column("image_path")
    stored = {p.split("#")[0] for p in paths.to_pylist()}
    assert all((tmp_path / p).is_file() for p in stored)
    images = [f for f in files(tmp_path) if f.startswith("images/")]
    assert set(images) == stored  # the winner's images, and nothing else


def test_a_run_that_lost_the_lease_commits_nothing(tmp_path):
    from sdray.batch.lease import LEASE, LeaseLost

    (tmp_path / LEASE).write_text(json.dumps({"run": "newer", "host": "elsewhere", "pid": 7}))
    with pytest.raises(LeaseLost, match="run older no longer holds the output's lease"):
        _sink(tmp_path, "run1", lease_run="older").write([_generated_unit(UNIT)], None)
    assert files(tmp_path) == [LEASE]
    held = _sink(tmp_path, "run2", lease_run="newer").write([_generated_unit(UNIT)], None)
    assert held["shards"] == 1


def test_a_write_task_encodes_a_unit_and_writes_one_shard_per_partition_in_its_order(tmp_path):
    """The sink encodes a generated unit's raw pixels itself (the encode stage runs in the
    write task) and splits a unit that spans partitions into one shard each, rows in order."""
    import io

    from PIL import Image

    from sdray.batch.sink import ImageDatasink
    from sdray.batch.stages import PIXELS_COLUMN, EncodeStage
    from sdray.batch.units import unit_row
    from sdray.config import OutputConfig
    from sdray.requests import prepare_table

    langs = ["en", "fr", "en", "fr", "en"]
    rows = prepare_table(
        pa.table({"id": [f"k{i}" for i in range(5)], "prompt": ["p"] * 5, "lang": langs}),
        GenerationConfig(width=8, height=8),
    )
    pixels = [bytes([10 * i]) * (8 * 8 * 3) for i in range(5)]  # row i: one flat grey
    rows = rows.append_column("model", pa.array(["tiny"] * 5))
    rows = rows.append_column("truncated", pa.array([False] * 5))
    rows = rows.append_column(PIXELS_COLUMN, pa.array(pixels, pa.binary()))
    sink = ImageDatasink(
        str(tmp_path),
        output_format="files",
        image_format="png",
        partition_by=["lang"],
        run_id="run1",
        lease_run=None,
        encode=EncodeStage(OutputConfig()),
    )
    stats = sink.write([unit_row(UNIT, 5, 0, rows)], None)
    assert (stats["shards"], stats["rows"], stats["ok"]) == (2, 5, 5)
    for lang, expected in (("en", [0, 2, 4]), ("fr", [1, 3])):
        shard = pq.read_table(tmp_path / "metadata" / f"lang={lang}" / f"{UNIT}.parquet")
        assert shard.column("id").to_pylist() == [f"k{i}" for i in expected]
        for i, path in zip(expected, shard.column("image_path").to_pylist(), strict=True):
            image = Image.open(io.BytesIO((tmp_path / path).read_bytes()))
            assert image.format == "PNG" and image.getpixel((3, 3)) == (10 * i,) * 3


def test_an_id_registry_actor_imports_the_registry_alone():
    """A registry actor loads `sdray.batch.ids`; the package's names load on first use, so that
    import leaves Ray Data and the job unloaded, and the package's names still resolve."""
    import subprocess
    import sys

    probe = (
        "import sys, sdray.batch.ids\n"
        "print(sorted(m for m in ('ray.data', 'sdray.batch.job', 'sdray.batch.sink') "
        "if m in sys.modules))\n"
        "from sdray.batch import read_metadata, run_generate\n"
        "print(run_generate.__module__, read_metadata.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out == ["[]", "sdray.batch.job sdray.batch.sink"]
