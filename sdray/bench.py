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


class _WorkerMemory:
    """Peak total RSS of this node's Ray worker processes, sampled in the background."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(proc.info.get("cmdline") or [])
                if "ray::" in cmdline and proc.info.get("memory_info"):
                    total += proc.info["memory_info"].rss
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


def _ray_pipeline(config: SdrayConfig, requests, cores: int, engine_device: str):
    """(c) The whole offline job through Ray Data; returns its summary and workers' peak RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdray.batch.job import run_generate

    job_config = config.model_copy(deep=True)
    if engine_device == "cuda":
        actors = 1  # one GPU, as the in-process loops had
    else:
        actors = max(1, cores)  # one thread each: the same cores as the in-process loops
        job_config.batch.torch_threads = max(1, cores // actors)
        job_config.batch.num_cpus_per_actor = min(job_config.batch.num_cpus_per_actor, 1.0)
    job_config.batch.min_actors = job_config.batch.max_actors = actors
    job_config.output.rows_per_shard = job_config.batch.batch_size
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
        with _WorkerMemory() as memory:
            summary = run_generate(
                os.path.join(tmp, "prompts.parquet"),
                os.path.join(tmp, "out"),
                job_config,
                progress=False,
            )
    return summary, memory.peak_mb


def run_bench(config: SdrayConfig, *, rows: int = 256, include_ray: bool = True) -> dict:
    """Measure (a) diffusers loop, (b) engine, (c) Ray pipeline; print and return the figures."""
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
    started = time.perf_counter()
    _diffusers_loop(engine, requests, batch_size)
    results.append(
        Measurement("(a) diffusers loop", rows, time.perf_counter() - started, _rss_mb())
    )

    started = time.perf_counter()
    for chunk in _chunks(requests, batch_size):
        engine.generate(chunk)
    results.append(Measurement("(b) engine", rows, time.perf_counter() - started, _rss_mb()))

    figures: dict = {
        "rows": rows,
        "batch_size": batch_size,
        "cores": cores,
        "device": engine.device,
        "engine_load_s": engine.load_seconds,
    }
    lines = [
        f"sdray bench: model {engine.model_name} on {engine.device} ({engine.dtype}), {cores} cores, "
        f"{rows} images {gen.width}x{gen.height}, {gen.steps} steps {gen.scheduler}, "
        f"guidance {gen.guidance_scale}, batch {batch_size}",
    ]
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
        summary, worker_mb = _ray_pipeline(config, requests, cores, engine.device)
        # Steady state: the generate phase less one actor start-up (actors start in parallel).
        busy = summary.manifest["timings"]["generate_s"] - startup
        steady = summary.ok / busy if busy > 0 else None
        end_to_end = summary.ok / summary.wall_seconds
        generate_rate = summary.images_per_second
        lines.append(
            f"  {'(c) Ray Data pipeline':<24} {generate_rate:8.2f} images/s  ratio "
            f"{generate_rate / base:5.2f}  (generate phase, incl. actor start-up)"
        )
        if steady:
            lines.append(
                f"  {'(c) steady state':<24} {steady:8.2f} images/s  ratio {steady / base:5.2f}"
                "  (generate phase less actor start-up)"
            )
        lines.append(
            f"  {'(c) end to end':<24} {end_to_end:8.2f} images/s  ratio {end_to_end / base:5.2f}"
            f"  (wall {summary.wall_seconds:.1f}s incl. planning {summary.manifest['timings']['plan_s']:.1f}s)"
        )
        lines.append(
            f"  actor start-up: {startup:.2f}s; peak RSS of Ray workers: {worker_mb:.0f} MB"
        )
        figures.update(
            {
                "(c) generate": {"images_per_s": generate_rate, "ratio": generate_rate / base},
                "(c) steady": {"images_per_s": steady, "ratio": steady / base if steady else None},
                "(c) end_to_end": {"images_per_s": end_to_end, "ratio": end_to_end / base},
                "actor_startup_s": startup,
                "ray_workers_peak_rss_mb": worker_mb,
            }
        )
    print("\n".join(lines), flush=True)
    return figures
