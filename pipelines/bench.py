"""Benchmark: plain diffusers loop vs the engine vs the Ray Data pipeline (same as `sdray bench`).

python pipelines/bench.py --rows 256 --set generation.steps=20
"""

import argparse

from sdray.config import load_config
from sdray.tools.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--no-scaling", action="store_true", help="skip the one-actor run")
    args = parser.parse_args()
    run_bench(
        load_config(args.config, args.overrides),
        rows=args.rows,
        include_ray=not args.skip_ray,
        scaling=not args.no_scaling,
    )
