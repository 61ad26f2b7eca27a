"""Object storage and output formats against a real S3 API server on loopback."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.images import read_infotext
from sdray.models import resolve_model

from .cli import read_metadata, run_cli
from .s3 import CREDENTIALS, FlakyProxy, MotoServer

pytestmark = pytest.mark.integration

BUCKET = "sdray-test"
FAST = [
    "--no-progress",
    "--set",
    "generation.steps=2",
    "--set",
    "generation.width=64",
    "--set",
    "generation.height=64",
    "--set",
    "batch.min_actors=2",
    "--set",
    "batch.max_actors=2",
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3fs_client(s3):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": s3.endpoint},
        use_listings_cache=False,
    )
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def s3_env(sdray_env, s3):
    return {**sdray_env, **CREDENTIALS, "AWS_ENDPOINT_URL": s3.endpoint}


def prompts_table(n: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"p{i}" for i in range(n)],
            "prompt": [f"a lighthouse, variation {i}" for i in range(n)],
            "scheduler": ["ddim" if i % 2 else "euler" for i in range(n)],
            "negative_prompt": ["blurry" if i % 3 == 0 else None for i in range(n)],
            "tag": [f"t{i}" for i in range(n)],
        }
    )


def put_table(fs, path: str, table: pa.Table) -> None:
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle)


def s3_metadata(fs, prefix: str) -> list[dict]:
    return read_metadata(prefix, filesystem=fs)


def test_s3_round_trip_with_model_from_bucket(s3, s3fs_client, s3_env, model_cache):
    fs = s3fs_client
    fs.put(str(resolve_model("tiny").directory) + "/", f"{BUCKET}/models/tiny/", recursive=True)
    put_table(fs, f"{BUCKET}/prompts/a.parquet", prompts_table(6))
    result = run_cli(
        [
            "generate",
            "--input",
            f"s3://{BUCKET}/prompts/",
            "--output",
            f"s3://{BUCKET}/out-files",
            "--set",
            f"model.source=s3://{BUCKET}/models/tiny/",
            *FAST,
        ],
        s3_env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = s3_metadata(fs, f"{BUCKET}/out-files")
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    for row in rows:
        assert row["status"] == "ok" and row["model"] == f"s3://{BUCKET}/models/tiny"
        data = fs.cat(f"{BUCKET}/out-files/{row['image_path']}")

        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    manifest = json.loads(fs.cat(f"{BUCKET}/out-files/manifest.json"))
    assert manifest["model"]["source"] == f"s3://{BUCKET}/models/tiny/"
    assert manifest["counts"]["ok"] == 6
    # Two actors on this node, one download: the weights were fetched exactly once.
    assert s3.requests("GET", "models/tiny/unet/diffusion_pytorch_model.safetensors") == 1
    cached = list((model_cache / "remote").iterdir())
    assert len([p for p in cached if p.is_dir()]) == 1
    assert not any(p.name.endswith(".partial") for p in cached)


def test_webdataset_shards_with_partitions_on_s3(s3fs_client, s3_env, tmp_path):
    import webdataset as wds

    fs = s3fs_client
    put_table(fs, f"{BUCKET}/prompts-wds/a.parquet", prompts_table(7))
    result = run_cli(
        [
            "generate",
            "--input",
            f"s3://{BUCKET}/prompts-wds/a.parquet",
            "--output",
            f"s3://{BUCKET}/out-wds",
            *FAST,
            "--set",
            "output.format=webdataset",
            "--set",
            "output.rows_per_shard=2",
            "--set",
            "output.partition_by=[scheduler]",
            "--set",
            "output.image_format=webp",
        ],
        s3_env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = s3_metadata(fs, f"{BUCKET}/out-wds")
    assert len(rows) == 7 and {r["scheduler"] for r in rows} == {"ddim", "euler"}
    tars = fs.find(f"{BUCKET}/out-wds/images")
    assert tars and all(t.endswith(".tar") for t in tars)
    assert {t.split("/")[3] for t in tars} == {"scheduler=ddim", "scheduler=euler"}
    metadata_files = fs.find(f"{BUCKET}/out-wds/metadata")
    assert {m.split("/")[3] for m in metadata_files} == {"scheduler=ddim", "scheduler=euler"}

    # Read the shards back with the webdataset library itself, from local copies.
    local = tmp_path / "shards"
    local.mkdir()
    paths = []
    for i, tar in enumerate(tars):
        paths.append(str(local / f"{i}.tar"))
        fs.get(tar, paths[-1])
    samples = {s["__key__"]: s for s in wds.WebDataset(paths, shardshuffle=False)}
    by_sha = {r["sha256"]: r for r in rows}
    assert len(samples) == 7
    for sample in samples.values():
        meta = json.loads(sample["json"])

        assert hashlib.sha256(sample["webp"]).hexdigest() in by_sha
        assert meta["prompt"] in read_infotext(sample["webp"])
        assert Image.open(io.BytesIO(sample["webp"])).format == "WEBP"


def test_transient_storage_errors_are_retried(s3, s3fs_client, s3_env):
    proxy = FlakyProxy(s3.port, every=3)
    try:
        fs = s3fs_client
        put_table(fs, f"{BUCKET}/prompts-flaky/a.parquet", prompts_table(6))
        env = {**s3_env, "AWS_ENDPOINT_URL": proxy.endpoint}
        result = run_cli(
            [
                "generate",
                "--input",
                f"s3://{BUCKET}/prompts-flaky/",
                "--output",
                f"s3://{BUCKET}/out-flaky",
                *FAST,
                "--set",
                "output.rows_per_shard=2",
            ],
            env,
        )
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr[-4000:]
    assert proxy.failed >= 3
    rows = s3_metadata(fs, f"{BUCKET}/out-flaky")
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    for row in rows:
        assert fs.exists(f"{BUCKET}/out-flaky/{row['image_path']}")


def test_parquet_format_locally(tmp_path, sdray_env):
    source = tmp_path / "p.parquet"
    pq.write_table(prompts_table(5), source)
    output = tmp_path / "out"
    result = run_cli(
        [
            "generate",
            "--input",
            str(source),
            "--output",
            str(output),
            *FAST,
            "--set",
            "output.format=parquet",
            "--set",
            "output.image_format=jpeg",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {r["id"]: r for r in pq.read_table(output / "metadata").to_pylist()}
    images = pq.read_table(output / "images").to_pylist()
    assert len(images) == 5

    for image in images:
        row = rows[image["id"]]
        assert hashlib.sha256(image["image"]).hexdigest() == row["sha256"]
        assert row["image_path"].endswith("#" + image["key"])
        assert Image.open(io.BytesIO(image["image"])).format == "JPEG"
        assert "Steps: 2" in read_infotext(image["image"])


def test_credentials_from_config_storage_options(s3, s3fs_client, sdray_env, tmp_path):
    """No AWS variables anywhere: the endpoint and keys come from storage.storage_options."""
    fs = s3fs_client
    put_table(fs, f"{BUCKET}/prompts-opts/a.parquet", prompts_table(3))
    config = tmp_path / "s3.yaml"
    config.write_text(
        "storage:\n"
        "  storage_options:\n"
        f"    key: {CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
        f"    secret: {CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n"
        f"    endpoint_url: {s3.endpoint}\n"
        "    client_kwargs: {region_name: us-east-1}\n"
    )
    env = {k: v for k, v in sdray_env.items() if not k.startswith("AWS_")}
    result = run_cli(
        [
            "generate",
            "--input",
            f"s3://{BUCKET}/prompts-opts/",
            "--output",
            f"s3://{BUCKET}/out-opts",
            "--config",
            str(config),
            *FAST,
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = s3_metadata(fs, f"{BUCKET}/out-opts")
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2"]
    assert all(fs.exists(f"{BUCKET}/out-opts/{r['image_path']}") for r in rows)
    # The manifest records the config with every storage option redacted.
    manifest = json.loads(fs.cat(f"{BUCKET}/out-opts/manifest.json"))
    options = manifest["config"]["storage"]["storage_options"]
    assert set(options) == {"key", "secret", "endpoint_url", "client_kwargs"}
    assert set(options.values()) == {"***"}


def test_resume_on_s3_removes_what_was_never_committed(s3fs_client, s3_env):
    """An interrupted run on a bucket: a shard whose metadata never landed is redone, and its
    images (and any other uncommitted image shard) are gone after the resume."""
    fs = s3fs_client
    put_table(fs, f"{BUCKET}/prompts-resume/a.parquet", prompts_table(6))
    args = [
        "generate",
        "--input",
        f"s3://{BUCKET}/prompts-resume/",
        "--output",
        f"s3://{BUCKET}/out-resume",
        *FAST,
        "--set",
        "output.rows_per_shard=2",
    ]
    first = run_cli(args, s3_env)
    assert first.returncode == 0, first.stderr[-4000:]
    shards = sorted(fs.find(f"{BUCKET}/out-resume/metadata"))
    assert len(shards) == 3
    fs.rm(shards[0])  # as if the run died between this shard's images and its metadata
    fs.pipe(f"{BUCKET}/out-resume/images/part-deadbeef-00000-0000/0123.png", b"orphan")

    resumed = run_cli([*args, "--resume"], s3_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    fs.invalidate_cache()
    rows = s3_metadata(fs, f"{BUCKET}/out-resume")
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    manifest = json.loads(fs.cat(f"{BUCKET}/out-resume/manifest.json"))
    assert manifest["counts"]["generated_this_run"] == 2
    stored = {
        p.removeprefix(f"{BUCKET}/out-resume/") for p in fs.find(f"{BUCKET}/out-resume/images")
    }
    assert stored == {r["image_path"] for r in rows}
    for row in rows:
        assert (
            hashlib.sha256(fs.cat(f"{BUCKET}/out-resume/{row['image_path']}")).hexdigest()
            == (row["sha256"])
        )


def test_an_output_in_use_by_a_live_run_is_refused(s3fs_client, s3_env):
    """A run on another host that keeps renewing its lease holds the output."""
    import threading
    import time

    from sdray.batch import lease

    prefix = f"{BUCKET}/in-use"
    put_table(s3fs_client, f"{prefix}/prompts.parquet", prompts_table(2))
    lease_path = f"{prefix}/out/{lease.LEASE}"
    stop = threading.Event()

    def hold():  # the other run's heartbeat
        while True:
            held = {"run": "r1", "command": "generate", "host": "elsewhere", "pid": 7}
            s3fs_client.pipe_file(
                lease_path, json.dumps({**held, "heartbeat": time.time()}).encode()
            )
            if stop.wait(1.0):
                return

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        args = ["generate", "--input", f"s3://{prefix}/prompts.parquet"]
        result = run_cli([*args, "--output", f"s3://{prefix}/out", "--resume", *FAST], s3_env)
    finally:
        stop.set()
        holder.join(timeout=30)
    assert result.returncode == 2, result.stderr
    assert "is in use by another sdray run r1" in result.stderr
    assert "host elsewhere" in result.stderr
    assert s3fs_client.ls(f"{prefix}/out", detail=False) == [lease_path]
    # Every change to the lease is a conditional request: of two runs racing, one loses.
    store = lease._LeaseStore(s3fs_client, lease_path)
    record, version = store.read()
    assert record["run"] == "r1"
    with pytest.raises(FileExistsError):
        store.create({"run": "r2"})
    store.replace({"run": "r2"}, version)
    with pytest.raises(lease.LeaseLost):
        store.replace({"run": "r3"}, version)
    store.delete(version)  # a stale version deletes nothing
    assert store.read()[0] == {"run": "r2"}
    with pytest.raises(FileNotFoundError):  # a real S3 error is itself, not a lost race
        lease._LeaseStore(s3fs_client, f"no-such-bucket-0/{lease.LEASE}").create({"run": "r4"})


def test_partition_columns_read_back_with_their_types(tmp_path, sdray_env):
    from sdray.batch import read_metadata

    source = tmp_path / "p.csv"
    source.write_text(
        "id,prompt,seed,zip\na,a fox,9007199254740993,042\nb,a cat,5,042\nc,a dog,5,\n"
    )
    output = tmp_path / "out"
    result = run_cli(
        ["generate", "--input", str(source), "--output", str(output), *FAST]
        + ["--set", "output.partition_by=[seed, zip]"],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["partitioning"]["columns"] == [
        {"name": "seed", "type": "int64"},
        {"name": "zip", "type": "string"},
    ]
    table = read_metadata(str(output))
    assert table.schema.field("seed").type == pa.int64()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["a"]["seed"] == 9007199254740993 and rows["a"]["zip"] == "042"
    assert rows["c"]["zip"] is None and {r["status"] for r in rows.values()} == {"ok"}


def test_init_images_are_read_from_the_bucket(s3fs_client, s3_env, tmp_path):
    """Image-to-image rows whose pictures live in S3: relative to the table there, and by URI."""
    from pathlib import Path

    fs = s3fs_client
    pictures = Path(__file__).resolve().parents[2] / "configs" / "examples" / "pictures"
    for name in ("red-circle.png", "mask-right-half.png"):
        fs.pipe(f"{BUCKET}/i2i/pictures/{name}", (pictures / name).read_bytes())
    table = pa.table(
        {
            "id": ["relative", "absolute", "missing"],
            "prompt": ["a blue square"] * 3,
            "init_image": [
                "pictures/red-circle.png",
                f"s3://{BUCKET}/i2i/pictures/red-circle.png",
                "pictures/gone.png",
            ],
            "mask_image": [None, f"s3://{BUCKET}/i2i/pictures/mask-right-half.png", None],
            "width": [64] * 3,
            "height": [64] * 3,
            "steps": [2] * 3,
        }
    )
    put_table(fs, f"{BUCKET}/i2i/rows.parquet", table)
    output = tmp_path / "out"
    result = run_cli(
        ["generate", "--input", f"s3://{BUCKET}/i2i/rows.parquet", "--output", str(output)],
        s3_env,
    )
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in read_metadata(output)}
    digest = hashlib.sha256((pictures / "red-circle.png").read_bytes()).hexdigest()
    assert rows["relative"]["status"] == "ok" and rows["relative"]["mode"] == "img2img"
    assert rows["absolute"]["status"] == "ok" and rows["absolute"]["mode"] == "inpaint"
    assert rows["relative"]["init_sha256"] == rows["absolute"]["init_sha256"] == digest
    assert "init_image='pictures/gone.png': no such file" in rows["missing"]["error"]


def test_create_if_absent_is_probed_on_s3(s3, s3fs_client):
    """The probe a run makes at its start: a store that honours conditional PUTs passes; one
    that ignores `If-None-Match` (as some S3-compatible servers do; here the client drops the
    header) is named, so the run warns that two attempts could both commit a shard."""
    import s3fs

    from sdray.storage import create_is_atomic

    assert create_is_atomic(s3fs_client, f"{BUCKET}/probed") is None
    ignoring = s3fs.S3FileSystem(
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": s3.endpoint},
        skip_instance_cache=True,
    )
    ignoring.connect()

    def drop_condition(params, **kwargs):
        params.pop("IfNoneMatch", None)

    ignoring.s3.meta.events.register("before-parameter-build.s3.PutObject", drop_condition)
    assert "ignores If-None-Match" in create_is_atomic(ignoring, f"{BUCKET}/probed")
    assert s3fs_client.find(f"{BUCKET}/probed") == []  # the probes leave nothing behind
