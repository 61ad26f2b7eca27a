"""Offline generation on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/generate.py \
        --input s3://bucket/prompts/ --output s3://bucket/runs/001/ --config configs/gpu-sd15.yaml

Thin on purpose: the same arguments, library function (`sdray.batch.run_generate`) and error
handling as `sdray generate`.
"""

import sys

from sdray.cli import run

if __name__ == "__main__":
    run(["generate", *sys.argv[1:]])
