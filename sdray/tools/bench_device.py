"""`sdray bench --suite device`: how busy the batch pipeline keeps a GPU, measured on any machine.

The model actor's engine is replaced by a STAND-IN device (`StandInEngine`): per engine batch it
holds the "device" for a set time without holding the GIL (as a CUDA launch and synchronize
do: `time.sleep`), then returns pixels of the rows' real size, so everything around the model
(reading, calls, Arrow and the object store, encoding, writing, commits) runs for real at GPU
sizes and rates. The rates are those of one H200 in `pipelines/results/bench_gpu_h200.json`:
SD 1.5 at 512x512, 8 images per 1.2 s, and SDXL at 1024x1024, 2 images per 1.35 s.

A model actor's *device busy fraction* is the share of time its device holds a batch: in
steady state (between the starts of its first and last tenth of batches) and end to end (its
busy time over the job's wall time from launch). It is the pipeline's efficiency: 1.0 is a GPU
that never waits for the pipeline.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdray.batch.stages import GenerateStage
from sdray.config import SdrayConfig, config_from_dict


@dataclass(frozen=True)
class DeviceShape:
    """A device's rate at one model shape: `batch` images of `size`² per `seconds` per batch."""

    name: str
    size: int
    batch: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


# One H200, bfloat16 and compiled (README "Speed"): the rates a real actor pool has to keep up.
SHAPES = {
    "sd15": DeviceShape("sd15", 512, 8, 1.2),
    "sdxl": DeviceShape("sdxl", 1024, 2, 1.35),
}
BUSY_TARGET = 0.97  # steady-state busy fraction the pipeline must reach (issue 23)
END_TO_END_TARGET = 0.9  # and the job's rate against the devices' own, from launch


def parse_shape(text: str) -> DeviceShape:
    """`sd15`, `sdxl`, or `SIZE:BATCH:SECONDS` (e.g. `2048:1:4.0`)."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        size, batch, seconds = text.split(":")
        return DeviceShape(text, int(size), int(batch), float(seconds))
    except ValueError:
        raise ValueError(
            f"device shape {text!r}: give {', '.join(SHAPES)} or SIZE:BATCH:SECONDS"
        ) from None


def texture(size: int, variant: int) -> np.ndarray:
    """A size x size x 3 picture with the statistics of a photograph rather than of noise (so
    PNG and JPEG cost what they cost on real images): smooth shapes, fine grain."""
    from PIL import Image

    rng = np.random.default_rng(variant)
    coarse = rng.integers(0, 256, (max(2, size // 32),) * 2 + (3,), np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.int16)
    grain = rng.integers(-3, 4, smooth.shape, np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


class StandInEngine:
    """STAND-IN for `DiffusionEngine`: no model. Each batch of up to `shape.batch` rows of one
    size holds the device for `shape.seconds` (sleeping: the GIL is free, as during a CUDA
    kernel), then returns each row's pixels at its own size (a picture picked and shifted by
    its seed: the same seed gives the same image). Every hold is logged to `log_dir`."""

    def __init__(self, shape: DeviceShape, log_dir: str | None = None) -> None:
        self.shape = shape
        self.max_batch_size = shape.batch
        self.device = "stand-in"
        self.lock = threading.Lock()  # one device: batches never overlap on it
        self.pictures: dict[tuple[int, int], list[np.ndarray]] = {}
        self.log = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.log = open(Path(log_dir) / f"holds-{os.getpid()}.jsonl", "a")  # noqa: SIM115

    def _picture(self, width: int, height: int, seed: int) -> np.ndarray:
        if (width, height) not in self.pictures:
            side = max(width, height)
            bank = [texture(side, v)[:height, :width] for v in range(4)]
            self.pictures[(width, height)] = bank
        base = self.pictures[(width, height)][seed % 4]
        return np.roll(base, seed % height, axis=0)  # a copy, as a device-to-host copy is

    def generate(self, requests, on_preview=None):
        from sdray.engine import GenerationResult, group_compatible

        results = [None] * len(requests)
        for indices in group_compatible(requests, self.max_batch_size):
            with self.lock:
                started = time.time()
                time.sleep(self.shape.seconds)
                ended = time.time()
            if self.log is not None:
                self.log.write(json.dumps([started, ended, len(indices)]) + "\n")
                self.log.flush()
            for index in indices:
                request = requests[index]
                image = self._picture(request.width, request.height, request.seed)
                previews = [(step, image.copy()) for step in request.preview_at]
                results[index] = GenerationResult(request, image, False, previews=previews)
        return results


class StandInGenerateStage(GenerateStage):
    """The model actor with a STAND-IN device (`StandInEngine`) in place of the model; all
    else is the real model actor."""

    def __init__(self, *args, shape: DeviceShape, log_dir: str | None = None, **kwargs) -> None:
        self.shape, self.log_dir = shape, log_dir
        super().__init__(*args, **kwargs)

    def load_engine(self, model, batch_size, torch_threads, storage_options, model_sha256):
        return StandInEngine(self.shape, self.log_dir)


def stand_in_stage(shape: DeviceShape, log_dir: str | None = None):
    """The model actor class for `run_generate(generate_stage=...)`."""
    return functools.partial(StandInGenerateStage, shape=shape, log_dir=log_dir)


# ---------------------------------------------------------------------------------------------
# The measurement.


def read_holds(log_dir: str) -> dict[str, list[tuple[float, float, int]]]:
    """Each stand-in actor's device holds: (start, end, rows), by process."""
    holds = {}
    for path in sorted(Path(log_dir).glob("holds-*.jsonl")):
        rows = [tuple(json.loads(line)) for line in path.read_text().splitlines() if line]
        if rows:
            holds[path.stem.removeprefix("holds-")] = sorted(rows)
    return holds


def busy_fractions(
    holds: list[tuple[float, float, int]], launched: float, finished: float
) -> dict[str, float | None]:
    """One actor's busy fraction in steady state (from the start of its first tenth of holds
    to the start of its last tenth) and end to end (busy time over launch to finish)."""
    busy = sum(end - start for start, end, _ in holds)
    steady = None
    if len(holds) >= 10:
        first, last = round(len(holds) * 0.1), round(len(holds) * 0.9)
        window = holds[last][0] - holds[first][0]
        held = sum(end - start for start, end, _ in holds[first:last])
        steady = held / window if window > 0 else None
    return {
        "steady": None if steady is None else round(steady, 4),
        "end_to_end": round(busy / (finished - launched), 4),
        "busy_s": round(busy, 2),
        "batches": len(holds),
    }


def encode_seconds(shape: DeviceShape, image_format: str) -> float:
    """CPU seconds to encode one stand-in image of the shape's size (median of 5)."""
    from sdray.images import encode_image

    picture = texture(shape.size, 0)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        encode_image(picture, image_format, "parameters", 95)
        times.append(time.perf_counter() - started)
    return sorted(times)[2]


def job_config(
    shape: DeviceShape, *, actors: int, overrides: list[str] | tuple[str, ...] = ()
) -> SdrayConfig:
    """The job the stand-in runs: the shape's size and batch, `actors` model actors with a
    quarter CPU each (a stand-in device takes no CPU while it works), then `--set` overrides
    (`output.format`, `output.image_format`, ...)."""
    return config_from_dict(
        {
            "model": {"source": "tiny"},  # the identity the driver records; never loaded
            "generation": {"width": shape.size, "height": shape.size, "steps": 1},
            "batch": {
                "batch_size": shape.batch,
                "min_actors": actors,
                "max_actors": actors,
                "num_cpus_per_actor": 0.25,
            },
        },
        overrides,
    )


def run_device_bench(
    shape: DeviceShape,
    *,
    device_seconds: float = 600.0,
    actors: int = 2,
    overrides: list[str] | tuple[str, ...] = (),
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Run a job of `device_seconds` of device work (over all actors) through the pipeline
    with stand-in devices; print and return each actor's busy fractions, the job's rate
    against the devices' own, the first commit, peak memory, and where the CPU went."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdray.batch.job import ensure_ray, run_generate
    from sdray.tools.bench import _accounting, _RayProcesses

    config = job_config(shape, actors=actors, overrides=overrides)
    output_format, image_format = config.output.format, config.output.image_format
    batches = max(actors, round(device_seconds / shape.seconds))
    rows = batches * shape.batch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"sdray bench --suite device: STAND-IN {shape.name} device ({shape.size}x{shape.size}, "
        f"{shape.batch} images per {shape.seconds:.2f} s = {shape.images_per_s:.2f} images/s "
        f"each), {actors} model actors, {rows} rows ({batches * shape.seconds:.0f} s of device "
        f"work), {output_format}/{image_format}, {cores} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sdray-device-", dir=work_dir) as tmp:
        pq.write_table(
            pa.table(
                {
                    "id": [f"r{i:07d}" for i in range(rows)],
                    "prompt": [f"a picture, variation {i}" for i in range(rows)],
                }
            ),
            os.path.join(tmp, "prompts.parquet"),
        )
        logs = os.path.join(tmp, "holds")
        ensure_ray()
        launched = time.time()
        with _RayProcesses() as processes:
            summary = run_generate(
                os.path.join(tmp, "prompts.parquet"),
                os.path.join(tmp, "out"),
                config,
                progress=False,
                generate_stage=stand_in_stage(shape, logs),
            )
        finished = time.time()
        holds = read_holds(logs)
    manifest = summary.manifest
    per_actor = {pid: busy_fractions(h, launched, finished) for pid, h in holds.items()}
    device_rate = actors * shape.images_per_s
    wall = finished - launched
    figures: dict[str, Any] = {
        "shape": asdict(shape),
        "actors": actors,
        "rows": rows,
        "cores": cores,
        "output": f"{output_format}/{image_format}",
        "rows_per_shard": manifest["rows_per_unit"],
        "wall_s": round(wall, 2),
        "images_per_s": round(summary.ok / wall, 4),
        "end_to_end_ratio": round(summary.ok / wall / device_rate, 4),
        "first_commit_s": manifest["startup"].get("first_committed"),
        "first_actor_ready_s": manifest["startup"].get("first_actor_ready"),
        "per_actor": per_actor,
        # private memory (the object store's shared pages left out), once ready and at peak
        "actor_peak_mb": {a["pid"]: a.get("peak_mb") for a in manifest.get("actors", [])},
        "actor_ready_mb": {a["pid"]: a.get("ready_mb") for a in manifest.get("actors", [])},
        "cpu_s": {k: round(v, 1) for k, v in processes.cpu_s.items()},
    }
    steady = [a["steady"] for a in per_actor.values() if a["steady"] is not None]
    figures["steady_min"] = min(steady) if steady else None
    for pid, busy in sorted(per_actor.items()):
        peak, ready = figures["actor_peak_mb"], figures["actor_ready_mb"]
        print(
            f"  model actor {pid}: device busy {busy['steady']} steady, {busy['end_to_end']} "
            f"end to end ({busy['batches']} batches, {busy['busy_s']} s busy); private "
            f"memory {ready.get(int(pid))} MB when ready, {peak.get(int(pid))} MB at peak"
        )
    print(
        f"  job: {summary.ok} images in {wall:.1f} s = {figures['images_per_s']:.3f} images/s, "
        f"{figures['end_to_end_ratio']:.3f}x the devices' own {device_rate:.3f} images/s; "
        f"shards of {figures['rows_per_shard']} rows; first commit {figures['first_commit_s']} s "
        f"after launch (first model actor ready at {figures['first_actor_ready_s']} s)"
    )
    for line in _accounting(_Run(summary, processes), cores):
        print(line)
    figures["bottleneck"] = bottleneck(figures, shape, image_format, cores)
    if figures["bottleneck"]:
        print(f"  {figures['bottleneck']}")
    return figures


@dataclass
class _Run:  # what `sdray.tools.bench._accounting` reads of a run
    summary: Any
    processes: Any


def bottleneck(figures: dict[str, Any], shape: DeviceShape, image_format: str, cores: int):
    """Where the devices were held back (steady busy below `BUSY_TARGET`, or the job's rate
    below `END_TO_END_TARGET` of theirs): with the machine's cores mostly busy, the stage that
    took most of them (and, for the encode and write tasks, what encoding one image costs);
    else the busiest part of the run. None when neither is below its target."""
    steady, ratio = figures["steady_min"], figures["end_to_end_ratio"]
    if (steady is None or steady >= BUSY_TARGET) and ratio >= END_TO_END_TARGET:
        return None
    cpu = figures["cpu_s"]
    held = f"busy {steady} steady, the job at {ratio}x the devices' rate"
    if not cpu:
        return f"held back ({held})"
    busiest, seconds = max(cpu.items(), key=lambda item: item[1])
    capacity = cores * figures["wall_s"]
    used = sum(cpu.values()) / capacity
    share = f"{seconds / capacity:.0%} of the {cores} cores"
    if used < 0.8:
        return f"held back with CPU to spare ({held}): the busiest part was {busiest} ({share})"
    if busiest != "encode and write tasks":
        return f"CPU-bound ({used:.0%} of the {cores} cores busy; {held}): {busiest}, {share}"
    encode = encode_seconds(shape, image_format)
    rate = figures["actors"] * shape.images_per_s
    return (
        f"CPU-bound ({used:.0%} of the {cores} cores busy; {held}): the encode and write "
        f"tasks took {share}; {image_format} at {shape.size}x{shape.size} costs "
        f"{encode * 1000:.0f} ms an image, {encode * rate:.2f} cores at the devices' "
        f"{rate:.2f} images/s"
    )


def run_suite(
    shapes: list[str],
    *,
    device_seconds: float,
    actors: int,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
) -> dict[str, Any]:
    """`sdray bench --suite device`: each shape in turn; the JSON written after each."""
    results: dict[str, Any] = {}
    for name in shapes:
        shape = parse_shape(name)
        results[name] = run_device_bench(
            shape,
            device_seconds=device_seconds,
            actors=actors,
            overrides=overrides,
        )
        if out:
            Path(out).write_text(json.dumps(results, indent=2))
    return results
