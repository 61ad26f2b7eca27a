"""Offline generation on Ray Data: read prompt tables, run stages in actor pools, write shards."""

from sdray.batch.job import JobSummary, clear_output, prepare_output, run_generate

__all__ = ["JobSummary", "clear_output", "prepare_output", "run_generate"]
