"""Bookkeeping at scale: how soon the first shard commits, and what the stream costs, as tables grow.

    python pipelines/bench_scale.py                                  # 10k, 1M and 10M rows
    python pipelines/bench_scale.py --rows 10000 1000000 --resume-rows 1000000 --startup-rows 2000

For each size, in one run, each in a fresh driver process (so its peak memory is its own):

- `sdray`: `run_generate` with the model actor replaced by a clearly labelled STAND-IN that
  generates nothing and marks every row ok, so what is measured is sdray's own work (reading,
  validation, ids, ordering, shards, commits, manifest);
- `floor`: a bare Ray Data `read_parquet -> map_batches -> write_parquet` of the same table, its
  `map_batches` doing the same per-row work (sdray's row validation, then the stand-in) but none
  of sdray's bookkeeping: what Ray Data itself can do with this table on this machine;
- `resume` (for `--resume-rows`): the `sdray` output with every other metadata shard removed, as
  an interrupted run leaves it, resumed.

Printed per run: seconds from launch to the first committed shard (first file for the floor),
wall seconds, rows/s, the driver's peak RSS, the object store's peak use, and the Ray Data
tasks and blocks (from Ray Data's own operator metrics). `--startup-rows` adds a run with the
real tiny model (8x8 images, one step) and prints where its start-up time goes.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

SETTINGS = [
    "generation.width=64",  # set, so the floor validates rows as sdray does (the stand-in draws
    "generation.height=64",  # nothing)
    "batch.batch_size=1000",
    "batch.min_actors=2",
    "batch.max_actors=2",
    "output.rows_per_shard=10000",
    "batch.batches_per_call=10",  # a unit in one model actor call, as in the floor's
    "batch.max_call_bytes=1073741824",  # map_batches (the stand-in makes no pixels)
    "output.format=parquet",
]
TINY = [  # a new user's first run: the embedded model, 8x8 images, one step
    "generation.width=8",
    "generation.height=8",
    "generation.steps=1",
    "batch.batch_size=16",
]


LAUNCHED = 0.0  # when the parent launched this child process (wall clock)


class StandInGenerateStage:
    """STAND-IN for the model actor: no model, no images; rows stay as they are, with no pixels."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        from sdray.batch.stages import PIXELS_COLUMN

        n = batch.num_rows
        batch = batch.append_column("model", pa.array(["stand-in"] * n, pa.string()))
        batch = batch.append_column("truncated", pa.array([False] * n, pa.bool_()))
        return batch.append_column(PIXELS_COLUMN, pa.nulls(n, pa.binary()))


def write_prompts(directory: Path, rows: int, files: int = 8) -> None:
    """`rows` prompt rows with unique text ids in `files` Parquet files, written in slices."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        if start >= stop:
            break
        with pq.ParquetWriter(directory / f"part-{f:02d}.parquet", _schema()) as writer:
            for lo in range(start, stop, 1_000_000):
                numbers = pc.cast(pa.array(range(lo, min(stop, lo + 1_000_000))), pa.string())
                padded = pc.utf8_lpad(numbers, 9, "0")
                writer.write_table(
                    pa.table(
                        {
                            "id": pc.binary_join_element_wise("row-", padded, ""),
                            "prompt": pc.binary_join_element_wise(
                                "a prompt about item ", numbers, ""
                            ),
                        },
                        schema=_schema(),
                    )
                )


def _schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("prompt", pa.string())])


class ObjectStorePeak:
    """Polls the object store's use (plasma memory, as `ray memory` reports it) in a thread."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ObjectStorePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _poll(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        address = ray.get_runtime_context().gcs_address
        while not self._stop.wait(0.5):
            try:
                text = memory_summary(address=address, stats_only=True)
            except Exception:  # noqa: BLE001 - a missed sample only
                continue
            match = re.search(r"Plasma memory usage (\d+) MiB", text)
            if match:
                self.peak_mb = max(self.peak_mb, float(match[1]))


def ray_data_counts() -> dict[str, int]:
    """Tasks run and blocks made by every Ray Data operator in this driver's session (from the
    operator metrics Ray Data logs when an operator completes)."""
    import ray._private.worker as worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs" / "ray-data"
    tasks = blocks = 0
    for log in logs.glob("ray-data-*.log"):
        text = log.read_text(errors="replace")
        for final in re.findall(r"completed\. Operator Metrics:\n(\{.*)", text):
            tasks += int(re.search(r"'num_tasks_finished': (\d+)", final)[1])
            blocks += int(re.search(r"'num_task_outputs_generated': (\d+)", final)[1])
    return {"tasks": tasks, "blocks": blocks}


def keep_ray_data_logs() -> None:
    """Let Ray Data write its operator metrics to its log file (`ray_data_counts` reads them)
    even where the job quiets the `ray.data` logger, by quieting its terminal handler instead."""
    import logging

    from sdray.batch import job

    configure = job._configure_progress

    def quiet_terminal_only(progress: bool) -> None:
        configure(progress)
        logger = logging.getLogger("ray.data")
        logger.setLevel(logging.DEBUG)
        for handler in logger.handlers:
            if getattr(handler, "stream", None) is sys.stderr:
                handler.setLevel(logging.ERROR)

    job._configure_progress = quiet_terminal_only


def child(kind: str, input_uri: str, output_uri: str, settings: list[str]) -> dict:
    """One measured driver run (in a child process); returns its figures."""
    import ray

    from sdray.batch.cluster import local_ray_settings

    keep_ray_data_logs()
    imports = time.time() - LAUNCHED
    started = time.perf_counter()
    with local_ray_settings(cpus=2):  # the Ray sdray starts for itself, for every kind of run
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray_start = time.perf_counter() - started
    figures: dict = {"imports_s": round(imports, 2), "ray_start_s": round(ray_start, 2)}
    with ObjectStorePeak() as store:
        if kind == "floor":
            figures["rows"] = floor(input_uri, output_uri, settings)
        else:
            from sdray.batch import run_generate
            from sdray.config import load_config

            stand_in = {} if kind == "startup" else {"generate_stage": StandInGenerateStage}
            summary = run_generate(
                input_uri,
                output_uri,
                load_config(None, settings),
                resume=kind == "resume",
                progress=False,
                **stand_in,
            )
            figures["rows"] = summary.manifest["counts"]["generated_this_run"]
            figures["startup"] = summary.manifest.get("startup")
    figures["wall_s"] = round(time.perf_counter() - started, 2)
    figures["driver_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures["object_store_peak_mb"] = store.peak_mb
    figures.update(ray_data_counts())
    return figures


def floor(input_uri: str, output_uri: str, settings: list[str]) -> int:
    """The bare Ray Data pipeline: read_parquet -> map_batches -> write_parquet, with the same
    per-row work as sdray's stages (validation, the stand-in) and none of its bookkeeping."""
    import pyarrow.parquet as pq
    import ray

    from sdray.batch.stages import PIXELS_COLUMN, PrepareStage
    from sdray.config import load_config

    config = load_config(None, settings)
    prepare, stand_in = PrepareStage(config.generation), StandInGenerateStage()

    def work(batch: pa.Table) -> pa.Table:
        batch = stand_in(prepare(batch))
        return batch.drop_columns([PIXELS_COLUMN])

    dataset = ray.data.read_parquet(input_uri).map_batches(work, batch_format="pyarrow")
    dataset.write_parquet(output_uri)
    return sum(pq.read_metadata(p).num_rows for p in Path(output_uri).glob("*.parquet"))


def measure(
    kind: str, input_dir: Path, output: Path, settings: list[str], watch: Path, limit: float
) -> dict:
    """Run one child driver; time its first committed file from launch, by watching `watch`.
    A run past `limit` seconds is stopped and reported as such (`wall_s` is then None)."""
    command = [sys.executable, __file__, "--launched", repr(time.time())]
    command += ["--child", kind, str(input_dir), str(output)]
    before = count_files(watch)
    launched = time.perf_counter()
    process = subprocess.Popen(
        [*command, json.dumps(settings)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = None
    while process.poll() is None:
        if first is None and count_files(watch) > before:
            first = time.perf_counter() - launched
        if time.perf_counter() - launched > limit:
            process.kill()
            process.communicate()
            return {"first_commit_s": first, "wall_s": None, "limit_s": limit}
        time.sleep(0.1)
    out, err = process.communicate()
    if process.returncode:
        sys.exit(f"{kind} run failed:\n{err[-4000:]}")
    figures = json.loads(next(line for line in reversed(out.splitlines()) if line[:1] == "{"))
    if first is None and count_files(watch) > before:
        first = time.perf_counter() - launched
    figures["first_commit_s"] = round(first, 2) if first is not None else None
    return figures


def startup_line(figures: dict) -> str:
    """Where a small run's time to its first commit went, from the marks the job records."""
    marks = figures.get("startup")
    if not marks or figures.get("wall_s") is None:
        return f"start-up: {figures}"
    actor = marks["first_actor_ready"] - marks["planned"]
    parts = {
        "python and imports": figures["imports_s"],
        "Ray start": figures["ray_start_s"],
        "plan": marks["planned"],
        "first unit read and validated": marks["first_read"] - marks["planned"],
        "model actor start and load": actor,
        "first batch": marks["first_generated"]
        - max(marks["first_actor_ready"], marks["first_read"]),
        "first write": marks["first_committed"] - marks["first_generated"],
    }
    bound = 2 * (figures["ray_start_s"] + actor)
    return (
        "start-up, seconds: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in parts.items())
        + f"; first commit {figures['first_commit_s']:.1f} s after launch, "
        f"2 x (Ray start + actor start) = {bound:.1f} s"
    )


def count_files(directory: Path) -> int:
    """Committed Parquet files under `directory` (temporary files start with a dot)."""
    if not directory.exists():
        return 0
    return sum(1 for p in directory.rglob("*.parquet") if not p.name.startswith("."))


def drop_every_other_shard(output: Path) -> int:
    shards = sorted((output / "metadata").rglob("*.parquet"))
    for shard in shards[::2]:
        shard.unlink()
    return len(shards[::2])


def row(label: str, rows: int, figures: dict) -> str:
    if figures["wall_s"] is None:
        first = figures["first_commit_s"]
        seen = f"first commit after {first:.1f} s" if first else "no shard committed"
        return f"| {label:<22} | {rows:>11,} | stopped after {figures['limit_s']:.0f} s: {seen} |"
    rate = figures["rows"] / figures["wall_s"] if figures["wall_s"] else 0
    return (
        f"| {label:<22} | {rows:>11,} | {figures['first_commit_s'] or float('nan'):>8.1f} | "
        f"{figures['wall_s']:>7.1f} | {rate:>9,.0f} | {figures['driver_peak_mb']:>6} | "
        f"{figures['object_store_peak_mb']:>7.0f} | {figures['tasks']:>6} | {figures['blocks']:>7} |"
    )


HEADER = (
    "| run (STAND-IN model)   |  table rows | 1st commit s | wall s | rows/s | driver MB "
    "| store MB | tasks | blocks |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--resume-rows", type=int, nargs="*", default=[10_000_000])
    parser.add_argument("--startup-rows", type=int, default=2000)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--limit", type=float, default=3600, help="seconds per run at most")
    parser.add_argument("--workdir", help="where tables and outputs go (default: a temp dir)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        global LAUNCHED
        LAUNCHED = args.launched
        kind, input_dir, output, settings = args.child
        print(json.dumps(child(kind, input_dir, output, json.loads(settings))))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    print(HEADER, flush=True)
    try:
        if args.startup_rows:
            inputs = workdir / "startup-in"
            inputs.mkdir(parents=True, exist_ok=True)
            write_prompts(inputs, args.startup_rows, files=1)
            output = workdir / "startup-out"
            figures = measure("startup", inputs, output, TINY, output / "metadata", args.limit)
            print(row("tiny model, 8x8, 1 step", args.startup_rows, figures), flush=True)
            print(startup_line(figures), flush=True)
            shutil.rmtree(output, ignore_errors=True)
        for rows in args.rows:
            inputs = workdir / f"in-{rows}"
            inputs.mkdir(parents=True, exist_ok=True)
            write_prompts(inputs, rows)
            output = workdir / f"out-{rows}"
            figures = measure("run", inputs, output, SETTINGS, output / "metadata", args.limit)
            print(row("sdray", rows, figures), flush=True)
            if not args.no_floor:
                floor_out = workdir / f"floor-{rows}"
                figures = measure("floor", inputs, floor_out, SETTINGS, floor_out, args.limit)
                print(row("floor: bare Ray Data", rows, figures), flush=True)
                shutil.rmtree(floor_out, ignore_errors=True)
            if rows in args.resume_rows:
                dropped = drop_every_other_shard(output)
                figures = measure(
                    "resume", inputs, output, SETTINGS, output / "metadata", args.limit
                )
                print(row(f"resume ({dropped} shards lost)", rows, figures), flush=True)
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(inputs, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
