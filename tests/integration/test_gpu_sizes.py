"""The batch path at GPU sizes: 1024x1024 shards holding more than Arrow's 2 GiB, and 2048x2048
outputs through every format, on the real pipeline with a stand-in device (real-size pixels)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.batch import read_metadata, run_generate
from sdray.config import config_from_dict
from sdray.tools.bench_device import DeviceShape, stand_in_stage

pytestmark = pytest.mark.integration


def job(size: int, rows_per_shard: int | str, overrides: dict | None = None):
    settings = {
        "model": {"source": "tiny"},
        "generation": {"width": size, "height": size, "steps": 1},
        "batch": {"batch_size": 4, "min_actors": 2, "max_actors": 2, "num_cpus_per_actor": 0.25},
        "output": {"rows_per_shard": rows_per_shard, "image_format": "jpeg"},
    }
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        settings[section][name] = value
    return config_from_dict(settings)


def prompts(path, rows: int) -> str:
    ids = [f"r{i:04d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"p {i}" for i in range(rows)]}), path)
    return str(path)


def stored_images(output, metadata: pa.Table) -> dict[str, bytes]:
    """Each ok row's stored image bytes, by id, read back through its `image_path` (each
    container read once)."""
    members: dict[str, dict[str, str]] = {}  # container -> member -> id
    out = {}
    for row in metadata.filter(pa.compute.equal(metadata["status"], "ok")).to_pylist():
        container, _, member = row["image_path"].partition("#")
        if member:
            members.setdefault(container, {})[member] = row["id"]
        else:
            out[row["id"]] = (output / container).read_bytes()
    for container, ids in members.items():
        if container.endswith(".tar"):
            with tarfile.open(output / container) as tar:
                for info in tar:
                    if info.name in ids:
                        out[ids[info.name]] = tar.extractfile(info).read()
        else:
            table = pq.read_table(output / container, columns=["key", "image"]).to_pydict()
            for key, data in zip(table["key"], table["image"], strict=True):
                if key in ids:
                    out[ids[key]] = data
    return out


def test_a_1024_shard_of_more_than_2_gib_of_pixels_commits_once_in_bounded_memory(
    ray_cluster, tmp_path
):
    """720 rows of 1024x1024 in one webdataset shard: 2.26 GB of raw pixels, which as one model
    actor call overflowed Arrow's binary array (ArrowCapacityError) after generating the whole
    shard, as the old default of 1,000-row shards did at SDXL's size. In calls of at most 64 MiB
    the shard commits once, all its images in one tar, and each model actor's memory grows by
    a few calls' worth, not by the shard."""
    rows = 720
    config = job(1024, rows, {"output.format": "webdataset"})
    summary = run_generate(
        prompts(tmp_path / "p.parquet", rows),
        str(tmp_path / "out"),
        config,
        progress=False,
        generate_stage=stand_in_stage(DeviceShape("test", 1024, 4, 0.0)),
    )
    assert (summary.ok, summary.error, summary.shards) == (rows, 0, 1)
    assert rows * 1024 * 1024 * 3 > 2**31  # the shard's raw pixels: beyond one Arrow array
    metadata = read_metadata(str(tmp_path / "out"))
    assert sorted(metadata["id"].to_pylist()) == [f"r{i:04d}" for i in range(rows)]
    (tar,) = {p.split("#")[0] for p in metadata["image_path"].to_pylist()}
    with tarfile.open(tmp_path / "out" / tar) as archive:
        names = [m.name for m in archive if m.name.endswith(".jpg")]
    assert len(names) == rows  # one tar: the whole shard
    stored = stored_images(tmp_path / "out", metadata)
    assert len(stored) == rows
    digests = dict(zip(metadata["id"].to_pylist(), metadata["sha256"].to_pylist(), strict=True))
    assert all(hashlib.sha256(data).hexdigest() == digests[i] for i, data in stored.items())
    first = Image.open(io.BytesIO(stored["r0000"]))
    assert first.size == (1024, 1024)
    assert not (tmp_path / "out" / ".sdray-staging").exists()
    # Memory: two calls in flight per actor (48 MiB of pixels each, a few copies of each on
    # the way out), against the 2.26 GB the actor held and packed as one call before.
    actors = summary.manifest["actors"]
    assert len(actors) == 2 and sum(a["images"] for a in actors) == rows
    growth = [a["peak_mb"] - a["ready_mb"] for a in actors]
    print(f"model actors' private memory at peak over when ready: {growth} MB")
    assert max(growth) < 512, growth


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_2048_outputs_through_every_format(ray_cluster, tmp_path, fmt):
    """2048x2048 images (12 MiB of pixels each) in calls of two rows (the byte cap), shards of
    three: units put together from calls, every image stored whole where its metadata says."""
    config = job(
        2048,
        3,
        {"output.format": fmt, "batch.max_call_bytes": 26 * 2**20, "output.image_format": "png"}
        if fmt == "files"
        else {"output.format": fmt, "batch.max_call_bytes": 26 * 2**20},
    )
    summary = run_generate(
        prompts(tmp_path / "p.parquet", 5),
        str(tmp_path / "out"),
        config,
        progress=False,
        generate_stage=stand_in_stage(DeviceShape("test", 2048, 2, 0.0)),
    )
    assert (summary.ok, summary.shards) == (5, 2)
    metadata = read_metadata(str(tmp_path / "out"))
    stored = stored_images(tmp_path / "out", metadata)
    assert sorted(stored) == [f"r{i:04d}" for i in range(5)]
    digests = dict(zip(metadata["id"].to_pylist(), metadata["sha256"].to_pylist(), strict=True))
    for row_id, data in stored.items():
        assert hashlib.sha256(data).hexdigest() == digests[row_id]
        assert Image.open(io.BytesIO(data)).size == (2048, 2048)
    growth = [a["peak_mb"] - a["ready_mb"] for a in summary.manifest["actors"]]
    assert max(growth) < 512, growth


def test_the_device_bench_reports_each_actors_busy_fraction(ray_cluster, capsys):
    """`sdray bench --suite device` in small: two stand-in devices, 24 batches of device work;
    each actor's busy fractions, the job's rate against the devices', the first commit."""
    from sdray.tools.bench_device import run_device_bench

    figures = run_device_bench(DeviceShape("small", 64, 4, 0.2), device_seconds=4.8, actors=2)
    assert figures["rows"] == 96 and len(figures["per_actor"]) == 2
    assert sum(a["batches"] for a in figures["per_actor"].values()) == 24
    for busy in figures["per_actor"].values():
        assert 0 < busy["end_to_end"] < 1 and busy["busy_s"] > 0
    assert 0 < figures["end_to_end_ratio"] < 1
    assert figures["first_commit_s"] > figures["first_actor_ready_s"] > 0
    out = capsys.readouterr().out
    assert "device busy" in out and "the devices' own 40.000 images/s" in out
