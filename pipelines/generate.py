"""Offline generation on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/generate.py \
        --input s3://bucket/prompts/ --output s3://bucket/runs/001/ --config configs/gpu-sd15.yaml

Thin on purpose: it parses arguments and calls the same library function as `sdray generate`.
"""

import argparse
import sys

from sdray.batch import run_generate
from sdray.config import load_config
from sdray.errors import SdrayError


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true")
    mode.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        summary = run_generate(
            args.input, args.output, config, overwrite=args.overwrite, resume=args.resume
        )
    except SdrayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
