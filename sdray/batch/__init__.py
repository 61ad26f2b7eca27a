"""Offline generation on Ray Data: read prompt tables, run stages in actor pools, write shards."""

from sdray.batch.job import JobSummary, prepare_output, run_generate

__all__ = ["JobSummary", "prepare_output", "run_generate"]
