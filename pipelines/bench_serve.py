"""Serving benchmark: throughput and p50/p95/p99 latency at 1, 4 and 16 concurrent clients, with
request batching on and off, and Serve's overhead per request (latency minus engine time).

    python pipelines/bench_serve.py --set serve.max_batch_size=8 --output bench-serve.json
    python pipelines/bench_serve.py --url http://127.0.0.1:8000 --api-key $KEY   # a running server

Deploys the app on a local Ray (or $RAY_ADDRESS) on loopback with batching on, then off, one
app at a time (so one GPU is enough), in ABBA order over rounds so both modes see the same
machine; every load run is bounded by a request count and a time limit. Deletes only its own
Serve apps. Prints a table to stderr and the figures as JSON.
"""

import argparse
import os

from serve_load import bench_serve, bench_url, dump  # beside this script

from sdray.config import load_config

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of all levels")
    parser.add_argument("--requests", type=int, help="per load run (default max(20, 5 x clients))")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per load run")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--port", type=int, default=8000, help="loopback port to deploy on")
    parser.add_argument("--url", help="benchmark this running server instead of deploying")
    parser.add_argument("--api-key", default=os.environ.get("SDRAY_API_KEY"))
    parser.add_argument("--output", help="write the figures as JSON here (default: stdout)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    common = dict(
        concurrencies=tuple(args.concurrency),
        rounds=args.rounds,
        requests=args.requests,
        time_limit_s=args.time_limit,
        width=width,
        height=height,
        steps=args.steps,
    )
    if args.url:
        results = bench_url(args.url, api_key=args.api_key, **common)
    else:
        config = load_config(args.config, args.overrides)
        results = bench_serve(config, port=args.port, **common)
    dump(results, args.output)
