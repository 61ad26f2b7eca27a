"""A prompt sweep on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/sweep.py configs/sweeps/guidance-vs-steps.yaml \
        --output s3://bucket/sweeps/cfg/ --config configs/gpu-sd15.yaml

Thin on purpose: the same arguments, library function (`sdray.sweep.run_sweep`) and error
handling as `sdray sweep`.
"""

import sys

from sdray.cli import run

if __name__ == "__main__":
    run(["sweep", *sys.argv[1:]])
