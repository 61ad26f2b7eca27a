"""Bookkeeping at scale: plan, write metadata for, and resume a 1,000,000-row job.

    python pipelines/bench_scale.py --rows 1000000

The model actor is replaced by a clearly labelled STAND-IN that generates nothing and only marks
rows ok, so what is measured is sdray's own work: reading, validating, id checks, ordering,
metadata shards, manifest, and the resume anti-join (of an output that lost every other shard,
as an interrupted run would). Each phase runs in a fresh driver process so its peak RSS is its
own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa


class StandInGenerateStage:
    """STAND-IN for the model actor: no model, no images; rows stay ok with no pixels."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        from sdray.batch.stages import PIXELS_COLUMN

        n = batch.num_rows
        batch = batch.append_column("model", pa.array(["stand-in"] * n, pa.string()))
        batch = batch.append_column("truncated", pa.array([False] * n, pa.bool_()))
        return batch.append_column(PIXELS_COLUMN, pa.nulls(n, pa.binary()))


def write_prompts(directory: Path, rows: int, files: int = 8) -> None:
    import pyarrow.parquet as pq

    per_file = rows // files
    for f in range(files):
        start = f * per_file
        n = per_file if f < files - 1 else rows - start
        ids = [f"row-{i:08d}" for i in range(start, start + n)]
        pq.write_table(
            pa.table(
                {"id": ids, "prompt": [f"a prompt about item {i}" for i in range(start, start + n)]}
            ),
            directory / f"part-{f:02d}.parquet",
        )


def phase(input_uri: str, output_uri: str, resume: bool) -> dict:
    """One driver run; returns its figures (called in a child process)."""
    from sdray.batch import run_generate
    from sdray.config import load_config

    config = load_config(
        None,
        [
            "batch.batch_size=20000",
            "batch.min_actors=2",
            "batch.max_actors=2",
            "output.rows_per_shard=50000",
        ],
    )
    started = time.perf_counter()
    summary = run_generate(
        input_uri,
        output_uri,
        config,
        resume=resume,
        overwrite=not resume,
        progress=False,
        generate_stage=StandInGenerateStage,
    )
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "plan_s": summary.manifest["timings"]["plan_s"],
        "rows": summary.rows,
        "written_this_run": summary.manifest["counts"]["generated_this_run"],
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--phase", choices=["run", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.input, args.output, args.phase == "resume")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "prompts"
        inputs.mkdir()
        write_prompts(inputs, args.rows)
        output = Path(tmp) / "out"
        for name in ("run", "resume"):
            if name == "resume":
                # An interrupted run: drop every other committed metadata shard, so the resume
                # anti-joins ~half the ids as committed and writes the other half again.
                shards = sorted((output / "metadata").rglob("*.parquet"))
                for shard in shards[::2]:
                    shard.unlink()
                print(f"dropped {len(shards[::2])} of {len(shards)} metadata shards", flush=True)
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--phase",
                    name,
                    "--input",
                    str(inputs),
                    "--output",
                    str(output),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode:
                sys.exit(child.stderr[-3000:])
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{name:>6} ({args.rows:,} rows, STAND-IN generation): {figures}", flush=True)


if __name__ == "__main__":
    main()
