"""Sweep benchmarks: streaming expansion of a 10M-row sweep, and homogeneous batch ordering.

    python pipelines/bench_sweep.py expand  [--rows 10000000] [--mode grid|noseed|random|materialized]
    python pipelines/bench_sweep.py batching [--samples 128] [--size 128] [--repeats 3]

`expand` runs each mode in a fresh process and prints its wall time and peak RSS (the RSS high
water mark from getrusage, with the mark reached just by importing as the baseline).
`noseed` is a grid without a seed axis (each prompt's seed derived once and shared by its rows);
`materialized` builds the grid's rows as one in-memory table, for comparison.

`batching` generates one mixed sweep (random draws over guidance, steps, scheduler and width;
16 batch keys) with batch.sort_by_shape on and off, alternating, through `run_sweep` (the CLI's
path), and also times the engine alone on the same rows in file order vs sorted by batch key.
Each run also reports the time spent after generation (contact sheets, thumbnails, page).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def expansion_spec(rows: int, mode: str) -> dict:
    """A spec with `rows` rows: 1000 prompts x 100 combinations-per-seed x seeds (grid), 1000
    prompts x 20 x rows/20000 steps values (noseed), or 1000 prompts x rows/1000 random draws
    from a ~10^13-combination grid (random)."""
    prompts = [f"prompt number {i}, a detailed photograph" for i in range(1000)]
    per_prompt = rows // len(prompts)
    if mode == "noseed":
        return {
            "name": "bench-noseed",
            "prompts": prompts,
            "axes": {
                "guidance_scale": [1.0, 3.0, 5.0, 7.5, 9.0],
                "scheduler": ["ddim", "euler", "dpmpp_2m", "unipc"],
                "steps": {"start": 1, "stop": 1 + max(1, per_prompt // 20)},
            },
        }
    if mode == "random":
        return {
            "name": "bench-random",
            "prompts": prompts,
            "mode": "random",
            "samples": per_prompt,
            "seed": 1,
            "axes": {
                "guidance_scale": {"start": 1, "stop": 15, "step": 0.5},
                "steps": {"start": 10, "stop": 100},
                "scheduler": ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "unipc"],
                "seed": {"start": 0, "stop": 2**32},
            },
        }
    return {
        "name": "bench-grid",
        "prompts": prompts,
        "negative_prompt": "blurry",
        "axes": {
            "guidance_scale": [1.0, 3.0, 5.0, 7.5, 9.0],
            "steps": {"start": 10, "stop": 60, "step": 10},
            "scheduler": ["ddim", "euler", "dpmpp_2m", "unipc"],
            "seed": {"start": 0, "stop": max(1, per_prompt // 100)},
        },
    }


def expand_child(rows: int, mode: str, output: str) -> dict:
    """One measurement, in this process: plan + stream to Parquet (or build in memory)."""
    import pyarrow as pa

    from sdray.sweep import plan_expansion, spec_from_dict, write_expansion

    spec = spec_from_dict(expansion_spec(rows, "grid" if mode == "materialized" else mode))
    baseline = _peak_mib()
    started = time.perf_counter()
    expansion = plan_expansion(spec)
    if mode == "materialized":
        table = pa.concat_tables(expansion.chunks())
        written, size = table.num_rows, table.nbytes
    else:
        written = write_expansion(expansion, output)
        size = os.path.getsize(output)
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "rows": written,
        "seconds": round(seconds, 2),
        "rows_per_s": round(written / seconds),
        "baseline_rss_mib": round(baseline),
        "peak_rss_mib": round(_peak_mib()),
        "bytes": size,
    }


def bench_expand(args) -> None:
    """Each mode in a fresh process, so every peak RSS is its own."""
    with tempfile.TemporaryDirectory() as scratch:
        for mode in args.mode:
            output = str(Path(scratch) / f"{mode}.parquet")
            command = [sys.executable, __file__, "expand-child", str(args.rows), mode, output]
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if result.returncode:
                sys.exit(result.stderr)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"{figures['mode']:>12}: {figures['rows']:,} rows in {figures['seconds']}s "
                f"({figures['rows_per_s']:,} rows/s); peak RSS {figures['peak_rss_mib']} MiB "
                f"(after imports {figures['baseline_rss_mib']} MiB); "
                f"{'in memory' if mode == 'materialized' else 'file'} "
                f"{figures['bytes'] / 2**20:.0f} MiB",
                flush=True,
            )


MIXED_SPEC = """
name: mixed-batching
prompts: ["a red fox in the snow", "a lighthouse at dusk"]
mode: random
samples: {samples}
seed: 3
axes:
  guidance_scale: [1.0, 7.5]
  steps: [4, 8]
  scheduler: [ddim, euler]
  width: [{size}, {wide}]
  height: {size}
  seed: {{start: 0, stop: 1000000}}
"""


def bench_engine(table_path: str, batch_size: int, repeats: int, rows: int = 128) -> None:
    """The engine alone on the sweep's first rows, in batches of `batch_size`: file order vs
    sorted."""
    import pyarrow.parquet as pq

    from sdray.config import GenerationConfig, ModelConfig
    from sdray.engine import DiffusionEngine, group_compatible
    from sdray.requests import BATCH_KEY_COLUMN, prepare_table, request_from_row

    prepared = prepare_table(pq.read_table(table_path), GenerationConfig()).slice(0, rows)
    orders = {
        "file order": prepared,
        "sorted": prepared.sort_by(BATCH_KEY_COLUMN),
    }
    engine = DiffusionEngine.from_config(
        ModelConfig(source="tiny", device="cpu"), max_batch_size=batch_size, torch_threads=1
    )  # one thread, as in a model actor holding one CPU
    engine.generate([request_from_row(prepared.slice(0, 1).to_pylist()[0])])  # warm up
    timings: dict[str, list[float]] = {name: [] for name in orders}
    calls = {}
    for _ in range(repeats):
        for name, table in orders.items():
            requests = [request_from_row(r) for r in table.to_pylist()]
            batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
            calls[name] = sum(len(group_compatible(b, batch_size)) for b in batches)
            started = time.perf_counter()
            for batch in batches:
                engine.generate(batch)
            timings[name].append(len(requests) / (time.perf_counter() - started))
    for name, rates in timings.items():
        print(
            f"  engine, {name:>10}: {calls[name]} denoising batches for {prepared.num_rows} "
            f"images; median {statistics.median(rates):.2f} images/s "
            f"(runs: {', '.join(f'{r:.2f}' for r in rates)})",
            flush=True,
        )


def bench_batching(args) -> None:
    """The mixed sweep through run_sweep with sort_by_shape on and off, alternating."""
    import ray

    from sdray.config import load_config
    from sdray.sweep import run_sweep

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    rates: dict[bool, list[float]] = {True: [], False: []}
    walls: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch) / "mixed.yaml"
        spec.write_text(
            MIXED_SPEC.format(samples=args.samples, size=args.size, wide=args.size + args.size // 2)
        )
        for repeat in range(args.repeats):
            for on in (True, False):
                config = load_config(
                    None,
                    [
                        f"batch.sort_by_shape={str(on).lower()}",
                        f"batch.batch_size={args.batch_size}",
                        "batch.min_actors=2",
                        "batch.max_actors=2",
                    ],
                )
                output = str(Path(scratch) / f"out-{on}-{repeat}")
                started = time.perf_counter()
                summary = run_sweep(str(spec), output, config, progress=False)
                wall = time.perf_counter() - started
                timings = summary.manifest["timings"]
                rates[on].append(summary.job.images_per_second)
                walls[on].append(timings["generate_s"])
                print(
                    f"  sort_by_shape={on!s:>5}: {summary.ok} images, generate "
                    f"{timings['generate_s']:.1f}s, {summary.job.images_per_second:.2f} images/s; "
                    f"sweep {wall:.1f}s, of which {summary.sheets} sheets + thumbnails + page "
                    f"{wall - timings['wall_s']:.1f}s",
                    flush=True,
                )
        print(
            f"ray job, {2 * args.samples} images, batch_size {args.batch_size}: median "
            f"{statistics.median(rates[True]):.2f} images/s sorted vs "
            f"{statistics.median(rates[False]):.2f} unsorted "
            f"(x{statistics.median(rates[True]) / statistics.median(rates[False]):.2f}); median "
            f"generate {statistics.median(walls[True]):.1f}s vs "
            f"{statistics.median(walls[False]):.1f}s",
            flush=True,
        )
        bench_engine(str(Path(scratch) / "out-True-0" / "sweep.parquet"), args.batch_size, 3)


def main() -> None:
    """Parse arguments and run one benchmark."""
    if len(sys.argv) > 1 and sys.argv[1] == "expand-child":
        rows, mode, output = sys.argv[2:5]
        print(json.dumps(expand_child(int(rows), mode, output)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    expand = commands.add_parser("expand", help="stream a large sweep to Parquet")
    expand.add_argument("--rows", type=int, default=10_000_000)
    expand.add_argument(
        "--mode",
        action="append",
        choices=["grid", "noseed", "random", "materialized"],
        help="repeatable; default: grid, noseed and random",
    )
    batching = commands.add_parser("batching", help="sort_by_shape on vs off on a mixed sweep")
    batching.add_argument("--samples", type=int, default=128, help="draws per prompt (2 prompts)")
    batching.add_argument("--size", type=int, default=128, help="height; widths size, 1.5 size")
    batching.add_argument("--repeats", type=int, default=3)
    batching.add_argument("--batch-size", type=int, default=8)
    batching.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    if args.command == "expand":
        args.mode = args.mode or ["grid", "noseed", "random"]
        bench_expand(args)
    else:
        bench_batching(args)


if __name__ == "__main__":
    main()
