"""An offline job: prompt table in, images, metadata shards and manifest.json out."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import Any

from sdray.batch.actors import ActorWatch, WatchAbort
from sdray.batch.cluster import (
    check_paths_on_every_node,
    local_ray_settings,
    runtime_env_for_driver,
    summarize,
)
from sdray.batch.lease import check_held, is_lease_file, lease_run, output_lease
from sdray.batch.plan import JobPlan, plan_job, rows_per_call, start_registry
from sdray.batch.sink import (
    IMAGES_DIR,
    MANIFEST,
    METADATA_DIR,
    STAGING_DIR,
    ImageDatasink,
    clean_staging,
    committed_shards,
    foreign_shards,
    partitioning_record,
    remove_shards,
    remove_uncommitted,
)
from sdray.batch.stages import EncodeStage, ErrorBudgetExceeded, GenerateStage, ImageInputStage
from sdray.batch.units import PrepareUnits, UnitStage
from sdray.config import SdrayConfig
from sdray.errors import InputError, SdrayError
from sdray.families import with_model_defaults
from sdray.models import model_identity
from sdray.requests import BATCH_KEY_COLUMN, RESULT_COLUMNS
from sdray.storage import (
    absolute_uri,
    create_is_atomic,
    filesystem,
    is_nonempty,
    join,
    read_json,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

OWNED_PATHS = (METADATA_DIR, IMAGES_DIR, MANIFEST, STAGING_DIR)


@dataclass
class JobSummary:
    """What a finished job did."""

    output_uri: str
    rows: int
    ok: int
    error: int
    wall_seconds: float
    images_per_second: float
    manifest: dict[str, Any]
    shards: int

    def line(self) -> str:
        return (
            f"{self.ok} images ok, {self.error} rows in error, "
            f"{self.images_per_second:.2f} images/s, {self.wall_seconds:.1f}s; "
            f"output: {self.output_uri} ({IMAGES_DIR}/, {METADATA_DIR}/*.parquet, {MANIFEST})"
        )


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one, once per process.

    The driver's storage credentials and sdray settings reach every worker of the job through
    a setup hook, never the job's `env_vars`, which Ray logs (see `sdray.batch.cluster`).
    """
    import ray

    if not ray.is_initialized():
        with local_ray_settings():
            ray.init(
                logging_level=logging.WARNING,
                log_to_driver=True,
                include_dashboard=False,
                runtime_env=runtime_env_for_driver(),
            )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("sdray", "ray", "torch", "diffusers", "transformers", "pyarrow", "fsspec"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def fingerprint_parts(config: SdrayConfig, model: dict[str, str]) -> dict[str, Any]:
    """What must not change between a run and its resume: model, its family and precision,
    generation settings, output format. (Batching, actors and shard size may change; the input
    is checked by content, see `plan_job`, so an output and its input can move.)"""
    return {
        "model": model["sha256"],
        "model_family": model["family"],
        "watermark": config.model.watermark,
        "dtype": resolved_dtype(config),
        "levers": config.model.pixel_levers(),
        "generation": config.generation.model_dump(mode="json"),
        "output": config.output.model_dump(mode="json", exclude={"rows_per_shard"}),
    }


def resolved_device(config: SdrayConfig) -> str:
    """`model.device` as the model actors will run: `auto` is cuda where the cluster has GPUs."""
    device = config.model.device
    if device == "auto":
        import ray

        ensure_ray()
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return device


def resolved_dtype(config: SdrayConfig) -> str:
    """`model.dtype` as the model actors will load it (auto: float16 on cuda, else float32), so
    a run begun in float32 on CPU is not resumed in float16 once GPUs joined."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return "float16" if resolved_device(config) == "cuda" else "float32"


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two records, as `key: old -> new`; keys `old` lacks are not changes
    (settings added to sdray since `old` was written)."""
    changes = []
    for key in sorted(old):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def _redacted(config: SdrayConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    data["storage"]["storage_options"] = {key: "***" for key in config.storage.storage_options}
    return data


def output_entries(fs, root: str) -> list[str]:
    """Names of what an output directory holds, but for a run's lease."""
    if not is_nonempty(fs, root):
        return []
    if fs.isfile(root):
        return [root.rsplit("/", 1)[-1]]
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    return [name for name in names if not is_lease_file(name)]


def prepare_output(
    output_uri: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    extra_owned: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Refuse a non-empty output unless told what to do; return the manifest to resume from.

    Deletes nothing: with `overwrite`, call `clear_output` once the job has been planned, so a
    mistyped input or config never costs the previous output. `extra_owned` names more
    top-level entries a caller (a sweep) writes there: they do not count as "non-empty" on
    their own.
    """
    fs, root = filesystem(output_uri, storage_options)
    entries = output_entries(fs, root)
    if not entries:
        return None
    if resume:
        previous = read_json(fs, join(root, MANIFEST))
        if previous is None:
            raise SdrayError(
                f"cannot resume: output {output_uri!r} has no {MANIFEST}, so it is not an "
                "sdray output (or its run never started)"
            )
        return previous
    if not overwrite and any(e not in extra_owned for e in entries):
        raise SdrayError(
            f"output {output_uri!r} is not empty. Pass --overwrite to replace what sdray wrote "
            "there, or --resume to continue an interrupted run."
        )
    return None


def clear_output(
    output_uri: str,
    extra_owned: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
    keep: tuple[str, ...] = (),
) -> None:
    """Remove what sdray (and a caller such as a sweep) wrote in an output: --overwrite.

    `keep` names owned entries that are the new job's own input (a sweep's table and record).
    """
    fs, root = filesystem(output_uri, storage_options)
    for name in (*OWNED_PATHS, *extra_owned):
        path = join(root, name)
        if name not in keep and fs.exists(path):
            fs.rm(path, recursive=True)


def _check_resumable(previous: dict[str, Any], parts: dict[str, Any], output_uri: str) -> None:
    """Refuse a resume whose settings differ from the run's. A setting the run's sdray did not
    have yet (absent from its record) is not a change: it had its default's effect then."""
    old = dict(previous.get("fingerprint_parts") or {})
    if old.get("dtype") == "auto":  # an output written when the manifest kept dtype unresolved
        device = ((previous.get("config") or {}).get("model") or {}).get("device")
        old["dtype"] = {"cpu": "float32", "cuda": "float16"}.get(device, parts["dtype"])
    changes = _changes(old, parts)
    if changes:
        raise SdrayError(
            f"cannot resume {output_uri!r}: the run there used other settings ("
            + "; ".join(changes)
            + "). Resume with the same config and model, or start over with --overwrite."
        )


def _read_metadata(output_uri: str, columns: list[str], storage: dict[str, Any]):
    import ray

    fs, root = filesystem(output_uri, storage)
    path = join(root, METADATA_DIR)
    if not fs.exists(path) or not fs.find(path):
        return None
    return ray.data.read_parquet(
        join(output_uri, METADATA_DIR),
        columns=columns,
        filesystem=fs,
        file_extensions=["parquet"],
    )


def _unwrap(error: BaseException) -> BaseException:
    """The error to show for a failed job, by the exception types Ray gives (never by the
    text of its tracebacks): a task's own exception crosses the process boundary as itself
    (`raise_original_map_exception`, see `job_data_context`; Ray wraps it in a class that is
    both a RayTaskError and its type, `.cause` the original), so sdray's errors come back as
    themselves and any other as one line naming it."""
    from ray.exceptions import ActorDiedError, RayError

    if not isinstance(error, RayError):
        return error  # raised here, in the driver
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ActorDiedError):
            return SdrayError(
                "a model actor died for good (killed, or it could not be restarted): "
                f"{str(current).splitlines()[0]} The Ray logs say why. Committed shards are "
                "kept; continue with --resume."
            )
        if not isinstance(current, RayError):  # the task's own exception
            if isinstance(current, SdrayError):
                return current
            return SdrayError(f"the job failed: {type(current).__name__}: {current}")
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return SdrayError(f"the job failed: {str(error).splitlines()[0]}")


def actor_pool(config: SdrayConfig):
    """The model actors' pool: `batch.min_actors` to `batch.max_actors`, each with at most as
    many units queued as it runs at once."""
    from ray.data import ActorPoolStrategy

    # overlap: a second unit's block I/O beside the engine's work on another (the engine
    # itself still runs one batch at a time).
    in_flight = 2 if config.batch.overlap else 1
    return ActorPoolStrategy(
        min_size=config.batch.min_actors,
        max_size=config.batch.max_actors,
        max_concurrent_calls_per_actor=in_flight,
        # No deeper queue than that: Ray Data's default queues twice as many units on an
        # actor, so the first actor to be ready took the first four units of a small table
        # and the others, still loading, got none.
        max_tasks_in_flight_per_actor=in_flight,
    )


def actor_resources(config: SdrayConfig) -> dict[str, Any]:
    """Ray options of a model actor: a GPU each on cuda, fractional CPUs on CPU, restarts and
    task retries unbounded: `ActorWatch` counts crashes (not node losses) against
    `batch.max_actor_restarts` (see sdray.batch.actors).

    They are Ray Data's defaults too, but stated: actor options of their own also keep Ray Data
    from fusing the read tasks (`PrepareUnits`) into the model actors' operator, which it does
    when the two ask for nothing but resources — every unit then read and cut by one actor,
    and all its calls generated there (tests/integration/test_gpu_sizes.py shows two actors
    sharing one unit's calls)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    device = resolved_device(config)
    unbounded = {"max_restarts": -1, "max_task_retries": -1}
    if device == "cuda" or config.model.reserve_gpus_on_cpu:
        if gpus == 0:
            _say(
                f"model.device={device} with GPUs per model actor, but the Ray cluster has no "
                "GPUs now: the model actors wait for GPU nodes to join (an autoscaling "
                "cluster adds them)"
            )
        return {"num_gpus": config.batch.num_gpus_per_actor, "num_cpus": 1, **unbounded}
    return {"num_cpus": config.batch.num_cpus_per_actor, **unbounded}


def input_base(input_uri: str, storage: dict[str, Any]) -> str:
    """Where relative image URIs of the table's rows start: the input directory, or the folder
    of a single input file (a row's own subfolder is added from its source)."""
    fs, path = filesystem(input_uri, storage)
    return input_uri if fs.isdir(path) else input_uri.rstrip("/").rsplit("/", 1)[0]


def _say(message: str) -> None:
    print(f"sdray: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def job_data_context(progress: bool):
    """Ray Data's settings for one job — its progress bars on a terminal, elsewhere only
    sdray's own phase lines (Ray Data's log file keeps everything), a stage's exception back
    as itself — on a copy of the
    process's DataContext, current only while the job runs: nothing outlives it, so a process
    that runs jobs among other Ray Data work (a notebook, a service) keeps its own settings."""
    from ray.data import DataContext

    context = DataContext.get_current().copy()
    interactive = progress and sys.stderr.isatty()
    context.enable_progress_bars = interactive
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    # A stage's exception comes back as itself, not as Ray Data's UserCodeException with the
    # original only in its traceback text (see `_unwrap`).
    context.raise_original_map_exception = True
    # On the console, Ray Data says nothing below CRITICAL: its log file keeps everything, and
    # a failed job's cause is sdray's one line (a stage's exception, now the original, would
    # otherwise print its whole traceback there).
    quieted = []
    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            quieted.append((handler, handler.level))
            handler.setLevel(logging.CRITICAL)
    try:
        with DataContext.current(context):
            yield context
    finally:
        for handler, level in quieted:
            handler.setLevel(level)


def _status_counts(dataset) -> dict[str, int]:
    grouped = dataset.groupby("status", num_partitions=1).count()
    return {row["status"]: row["count()"] for row in grouped.take_all()}


def _one_unit_per_block(make):
    """Build a dataset whose every row (a unit) is its own block, through all its stages: so
    each unit is one task of each stage, whatever its size (the smallest block size there is;
    the datasets built from it keep it)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    default = context.target_max_block_size
    context.target_max_block_size = 1
    try:
        return make()
    finally:
        context.target_max_block_size = default


def run_generate(
    input_uri: str,
    output_uri: str,
    config: SdrayConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    extra_owned: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
    generate_stage: type = GenerateStage,
    hold_lease: bool = True,
) -> JobSummary:
    """Run an offline generation job end to end; the CLI, pipelines/ and sweeps all call this.

    `extra_owned`/`keep`: see `prepare_output` and `clear_output`. `generate_stage` is the model
    actor class; only benchmarks of the bookkeeping swap it for a stand-in. The run holds the
    output's lease throughout (see `sdray.batch.lease`) and every shard commit checks it, so a
    second run cannot join it; `hold_lease=False` only for a caller that holds it already (a
    sweep).
    """
    input_uri, output_uri = absolute_uri(input_uri), absolute_uri(output_uri)
    lease = (
        output_lease(output_uri, config.storage.storage_options, command="generate")
        if hold_lease
        else contextlib.nullcontext()
    )
    with lease as run, job_data_context(progress):
        return _run_generate(
            input_uri,
            output_uri,
            config,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            extra_owned=extra_owned,
            keep=keep,
            generate_stage=generate_stage,
            run=run,
        )


def _run_generate(
    input_uri: str,
    output_uri: str,
    config: SdrayConfig,
    *,
    overwrite: bool,
    resume: bool,
    progress: bool,
    extra_owned: tuple[str, ...],
    keep: tuple[str, ...],
    generate_stage: type,
    run: str | None,
) -> JobSummary:
    started, marks = time.perf_counter(), {"launched": time.time()}
    storage = config.storage.storage_options
    fs, root = filesystem(output_uri, storage)
    previous = prepare_output(
        output_uri,
        overwrite=overwrite,
        resume=resume,
        extra_owned=extra_owned,
        storage_options=storage,
    )
    for column in config.output.partition_by:
        if column == "id" or column in RESULT_COLUMNS:  # sdray sets them as it runs
            raise SdrayError(
                f"output.partition_by: cannot partition by {column!r} (sdray sets it as it runs)"
            )
    # The model's family is recognised and its configs checked here, before Ray starts anything.
    model, model_plan = model_identity(
        config.model.source,
        cache_dir=config.model.cache_dir,
        allow_pickle=config.model.allow_pickle,
        storage_options=storage,
    )
    config = config.model_copy(
        update={"generation": with_model_defaults(config.generation, model_plan)}
    )
    parts = fingerprint_parts(config, model)
    if previous is not None:
        _check_resumable(previous, parts, output_uri)

    # Planning reads only the input's listing and file footers, in the driver: a missing or
    # unreadable input is refused before Ray starts.
    plan = plan_job(input_uri, config, output_uri=output_uri, previous=previous)
    ray_started = time.time()
    ensure_ray()
    marks["ray_start"] = time.time() - ray_started
    say = _say if progress else (lambda message: None)
    check_paths_on_every_node(
        {"--input": input_uri, "model.source": config.model.source}, output=output_uri
    )
    if overwrite:
        clear_output(output_uri, extra_owned, storage, keep)  # only now that the job can run
    if previous is not None:
        removed = remove_uncommitted(
            fs, root, len(config.output.partition_by), images=config.output.format
        )
        if removed:
            say(f"removed {removed} uncommitted shard files left by interrupted runs")
    gen = config.generation
    if previous is not None and plan.rows_per_unit != config.output.shard_rows(
        gen.width, gen.height, config.batch.batch_size
    ):
        say(f"shards of {plan.rows_per_unit} rows, as the run being resumed wrote them")
    warning = commit_warning(fs, root, output_uri)
    if warning:
        _say(warning)
    hold = run or lease_run(fs, root)  # the lease to check: a caller's (a sweep's), if any
    run = hold or uuid.uuid4().hex[:12]
    # The runs whose shards the output holds: those of the runs resumed, and this one.
    runs = [*(previous or {}).get("runs", []), run]
    registry = start_registry(plan, output_uri, storage, say)
    manifest: dict[str, Any] = {
        "sdray_version": package_versions()["sdray"],
        "created": (previous or {}).get("created") or datetime.now(timezone.utc).isoformat(),
        "resumed": previous is not None,
        "status": "running",
        "input": input_uri,
        "output": output_uri,
        "config": _redacted(config),
        "versions": package_versions(),
        "model": {**model, "plan": model_plan.summary()},
        "fingerprint": fingerprint(parts),
        "fingerprint_parts": parts,
        "rows_per_unit": plan.rows_per_unit,
        "runs": runs,
    }
    check_held(fs, root, hold)
    write_bytes_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=2).encode())
    marks["planned"] = time.time() - marks["launched"]
    done = f", resuming {len(plan.committed_paths)} committed shards" if previous else ""
    say(
        f"generating {input_uri} ({len(plan.sources)} files{done}) in shards of "
        f"{plan.rows_per_unit} rows, with up to {config.batch.max_actors} model actors"
    )
    sink = ImageDatasink(
        output_uri,
        output_format=config.output.format,
        image_format=config.output.image_format,
        partition_by=config.output.partition_by,
        run_id=run[:8],
        lease_run=hold,
        storage_options=storage,
        encode=EncodeStage(config.output),
        run=run,
        fingerprint=manifest["fingerprint"],
    )
    generate_started = time.perf_counter()
    depth = len(config.output.partition_by)

    def committed() -> int:  # the run's progress, as the store shows it
        fs.invalidate_cache()
        return len(committed_shards(fs, root, depth))

    watch = ActorWatch(config.batch.max_actor_restarts, config.batch.actor_wait_s, committed)
    try:
        with watch:
            _pipeline(
                plan, config, model, generate_stage, registry, output_uri, input_uri
            ).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    except WatchAbort:
        raise watch.failure from None
    except Exception as error:
        failure = _unwrap(error)
        if isinstance(failure, ErrorBudgetExceeded):
            raise SdrayError(
                f"aborting the run: {failure}. Committed shards are kept; fix the cause and "
                "continue with --resume."
            ) from None
        raise failure from None
    finally:
        if registry is not None:
            registry.close()
    marks["generate"] = time.perf_counter() - generate_started
    check_held(fs, root, hold)  # a run that lost the output leaves its manifest alone too
    clean_staging(fs, root, sink.run_id)
    fs.invalidate_cache()  # what the write tasks wrote, not what this process listed before
    _refuse_foreign_shards(fs, root, plan, sink, output_uri, len(config.output.partition_by))
    per_node = summarize(list(sink.stats.get("actors", {}).values()))
    return _finish(
        manifest, sink.stats, config, previous, started=started, marks=marks, per_node=per_node
    )


def commit_warning(fs, root: str, output_uri: str) -> str | None:
    """One line for a store whose create-if-absent is not atomic (probed): the commit of a
    shard, and so its exactly-once, rests on it."""
    unsafe = create_is_atomic(fs, root)
    if unsafe is None:
        return None
    return (
        f"warning: output {output_uri!r}: {unsafe}, so two attempts at one shard could both "
        "commit it (its rows written twice); local disk and S3 have an atomic one"
    )


def _refuse_foreign_shards(fs, root, plan: JobPlan, sink, output_uri: str, depth: int):
    """The end-of-run check: a shard committed during this run by another run (one that lost
    the lease, committing between its last lease check and its write, even the run this one
    resumed: this run may have removed its images as uncommitted), or with another fingerprint,
    is removed, and the run fails saying so; --resume then generates its rows again. The
    shards there when this run planned were accepted by its resume check (fingerprint, ids)."""
    before = set(plan.committed_paths) | set(sink.stats.get("committed_paths", []))
    now = {path for shard in committed_shards(fs, root, depth).values() for path in shard["paths"]}
    refused = foreign_shards(fs, root, now - before, sink.fingerprint, [sink.run])
    if not refused:
        return
    remove_shards(fs, root, [path for path, _ in refused])
    path, recorded = refused[0]
    raise SdrayError(
        f"{len(refused)} shards of {output_uri!r} were committed during this run by a run "
        f"that no longer held the output's lease or used other settings (for example {path}: "
        f"{recorded}); they were removed. Run again with --resume to generate their rows."
    )


def _pipeline(
    plan: JobPlan,
    config: SdrayConfig,
    model: dict[str, Any],
    generate_stage: type,
    registry,
    output_uri: str,
    input_uri: str,
):
    """The lazy Ray Data pipeline: read and prepare units, cut them into calls and fetch their
    init and mask images (tasks) -> generate (model actors); one call per block and per task
    all the way. The datasink's write tasks encode each call's raw pixels (so they cross the
    object store once, from the model actor to the task that encodes and writes them) and
    write and commit its unit (`ImageDatasink`)."""
    import ray

    batch = config.batch
    storage = config.storage.storage_options
    specs = [{"task": json.dumps(task)} for task in plan.tasks]
    source = _one_unit_per_block(
        lambda: ray.data.from_items(specs, override_num_blocks=max(1, min(len(specs), 200)))
    )
    prepare = PrepareUnits(
        config.generation,
        rows_per_unit=plan.rows_per_unit,
        text_columns=plan.text_columns,
        expected=plan.expected,
        partition_by=config.output.partition_by,
        order_by=[BATCH_KEY_COLUMN] if batch.sort_by_shape else [],
        registry=registry,
        storage_options=storage,
        output_uri=output_uri,
        # Init and mask images: fetched, decoded and sized by the read tasks, a call at a
        # time, so model actors receive ready pixels.
        fetch=ImageInputStage(config.generation, input_base(input_uri, storage), storage),
        rows_per_call=rows_per_call(plan.rows_estimate, config),
        max_call_bytes=batch.max_call_bytes,
        preview_every=config.output.preview_every,
    )
    units = source.map_batches(prepare, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    with warnings.catch_warnings():
        # Ray Data 2.60 takes actor resources only through its deprecated **ray_remote_args
        # (there is no named parameter yet); revisit on upgrade.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        pixels = units.map_batches(
            UnitStage,
            fn_constructor_kwargs={
                "stage": generate_stage,
                "rows_per_call": batch.batch_size,
                "stage_kwargs": {
                    "model": config.model,
                    "model_name": model["name"],
                    "model_family": model["family"],
                    "model_sha256": model["sha256"],
                    "batch_size": batch.batch_size,
                    "torch_threads": batch.torch_threads,
                    "storage_options": storage,
                    "max_error_fraction": batch.max_error_fraction,
                    "preview_every": config.output.preview_every,
                },
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=actor_pool(config),
            **actor_resources(config),
        )
    return pixels


def _finish(
    manifest: dict[str, Any],
    stats: dict[str, Any],
    config: SdrayConfig,
    previous: dict[str, Any] | None,
    *,
    started: float,
    marks: dict[str, float],
    per_node: dict[str, Any] | None = None,
) -> JobSummary:
    """Count what the output holds, write the final manifest, report. `marks`: seconds from
    the run's start (`launched`, wall clock) to its firsts, and the pipeline's seconds."""
    storage = config.storage.storage_options
    output_uri = manifest["output"]
    fs, root = filesystem(output_uri, storage)
    launched, generate_seconds = marks.pop("launched"), marks.pop("generate")
    total = stats.get("input_rows", 0)
    if total == 0:
        raise InputError(f"input {manifest['input']!r} holds no rows")
    generated = stats.get("ok", 0)
    if previous is not None or stats.get("committed_elsewhere"):  # shards this run did not count
        counts = _status_counts(_read_metadata(output_uri, ["status"], storage))
    else:
        counts = {"ok": generated, "error": stats.get("error", 0)}
    ok, errors = counts.get("ok", 0), counts.get("error", 0)
    if stats.get("invalid"):
        _say(
            f"{stats['invalid']} invalid rows recorded with status=error, for example:\n  "
            + "\n  ".join(stats.get("examples", []))
        )
    wall = time.perf_counter() - started
    rate = generated / generate_seconds if generate_seconds and generated else 0.0
    for name in ("read", "actor_ready", "generated", "committed"):
        at = stats.get(f"{name}_at")
        if at is not None:
            marks[f"first_{name}"] = at - launched
    manifest.update(
        status="complete" if ok + errors == total else "incomplete",
        finished=datetime.now(timezone.utc).isoformat(),
        counts={"rows": ok + errors, "ok": ok, "error": errors, "generated_this_run": generated},
        # Rows whose shard a write found already committed by another attempt, so wrote no
        # more (a retried task whose first attempt committed, then died unheard).
        committed_by_other_attempts=stats.get("committed_elsewhere", 0),
        shards=stats.get("shards", 0),
        partitioning=partitioning_record(config.output.partition_by, [stats], previous),
        timings={
            "plan_s": round(marks["planned"], 3),
            "generate_s": round(generate_seconds, 3),
            "wall_s": round(wall, 3),
        },
        # Seconds from the start of the run to each first: Ray up, the job planned, a unit read
        # and validated, a model actor ready, a unit generated, a shard committed.
        startup={name: round(seconds, 3) for name, seconds in marks.items()},
        throughput={"images_per_s": round(rate, 4)},
        # Who made what this run, and how fast: a slow or failing machine stands out.
        **(per_node or {}),
    )
    write_bytes_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=2).encode())
    if ok + errors != total:
        raise SdrayError(
            f"the output holds {ok + errors} metadata rows for {total} input rows; "
            "run again with --resume to complete it"
        )
    return JobSummary(
        output_uri=output_uri,
        rows=total,
        ok=ok,
        error=errors,
        wall_seconds=wall,
        images_per_second=rate,
        manifest=manifest,
        shards=stats.get("shards", 0),
    )
