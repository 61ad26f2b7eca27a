"""A bounded closed-loop load generator (httpx clients) for the HTTP API, and the serving
benchmark built on it. A benchmark tool, not part of the installed package: pipelines/bench_serve.py
runs it, and the tests import it from here.

Each load run has `concurrency` clients sending requests back to back until a fixed request
count or a time limit is reached. Latency is measured at the client; engine time, queue time and
batch size come from the replica's x-sdray-* response headers, so the overhead per request is
latency minus engine time, and Serve's own path (HTTP, proxy, routing, PNG encoding) is that
minus the time spent waiting in the replica's batch queue.

The benchmark deploys batching on, then off, one app at a time (a one-GPU machine holds one
replica), in ABBA order over rounds so drift on a shared machine hits both alike; it reports
median throughput over rounds. It deletes only its own apps.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
        "serve_path_ms": _percentiles(
            [(s.latency_s - s.engine_s - (s.queue_s or 0.0)) * 1000 for s in timed]
        ),
        "queue_ms_p50": _median([s.queue_s * 1000 for s in timed if s.queue_s is not None]),
        "mean_batch_size": (
            round(statistics.fmean(s.batch_size for s in timed), 2) if timed else None
        ),
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 (numpy's inverted CDF): always an observed value."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99], method="inverted_cdf")
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}


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


def warm_up(url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
    """A few requests first, so connection setup and first-call costs stay out of the figures."""
    asyncio.run(run_load(url, bodies, concurrency=2, requests=6, time_limit_s=60, headers=headers))


def measure(
    url: str,
    *,
    concurrencies: tuple[int, ...],
    requests: int | None,
    time_limit_s: float,
    bodies: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> dict[int, LoadRun]:
    """One bounded load run per concurrency against one server."""
    runs = {}
    for concurrency in concurrencies:
        count = requests or max(20, 5 * concurrency)
        runs[concurrency] = asyncio.run(
            run_load(
                url,
                bodies,
                concurrency=concurrency,
                requests=count,
                time_limit_s=time_limit_s,
                headers=headers,
            )
        )
    return runs


def report(label: str, runs: list[dict[int, LoadRun]]) -> list[dict[str, Any]]:
    """Summaries of one mode's rounds, one row per concurrency (printed to stderr)."""
    rows = []
    for concurrency in runs[0]:
        summary = {"mode": label, **summarize([r[concurrency] for r in runs])}
        print(format_row(summary), file=sys.stderr, flush=True)
        rows.append(summary)
    return rows


HEADER = (
    f"{'mode':<10} {'clients':>7} {'ok':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} "
    f"{'engine':>7} {'ovh p50':>7} {'ovh p95':>7} {'queue':>7} {'path':>7} {'batch':>6}"
)


def format_row(s: dict[str, Any]) -> str:
    """One table row: median req/s; latency, engine time, overhead (latency - engine), batch
    queue wait and Serve's path (overhead - queue wait), all p50 unless marked, in ms."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    batch = "-" if s["mean_batch_size"] is None else f"{s['mean_batch_size']:.2f}"
    failed = f"  failed={s['failed']}" if s["failed"] else ""
    return (
        f"{s['mode']:<10} {s['concurrency']:>7} {s['ok']:>5} {s['throughput_rps']:>7.2f} "
        f"{ms(s['latency_ms']['p50']):>7} {ms(s['latency_ms']['p95']):>7} "
        f"{ms(s['latency_ms']['p99']):>7} {ms(s['engine_ms_p50']):>7} "
        f"{ms(s['overhead_ms']['p50']):>7} {ms(s['overhead_ms']['p95']):>7} "
        f"{ms(s['queue_ms_p50']):>7} {ms(s['serve_path_ms']['p50']):>7} {batch:>6}{failed}"
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


def round_order(labels: list[str], rounds: int) -> list[str]:
    """Modes in ABBA order over `rounds` (A B, B A, A B, ...), so that drift on a shared machine
    hits both alike; consecutive runs of one mode share a deployment."""
    order: list[str] = []
    for index in range(rounds):
        order.extend(labels if index % 2 == 0 else labels[::-1])
    return order


def bench_serve(
    config: SdrayConfig,
    *,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    rounds: int = 2,
    requests: int | None = None,
    time_limit_s: float = 120.0,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
    port: int = 8000,
) -> dict[str, Any]:
    """Deploy the app on loopback with batching on (serve.max_batch_size) and off (1), one at a
    time, so a one-GPU machine can run it; load each alike and return every figure.

    Only the benchmark's own apps are deleted afterwards: other Serve apps on a shared cluster
    are left running. Auth is off for the benchmark's own deployments.
    """
    import ray
    from ray import serve

    from sdray.serve.server import build_application, http_options, prepare_ingress

    on, off = f"batch={config.serve.max_batch_size}", "batch=1"
    unbatched = config.model_copy(
        update={"serve": config.serve.model_copy(update={"max_batch_size": 1})}
    )
    apps = {on: ("bench-batched", config), off: ("bench-unbatched", unbatched)}
    bodies = request_bodies(256, width=width, height=height, steps=steps)
    prepare_ingress(config)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    deployed: str | None = None
    runs: dict[str, list[dict[int, LoadRun]]] = {label: [] for label in apps}
    try:
        clash = {name for name, _ in apps.values()} & set(serve.status().applications)
        if clash:
            raise RuntimeError(f"Serve apps {sorted(clash)} already run here; delete them first")
        serve.start(http_options=http_options(config, "127.0.0.1", port))
        url = ""
        for label in round_order(list(apps), rounds):
            name, app_config = apps[label]
            if deployed != name:
                if deployed is not None:
                    serve.delete(deployed)
                deployed = name  # deleted in `finally` even if it never comes up
                print(f"deploying {name} ({label})", file=sys.stderr, flush=True)
                serve.run(build_application(app_config), name=name, route_prefix=f"/{name}")
                url = f"http://127.0.0.1:{port}/{name}/v1/images/generations"
                warm_up(url, bodies)
            runs[label].append(
                measure(
                    url,
                    concurrencies=concurrencies,
                    requests=requests,
                    time_limit_s=time_limit_s,
                    bodies=bodies,
                )
            )
    finally:
        if deployed is not None:
            serve.delete(deployed)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    print(HEADER, file=sys.stderr, flush=True)
    results = [row for label, label_runs in runs.items() for row in report(label, label_runs)]
    return {
        "workload": {"width": width, "height": height, "steps": steps, "n": 1},
        "model": config.model.source,
        "serve": config.serve.model_dump(),
        "rounds": rounds,
        "levels": results,
        "batching_gain": batching_gain(results, on, off),
    }


def bench_url(
    url: str,
    *,
    api_key: str | None = None,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    rounds: int = 1,
    requests: int | None = None,
    time_limit_s: float = 120.0,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
) -> dict[str, Any]:
    """Load a server that is already running, however it is configured."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    bodies = request_bodies(256, width=width, height=height, steps=steps)
    endpoint = f"{url.rstrip('/')}/v1/images/generations"
    warm_up(endpoint, bodies, headers)
    runs = [
        measure(
            endpoint,
            concurrencies=concurrencies,
            requests=requests,
            time_limit_s=time_limit_s,
            bodies=bodies,
            headers=headers,
        )
        for _ in range(rounds)
    ]
    print(HEADER, file=sys.stderr, flush=True)
    return {
        "workload": {"width": width, "height": height, "steps": steps},
        "levels": report("remote", runs),
    }


def dump(results: dict[str, Any], path: str | None) -> None:
    """Write the figures as JSON (to stdout when path is None)."""
    text = json.dumps(results, indent=2)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
