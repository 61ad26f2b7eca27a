"""Job bookkeeping without a cluster: uncommitted shards, and the errors users see."""

from pathlib import Path

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from sdray.batch.job import _unwrap, actor_pool
from sdray.batch.sink import remove_uncommitted
from sdray.batch.stages import ErrorBudgetExceeded
from sdray.errors import ModelError, SdrayError


def touch(root: Path, *paths: str) -> None:
    for relative in paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def remaining(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# Shard names as units give them: part-<group>-<unit>-<digest>; images add the run that wrote them.
DONE, LOST = "part-g1-0000000-d0", "part-g1-0000001-d1"


def test_uncommitted_files_shards_are_removed(tmp_path):
    touch(
        tmp_path,
        f"metadata/{DONE}.parquet",
        f"metadata/.{LOST}.parquet.1f2e.tmp",  # a killed local write
        f"images/{DONE}-run1/k1.png",
        f"images/{LOST}-run1/k2.png",  # images written, metadata never committed
        f"images/{LOST}-run1/.k3.png.9a8b.tmp",
        "manifest.json",
    )
    removed = remove_uncommitted(LocalFileSystem(), str(tmp_path), 0, images="files")
    assert removed == 2
    assert remaining(tmp_path) == [
        f"images/{DONE}-run1/k1.png",
        "manifest.json",
        f"metadata/{DONE}.parquet",
    ]


@pytest.mark.parametrize("suffix", [".tar", ".parquet"])
def test_uncommitted_container_shards_are_removed_per_partition(tmp_path, suffix):
    touch(
        tmp_path,
        f"metadata/scheduler=ddim/{DONE}.parquet",
        f"images/scheduler=ddim/{DONE}-run1{suffix}",
        f"images/scheduler=ddim/{LOST}-run1{suffix}",
        f"images/scheduler=euler/{DONE}-run1{suffix}",  # committed in ddim only
        f"images/scheduler=euler/.{LOST}-run2{suffix}.77.tmp",
    )
    removed = remove_uncommitted(LocalFileSystem(), str(tmp_path), 1, images="webdataset")
    assert removed == 3
    assert remaining(tmp_path) == [
        f"images/scheduler=ddim/{DONE}-run1{suffix}",
        f"metadata/scheduler=ddim/{DONE}.parquet",
    ]


def test_images_of_an_attempt_that_lost_the_commit_are_removed(tmp_path):
    """Two runs wrote images for one shard; its metadata names the winner's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    touch(tmp_path, f"images/{DONE}-won/k1.png", f"images/{DONE}-lost/k1.png")
    (tmp_path / "metadata").mkdir()
    pq.write_table(
        pa.table({"id": ["a"], "image_path": [f"images/{DONE}-won/k1.png"]}),
        tmp_path / "metadata" / f"{DONE}.parquet",
    )
    assert remove_uncommitted(LocalFileSystem(), str(tmp_path), 0, images="files") == 1
    assert remaining(tmp_path) == [f"images/{DONE}-won/k1.png", f"metadata/{DONE}.parquet"]


def test_nothing_to_remove_in_an_empty_output(tmp_path):
    assert remove_uncommitted(LocalFileSystem(), str(tmp_path), 0, images="files") == 0


def remote_failure(cause: BaseException):
    """What Ray raises in the driver for a task's exception: a class that is both a
    RayTaskError and the exception's type, built by Ray itself."""
    from ray.exceptions import RayTaskError

    return RayTaskError(
        "submit", "Traceback (most recent call last): ...", cause
    ).as_instanceof_cause()


def test_sdray_errors_come_back_as_themselves():
    raised = ErrorBudgetExceeded("40 of 40 rows failed in one model actor")
    failure = _unwrap(remote_failure(raised))
    assert failure is raised


def test_other_remote_errors_become_one_line():
    failure = _unwrap(remote_failure(OSError(28, "No space left on device")))
    assert type(failure) is SdrayError
    assert str(failure) == "the job failed: OSError: [Errno 28] No space left on device"


def test_actor_deaths_and_local_errors():
    from ray.exceptions import ActorDiedError

    failure = _unwrap(ActorDiedError())
    assert "died for good" in str(failure) and "--resume" in str(failure)
    plain = FileNotFoundError("nope")
    assert _unwrap(plain) is plain
    budget = ErrorBudgetExceeded("too many")
    assert _unwrap(budget) is budget


def test_a_model_actor_whose_stage_cannot_be_built_raises_why_at_its_first_call():
    """An actor whose constructor raised would die with only the text of why; the stage's
    error is raised by the first call instead, whole, and comes back as itself."""
    from sdray.batch.units import UnitStage

    class Unloadable:
        def __init__(self):
            raise ModelError("model '/m' changed while the job was running")

    stage = UnitStage(Unloadable)
    with pytest.raises(ModelError, match="changed while the job was running") as raised:
        stage(pa.table({"unit": ["u"]}))
    assert _unwrap(remote_failure(raised.value)) is raised.value


def test_the_fingerprint_records_the_precision_actors_load():
    from sdray.batch.job import fingerprint_parts
    from sdray.config import config_from_dict

    model = {"sha256": "m", "family": "sd"}

    def dtype(**fields):
        return fingerprint_parts(config_from_dict({"model": fields}), model)["dtype"]

    assert dtype(device="cpu") == dtype(device="cpu", dtype="float32") == "float32"
    assert dtype(device="cuda") == dtype(device="cuda", dtype="float16") == "float16"
    assert dtype(device="cuda", dtype="bfloat16") == "bfloat16"


def test_relative_local_paths_are_taken_from_where_the_user_is(tmp_path, monkeypatch):
    from sdray.config import load_config
    from sdray.storage import absolute_uri

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["model.source=models/sd", "model.cache_dir=cache"])
    assert config.model.source == str(tmp_path / "models" / "sd")
    assert config.model.cache_dir == str(tmp_path / "cache")
    assert load_config(None, []).model.source == "tiny"
    assert absolute_uri("out") == str(tmp_path / "out")
    assert absolute_uri("s3://bucket/out") == "s3://bucket/out"


def test_outputs_that_recorded_dtype_auto_still_resume():
    from sdray.batch.job import _check_resumable, fingerprint_parts
    from sdray.config import config_from_dict

    parts = fingerprint_parts(
        config_from_dict({"model": {"device": "cpu"}}), {"sha256": "m", "family": "sd"}
    )
    old = {**parts, "dtype": "auto"}
    _check_resumable({"fingerprint_parts": old, "config": {"model": {"device": "cpu"}}}, parts, "o")
    with pytest.raises(SdrayError, match="dtype: 'float16' -> 'float32'"):
        _check_resumable(
            {"fingerprint_parts": old, "config": {"model": {"device": "cuda"}}}, parts, "o"
        )


def test_partition_types_come_from_shards_else_from_the_resumed_manifest():
    from sdray.batch.sink import partitioning_record

    previous = {"partitioning": {"columns": [{"name": "seed", "type": "int64"}]}}
    shards = [
        {"partition_types": {"seed": "null", "zip": "null"}},
        {"partition_types": {"zip": "string"}},
    ]
    record = partitioning_record(["seed", "zip"], shards, previous)
    assert record["columns"] == [
        {"name": "seed", "type": "int64"},  # this run wrote only null seeds: the manifest knows
        {"name": "zip", "type": "string"},
    ]


@pytest.mark.parametrize(("overlap", "in_flight"), [(True, 2), (False, 1)])
def test_an_actor_queues_no_more_units_than_it_runs_at_once(overlap, in_flight):
    """Ray Data's default queues twice the concurrent calls on an actor: the first actor to be
    ready then took every unit of a small table and the others got none."""
    from sdray.config import SdrayConfig

    config = SdrayConfig.model_validate(
        {"batch": {"min_actors": 2, "max_actors": 3, "overlap": overlap}}
    )
    pool = actor_pool(config)
    assert (pool.min_size, pool.max_size) == (2, 3)
    assert pool.max_concurrent_calls_per_actor == in_flight
    assert pool.max_tasks_in_flight_per_actor == in_flight


def test_a_jobs_data_context_does_not_outlive_it():
    """Ray Data's settings for a job are a copy, current only while the job runs."""
    from ray.data import DataContext

    from sdray.batch.job import job_data_context

    before = DataContext.get_current()
    settings = (before.enable_progress_bars, before.print_on_execution_start)
    with job_data_context(progress=False) as context:
        assert DataContext.get_current() is context and context is not before
        assert context.enable_progress_bars is False and context.print_on_execution_start is False
    assert DataContext.get_current() is before
    assert (before.enable_progress_bars, before.print_on_execution_start) == settings
