"""Offline generation on Ray Data: read prompt tables, run stages in actor pools, write shards.

Its names load on first use: a process that needs one module of the package (an id registry
actor needs only `sdray.batch.ids`) does not import Ray Data and the whole job with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdray.batch.job import JobSummary, clear_output, prepare_output, run_generate
    from sdray.batch.sink import read_metadata

_HOMES = {
    "JobSummary": "sdray.batch.job",
    "clear_output": "sdray.batch.job",
    "prepare_output": "sdray.batch.job",
    "run_generate": "sdray.batch.job",
    "read_metadata": "sdray.batch.sink",
}

__all__ = ["JobSummary", "clear_output", "prepare_output", "read_metadata", "run_generate"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
