"""A bounded closed-loop load generator for the HTTP API, and the serving benchmark built on it.

Each load run has `concurrency` clients sending requests back to back until a fixed request
count or a time limit is reached. Latency is measured at the client; engine time, queue time and
batch size come from the replica's x-sdray-* response headers, so Serve's own overhead per
request is latency minus engine time.

The benchmark deploys batching on and off side by side and alternates short rounds between them,
so both modes see the same (shared, noisy) machine; it reports medians over rounds.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sdray.config import SdrayConfig
from sdray.serve.api import BATCH_SIZE, ENGINE_MS, QUEUE_MS


@dataclass
class Sample:
    """One request as the client saw it."""

    status: int | str
    latency_s: float
    engine_s: float | None = None
    queue_s: float | None = None
    batch_size: int | None = None


@dataclass
class LoadRun:
    """The requests of one bounded load run at one concurrency."""

    concurrency: int
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        ok = sum(1 for s in self.samples if s.status == 200)
        return ok / self.wall_s if self.wall_s else 0.0


def summarize(runs: list[LoadRun]) -> dict[str, Any]:
    """Median throughput over runs; latency, engine time and overhead (ms) over all requests."""
    samples = [s for run in runs for s in run.samples]
    ok = [s for s in samples if s.status == 200]
    timed = [s for s in ok if s.engine_s is not None]
    rates = [run.throughput for run in runs]
    return {
        "concurrency": runs[0].concurrency,
        "rounds": len(runs),
        "requests": len(samples),
        "ok": len(ok),
        "failed": dict(Counter(str(s.status) for s in samples if s.status != 200)),
        "throughput_rps": round(statistics.median(rates), 3),
        "throughput_rps_rounds": [round(rate, 3) for rate in rates],
        "latency_ms": _percentiles([s.latency_s * 1000 for s in ok]),
        "engine_ms_p50": _median([s.engine_s * 1000 for s in timed]),
        "overhead_ms": _percentiles([(s.latency_s - s.engine_s) * 1000 for s in timed]),
        "queue_ms_p50": _median([s.queue_s * 1000 for s in timed if s.queue_s is not None]),
        "mean_batch_size": (
            round(statistics.fmean(s.batch_size for s in timed), 2) if timed else None
        ),
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99: always an observed value."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


async def run_load(
    url: str,
    bodies: list[dict[str, Any]],
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    headers: dict[str, str] | None = None,
    request_timeout_s: float = 120.0,
    transport: Any = None,
) -> LoadRun:
    """POST `requests` bodies (cycling through `bodies`) with `concurrency` clients, stopping
    early at `time_limit_s`; every request has its own timeout, so the run is bounded.
    `transport` (an httpx transport) replaces the network, for tests."""
    import httpx

    issued = 0
    run = LoadRun(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    deadline = started + time_limit_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            sent = time.perf_counter()
            try:
                response = await http.post(url, json=body)
            except httpx.HTTPError as error:
                run.samples.append(Sample(type(error).__name__, time.perf_counter() - sent))
                continue
            sample = Sample(response.status_code, time.perf_counter() - sent)
            if response.status_code == 200:
                sample.engine_s = float(response.headers[ENGINE_MS]) / 1000
                sample.queue_s = float(response.headers[QUEUE_MS]) / 1000
                sample.batch_size = int(response.headers[BATCH_SIZE])
            run.samples.append(sample)

    async with httpx.AsyncClient(
        headers=headers, timeout=request_timeout_s, limits=limits, transport=transport
    ) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    return run


def request_bodies(
    count: int, *, width: int, height: int, steps: int, n: int = 1
) -> list[dict[str, Any]]:
    """Distinct compatible Images API requests (own prompt and seed, shared parameters)."""
    return [
        {
            "prompt": f"a lighthouse on a cliff at dusk, variation {i}",
            "seed": i,
            "n": n,
            "size": f"{width}x{height}",
            "steps": steps,
        }
        for i in range(count)
    ]


def compare(
    urls: dict[str, str],
    *,
    concurrencies: tuple[int, ...],
    rounds: int,
    requests: int | None,
    time_limit_s: float,
    bodies: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Warm every server up, then per concurrency alternate rounds between them (ABBA order)."""
    endpoints = {label: f"{url.rstrip('/')}/v1/images/generations" for label, url in urls.items()}
    for url in endpoints.values():
        asyncio.run(
            run_load(url, bodies, concurrency=2, requests=6, time_limit_s=60, headers=headers)
        )
    print(HEADER, file=sys.stderr, flush=True)
    results = []
    for concurrency in concurrencies:
        count = requests or max(20, 5 * concurrency)
        runs: dict[str, list[LoadRun]] = {label: [] for label in endpoints}
        for round_index in range(rounds):
            order = list(endpoints) if round_index % 2 == 0 else list(endpoints)[::-1]
            for label in order:
                run = asyncio.run(
                    run_load(
                        endpoints[label],
                        bodies,
                        concurrency=concurrency,
                        requests=count,
                        time_limit_s=time_limit_s,
                        headers=headers,
                    )
                )
                runs[label].append(run)
        for label, label_runs in runs.items():
            summary = {"mode": label, **summarize(label_runs)}
            print(format_row(summary), file=sys.stderr, flush=True)
            results.append(summary)
    return results


HEADER = (
    f"{'mode':<10} {'clients':>7} {'ok':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} "
    f"{'engine':>7} {'ovh p50':>7} {'ovh p95':>7} {'queue':>7} {'batch':>6}"
)


def format_row(s: dict[str, Any]) -> str:
    """One table row: median req/s; latencies, engine time, overhead and queue time in ms."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    batch = "-" if s["mean_batch_size"] is None else f"{s['mean_batch_size']:.2f}"
    failed = f"  failed={s['failed']}" if s["failed"] else ""
    return (
        f"{s['mode']:<10} {s['concurrency']:>7} {s['ok']:>5} {s['throughput_rps']:>7.2f} "
        f"{ms(s['latency_ms']['p50']):>7} {ms(s['latency_ms']['p95']):>7} "
        f"{ms(s['latency_ms']['p99']):>7} {ms(s['engine_ms_p50']):>7} "
        f"{ms(s['overhead_ms']['p50']):>7} {ms(s['overhead_ms']['p95']):>7} "
        f"{ms(s['queue_ms_p50']):>7} {batch:>6}{failed}"
    )


def batching_gain(results: list[dict[str, Any]], on: str, off: str) -> dict[str, float]:
    """Median throughput with batching on over off, per concurrency."""
    rates: dict[str, dict[int, float]] = {on: {}, off: {}}
    for row in results:
        if row["mode"] in rates:
            rates[row["mode"]][row["concurrency"]] = row["throughput_rps"]
    return {
        str(c): round(rate / rates[off][c], 2) for c, rate in rates[on].items() if rates[off].get(c)
    }


def bench_serve(
    config: SdrayConfig,
    *,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    rounds: int = 3,
    requests: int | None = None,
    time_limit_s: float = 120.0,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
    port: int = 8000,
) -> dict[str, Any]:
    """Deploy the app twice on loopback, batching on (serve.max_batch_size) and off (1), and load
    both alike; returns every figure. Auth is off for the benchmark's own deployments."""
    import ray
    from ray import serve

    from sdray.serve.server import build_application, http_options

    on, off = f"batch={config.serve.max_batch_size}", "batch=1"
    unbatched = config.model_copy(
        update={"serve": config.serve.model_copy(update={"max_batch_size": 1})}
    )
    apps = {on: ("bench-batched", config), off: ("bench-unbatched", unbatched)}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options=http_options(config, "127.0.0.1", port))
        for name, app_config in apps.values():
            serve.run(build_application(app_config), name=name, route_prefix=f"/{name}")
        results = compare(
            {label: f"http://127.0.0.1:{port}/{name}" for label, (name, _) in apps.items()},
            concurrencies=concurrencies,
            rounds=rounds,
            requests=requests,
            time_limit_s=time_limit_s,
            bodies=request_bodies(256, width=width, height=height, steps=steps),
        )
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return {
        "workload": {"width": width, "height": height, "steps": steps, "n": 1},
        "model": config.model.source,
        "serve": config.serve.model_dump(),
        "levels": results,
        "batching_gain": batching_gain(results, on, off),
    }


def bench_url(
    url: str,
    *,
    api_key: str | None = None,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    rounds: int = 3,
    requests: int | None = None,
    time_limit_s: float = 120.0,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
) -> dict[str, Any]:
    """Load a server that is already running, however it is configured."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    results = compare(
        {"remote": url},
        concurrencies=concurrencies,
        rounds=rounds,
        requests=requests,
        time_limit_s=time_limit_s,
        bodies=request_bodies(256, width=width, height=height, steps=steps),
        headers=headers,
    )
    return {"workload": {"width": width, "height": height, "steps": steps}, "levels": results}


def dump(results: dict[str, Any], path: str | None) -> None:
    """Write the figures as JSON (to stdout when path is None)."""
    text = json.dumps(results, indent=2)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
