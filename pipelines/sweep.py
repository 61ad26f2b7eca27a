"""A prompt sweep on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/sweep.py configs/sweeps/guidance-vs-steps.yaml \
        --output s3://bucket/sweeps/cfg/ --config configs/gpu-sd15.yaml

Thin on purpose: it parses arguments and calls the same library function as `sdray sweep`.
"""

import argparse
import sys

from sdray.config import load_config
from sdray.errors import SdrayError
from sdray.sweep import run_sweep


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="sweep spec YAML (path or URI)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true")
    mode.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        summary = run_sweep(
            args.spec, args.output, config, overwrite=args.overwrite, resume=args.resume
        )
    except SdrayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
