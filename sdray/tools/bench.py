"""`sdray bench`: a plain diffusers loop vs the engine in-process vs the full Ray Data pipeline.

Same model, rows, batch size and total cores for all three, side by side in one process, so
the ratios hold even on a noisy shared machine.
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass

from sdray.config import SdrayConfig
from sdray.families import with_model_defaults
from sdray.requests import GenerationRequest, derive_seed
from sdray.tools.bench_levers import _sync


@dataclass
class Measurement:
    name: str
    images: int
    seconds: float
    peak_rss_mb: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_requests(config: SdrayConfig, rows: int) -> list[GenerationRequest]:
    """The benchmark rows: the config's default parameters, distinct prompts and seeds."""
    gen = config.generation
    return [
        GenerationRequest(
            id=f"bench-{i}",
            prompt=f"a photograph of an astronaut riding a horse, variation {i}",
            negative_prompt=gen.negative_prompt,
            seed=derive_seed(gen.seed, f"bench-{i}"),
            steps=gen.steps,
            guidance_scale=gen.guidance_scale,
            width=gen.width,
            height=gen.height,
            scheduler=gen.scheduler,
        )
        for i in range(rows)
    ]


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _diffusers_loop(engine, requests, batch_size: int) -> None:
    """(a) The baseline: diffusers' own pipeline of the model's family, called batch by batch on
    the same modules."""
    import torch

    pipe = reference_pipeline(engine, requests[0].scheduler)
    first = requests[0]
    for chunk in _chunks(requests, batch_size):
        pipe(
            [r.prompt for r in chunk],
            negative_prompt=[r.negative_prompt for r in chunk]
            if any(r.negative_prompt for r in chunk)
            else None,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in chunk],
            output_type="np",
        )


def reference_pipeline(engine, scheduler: str):
    """diffusers' pipeline of the engine's family (StableDiffusionPipeline or
    StableDiffusionXLPipeline) over the engine's own modules, with the named scheduler."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdray.schedulers import build_scheduler

    family = engine.family
    parts = {
        "vae": engine.vae,
        "unet": engine.unet,
        "scheduler": build_scheduler(scheduler, engine.scheduler_config),
    }
    if engine.plan.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            text_encoder=family.text_encoders[0],
            text_encoder_2=family.text_encoders[1],
            tokenizer=family.tokenizers[0],
            tokenizer_2=family.tokenizers[1],
            force_zeros_for_empty_prompt=engine.plan.force_zeros_for_empty_prompt,
            add_watermarker=False,
            **parts,
        )
    else:
        pipe = StableDiffusionPipeline(
            text_encoder=engine.text_encoder,
            tokenizer=engine.tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# What each process of this driver's Ray cluster is, from its command line.
_PARTS = (
    # Model actors are Ray Data's actor-pool workers (`MapWorker(...)`); every other stage
    # runs as tasks, the last one ending in the Datasink's `Write`.
    ("model actors", ("GenerateStage", "MapWorker(")),
    ("encode and write tasks", ("EncodeStage", "Write", "ImageDatasink")),
    ("other Ray Data tasks", ("ray::",)),
    ("Ray daemons (raylet, GCS, agents)", ("raylet", "gcs_server", "agent", "dashboard")),
)


class _RayProcesses:
    """CPU seconds and peak memory of this driver's own Ray cluster, by part, sampled in the
    background: the processes this one started (raylet, GCS, workers), never another user's
    cluster on a shared machine. The driver's own CPU (Ray Data's executor) is counted too."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.cpu_s: dict[str, float] = {}
        self._cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _part(cmdline: str) -> str:
        for part, markers in _PARTS:
            if any(marker in cmdline for marker in markers):
                return part
        return "other"

    def _sample(self) -> None:
        import psutil

        workers = 0
        for proc in psutil.Process().children(recursive=True):
            try:
                with proc.oneshot():
                    cmdline = " ".join(proc.cmdline())
                    times = proc.cpu_times()
                    rss = proc.memory_info().rss
            except psutil.Error:
                continue
            # A worker's title changes as it takes tasks: the part is where it spent the time.
            part = self._part(cmdline)
            previous = self._cpu.get(proc.pid, (part, 0.0))[1]
            self._cpu[proc.pid] = (part, times.user + times.system)
            if "ray::" in cmdline:
                workers += rss
            delta = times.user + times.system - previous
            self.cpu_s[part] = self.cpu_s.get(part, 0.0) + delta
        self.peak_mb = max(self.peak_mb, workers / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self):
        import psutil

        self._driver = psutil.Process().cpu_times()
        self._sample()  # the baseline: time spent before the run is not the run's
        self.cpu_s.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        now = psutil.Process().cpu_times()
        self.cpu_s["driver (Ray Data's executor)"] = (
            now.user + now.system - self._driver.user - self._driver.system
        )


def _actor_startup_seconds(config: SdrayConfig, model_name: str) -> float:
    """Time for one model actor to start: process, imports and model load."""
    import ray

    from sdray.batch.job import actor_resources
    from sdray.batch.stages import GenerateStage

    started = time.perf_counter()
    actor = (
        ray.remote(GenerateStage)
        .options(**actor_resources(config))
        .remote(config.model, model_name, config.batch.batch_size, 1)
    )
    ray.get(actor.__ray_ready__.remote(), timeout=600)
    elapsed = time.perf_counter() - started
    ray.kill(actor)
    return elapsed


@dataclass
class RayRun:
    """One run of the whole job through Ray Data, and what its processes spent."""

    summary: object  # JobSummary
    actors: int
    processes: _RayProcesses
    commits: list[float]  # when each shard (one batch) was committed, seconds after the start

    def steady_rate(self) -> float | None:
        """Images/s between the commits of the first and last tenth of the shards: start-up,
        the first batches and the tail (one actor finishing before another) left out."""
        times = sorted(self.commits)
        if len(times) < 5:
            return None
        first, last = round(len(times) * 0.1), round(len(times) * 0.9) - 1
        per_shard = self.summary.ok / len(times)
        span = times[last] - times[first]
        return (last - first) * per_shard / span if span > 0 else None


def _ray_pipeline(
    config: SdrayConfig, requests, cores: int, engine_device: str, actors: int | None = None
) -> RayRun:
    """(c) The whole offline job through Ray Data, one shard per model actor call (the
    default call: `batch.batches_per_call` batches) so each commit is timed; on CPU `actors`
    model actors of one thread each (default: one per core)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdray.batch.job import run_generate

    job_config = config.model_copy(deep=True)
    if engine_device == "cuda":
        actors = 1  # one GPU, as the in-process loops had
    else:
        actors = actors or max(1, cores)  # one thread each: the cores of the in-process loops
        job_config.batch.torch_threads = 1
        job_config.batch.num_cpus_per_actor = min(job_config.batch.num_cpus_per_actor, 1.0)
    job_config.batch.min_actors = job_config.batch.max_actors = actors
    job_config.output.rows_per_shard = (
        job_config.batch.batch_size * job_config.batch.batches_per_call
    )
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pylist(
            [
                {
                    "id": r.id,
                    "prompt": r.prompt,
                    "negative_prompt": r.negative_prompt,
                    "seed": r.seed,
                }
                for r in requests
            ]
        )
        pq.write_table(table, os.path.join(tmp, "prompts.parquet"))
        output = os.path.join(tmp, "out")
        started = time.time()
        with _RayProcesses() as processes:
            summary = run_generate(
                os.path.join(tmp, "prompts.parquet"), output, job_config, progress=False
            )
        shards = [
            os.path.getmtime(os.path.join(root, name)) - started
            for root, _, names in os.walk(os.path.join(output, "metadata"))
            for name in names
            if name.endswith(".parquet")
        ]
    return RayRun(summary, actors, processes, shards)


def _engine_process(config_json: str, seconds: float, ready, results) -> None:
    """One process of `process_scaling`: a one-thread engine, timed for `seconds` once every
    process of the measurement is loaded and warm."""
    import torch

    from sdray.engine import DiffusionEngine

    torch.set_num_threads(1)
    try:
        config = SdrayConfig.model_validate_json(config_json)
        engine = DiffusionEngine.from_config(config.model, max_batch_size=config.batch.batch_size)
        requests = bench_requests(config, config.batch.batch_size)
        engine.generate(requests)
    except BaseException:
        ready.abort()  # the others and the parent stop waiting at once
        raise
    ready.wait(timeout=300)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.generate(requests)
        images += len(requests)
    results.put(images / (time.perf_counter() - started))


def process_scaling(config: SdrayConfig, processes: int, seconds: float = 10.0) -> list[float]:
    """What the machine itself gives: images/s of each of `processes` one-thread engine
    processes (no Ray) generating at the same time, timed together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(processes + 1), context.Queue()
    workers = [
        context.Process(
            target=_engine_process, args=(config.model_dump_json(), seconds, ready, results)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=300)  # every engine loaded and warm: all start at once
        return [results.get(timeout=seconds + 120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _accounting(run: RayRun, cores: int) -> list[str]:
    """Where the cores went during a Ray run, as lines of the report."""
    capacity = cores * run.summary.wall_seconds
    lines = [f"  CPU during the Ray run ({cores} cores x {run.summary.wall_seconds:.1f}s wall):"]
    used = 0.0
    for part, seconds in sorted(run.processes.cpu_s.items(), key=lambda item: -item[1]):
        used += seconds
        lines.append(f"    {part:<38} {seconds:7.1f} core-s  {seconds / capacity:6.1%}")
    lines.append(
        f"    {'idle or other users':<38} {capacity - used:7.1f} core-s  "
        f"{(capacity - used) / capacity:6.1%}"
    )
    return lines


class _Report(list):
    """Report lines, each printed as soon as it is known (a long run shows its progress)."""

    def append(self, line: str) -> None:
        super().append(line)
        print(line, flush=True)

    def __iadd__(self, more):
        for line in more:
            self.append(line)
        return self


def run_bench(
    config: SdrayConfig,
    *,
    rows: int = 256,
    include_ray: bool = True,
    scaling: bool = True,
    loop_rows: int | None = None,
) -> dict:
    """Measure (a) diffusers loop, (b) engine, (c) Ray pipeline; print and return the figures.
    (a) and (b) run `loop_rows` of the rows (default all: their rates are steady from the
    first batch after the warm-up)."""
    import torch

    from sdray.engine import DiffusionEngine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    batch_size = config.batch.batch_size
    engine = DiffusionEngine.from_config(
        config.model, max_batch_size=batch_size, storage_options=config.storage.storage_options
    )
    config = config.model_copy(
        update={"generation": with_model_defaults(config.generation, engine.plan)}
    )
    requests = bench_requests(config, rows)
    gen = config.generation
    # Warm up both paths once (allocator, kernels, lazy imports), then measure.
    _diffusers_loop(engine, requests[:batch_size], batch_size)
    engine.generate(requests[:batch_size])

    results: list[Measurement] = []
    timed = requests[: loop_rows or rows]
    started = time.perf_counter()
    _diffusers_loop(engine, timed, batch_size)
    _sync(engine.device)
    results.append(
        Measurement("(a) diffusers loop", len(timed), time.perf_counter() - started, _rss_mb())
    )

    started = time.perf_counter()
    for chunk in _chunks(timed, batch_size):
        engine.generate(chunk)
    _sync(engine.device)
    results.append(Measurement("(b) engine", len(timed), time.perf_counter() - started, _rss_mb()))

    figures: dict = {
        "rows": rows,
        "batch_size": batch_size,
        "cores": cores,
        "device": engine.device,
        "engine_load_s": engine.load_seconds,
    }
    lines = _Report()
    lines.append(
        f"sdray bench: model {engine.model_name} on {engine.device} ({engine.dtype}), {cores} cores, "
        f"{rows} images {gen.width}x{gen.height}, {gen.steps} steps {gen.scheduler}, "
        f"guidance {gen.guidance_scale}, batch {batch_size}"
    )
    base = results[0].rate
    for m in results:
        lines.append(
            f"  {m.name:<24} {m.rate:8.2f} images/s  ratio {m.rate / base:5.2f}  "
            f"peak RSS {m.peak_rss_mb:7.0f} MB"
        )
        figures[m.name] = {"images_per_s": m.rate, "ratio": m.rate / base}
    lines.append(f"  engine load in-process: {engine.load_seconds:.2f}s")

    if include_ray:
        from sdray.batch.job import ensure_ray

        ensure_ray()
        startup = _actor_startup_seconds(config, engine.model_name)
        run = _ray_pipeline(config, requests, cores, engine.device)
        summary = run.summary
        steady = run.steady_rate()
        end_to_end = summary.ok / summary.wall_seconds
        generate_rate = summary.images_per_second
        lines.append(
            f"  {'(c) Ray Data pipeline':<24} {generate_rate:8.2f} images/s  ratio "
            f"{generate_rate / base:5.2f}  (generate phase, incl. actor start-up; "
            f"{run.actors} model actors)"
        )
        if steady:
            lines.append(
                f"  {'(c) steady state':<24} {steady:8.2f} images/s  ratio {steady / base:5.2f}"
                "  (shard commits between the first and last tenth of the run)"
            )
        lines.append(
            f"  {'(c) end to end':<24} {end_to_end:8.2f} images/s  ratio {end_to_end / base:5.2f}"
            f"  (wall {summary.wall_seconds:.1f}s incl. planning "
            f"{summary.manifest['timings']['plan_s']:.1f}s)"
        )
        lines.append(
            f"  actor start-up: {startup:.2f}s; peak RSS of Ray workers: "
            f"{run.processes.peak_mb:.0f} MB"
        )
        times = sorted(run.commits)
        if times:
            tenth = [times[round(len(times) * q) - 1] for q in (0.1, 0.5, 0.9)]
            lines.append(
                f"  {len(times)} shard commits at {times[0]:.1f}s, 10% {tenth[0]:.1f}s, "
                f"50% {tenth[1]:.1f}s, 90% {tenth[2]:.1f}s, last {times[-1]:.1f}s of the run"
            )
        lines += _accounting(run, cores)
        figures.update(
            {
                "(c) generate": {"images_per_s": generate_rate, "ratio": generate_rate / base},
                "(c) steady": {"images_per_s": steady, "ratio": steady / base if steady else None},
                "(c) end_to_end": {"images_per_s": end_to_end, "ratio": end_to_end / base},
                "actor_startup_s": startup,
                "ray_workers_peak_rss_mb": run.processes.peak_mb,
                "ray_cpu_s": run.processes.cpu_s,
                "wall_s": summary.wall_seconds,
            }
        )
        if scaling and engine.device == "cpu" and run.actors > 1:
            alone = _ray_pipeline(config, requests, cores, engine.device, actors=1)
            single = alone.steady_rate()
            if steady and single:
                factor = steady / single
                lines.append(
                    f"  scaling: {run.actors} actors {steady:.2f} images/s vs 1 actor "
                    f"{single:.2f} images/s: {factor:.2f}x ({factor / run.actors:.0%} of "
                    f"{run.actors}x)"
                )
                figures["scaling"] = {"actors": run.actors, "one_actor": single, "factor": factor}
                # The same engine in separate one-thread processes, without Ray: what this
                # machine's cores give (shared caches, SMT siblings, a busy host).
                alone_rates = process_scaling(config, 1)  # alone, together, alone again:
                together = sum(process_scaling(config, run.actors))  # the host's drift
                alone_rates += process_scaling(config, 1)  # evens out
                machine = together / (sum(alone_rates) / 2)
                lines.append(
                    f"  the machine itself: {run.actors} one-thread engine processes without Ray "
                    f"{together:.2f} images/s vs 1 process {sum(alone_rates) / 2:.2f}: "
                    f"{machine:.2f}x; the pipeline's scaling is {factor / machine:.0%} of that"
                )
                figures["scaling"]["machine_factor"] = machine
    return figures
