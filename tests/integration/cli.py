"""The `sdray` command as a subprocess, and reading back the metadata it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads

SDRAY = str(Path(sys.executable).with_name("sdray"))


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300):
    """Run `sdray ARGS` to completion (bounded) and capture its output."""
    return subprocess.run([SDRAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def read_metadata(output: Path | str, filesystem=None) -> list[dict]:
    """Every metadata row of an output, Hive partition columns included."""
    dataset = pads.dataset(
        f"{output}/metadata", filesystem=filesystem, format="parquet", partitioning="hive"
    )
    return dataset.to_table().to_pylist()
