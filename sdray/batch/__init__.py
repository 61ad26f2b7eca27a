"""Offline generation on Ray Data: read prompt tables, run stages in actor pools, write shards."""

from sdray.batch.job import JobSummary, clear_output, prepare_output, run_generate
from sdray.batch.sink import read_metadata

__all__ = ["JobSummary", "clear_output", "prepare_output", "read_metadata", "run_generate"]
