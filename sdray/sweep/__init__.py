"""Prompt sweeps: a declarative spec (prompts × parameter axes) streamed into a prompt table,
generated on the same batch path as `sdray generate`, then drawn as contact sheets and a page.

- `spec`: the YAML spec, validated, its axes resolved (`load_spec`, `SweepSpec`, `Axis`).
- `expand`: the spec streamed into `OUTPUT/sweep.parquet` in bounded chunks (`plan_expansion`,
  `write_expansion`). Without a `seed` axis, all rows of a prompt share one seed derived from
  (generation.seed, the prompt's id), so a sheet's cells differ only by the axes compared.
- `contact_sheets`: one labelled grid per prompt (and combination of undrawn axes), plus the
  gallery's thumbnails, reading every image shard once; `gallery`: the static `index.html`.
- `run`: the whole sweep (`run_sweep`); `paths`: where its outputs live in OUTPUT.
"""

from sdray.sweep.expand import (
    CHUNK_ROWS,
    PROMPT_ID_COLUMN,
    PROMPT_INDEX_COLUMN,
    Expansion,
    PromptSource,
    grid_positions,
    permute,
    plan_expansion,
    prompt_keys,
    write_expansion,
)
from sdray.sweep.paths import (
    GALLERY_DIR,
    GALLERY_PAGE,
    SHEETS_DIR,
    SWEEP_OWNED,
    SWEEP_RECORD,
    SWEEP_TABLE,
)
from sdray.sweep.run import SweepSummary, run_sweep, sweep_record
from sdray.sweep.spec import (
    AXIS_TYPES,
    Axis,
    SweepSpec,
    SweepSpecError,
    check_against_config,
    load_spec,
    make_axis,
    spec_from_dict,
)

__all__ = [
    "AXIS_TYPES",
    "CHUNK_ROWS",
    "GALLERY_DIR",
    "GALLERY_PAGE",
    "PROMPT_ID_COLUMN",
    "PROMPT_INDEX_COLUMN",
    "SHEETS_DIR",
    "SWEEP_OWNED",
    "SWEEP_RECORD",
    "SWEEP_TABLE",
    "Axis",
    "Expansion",
    "PromptSource",
    "SweepSpec",
    "SweepSpecError",
    "SweepSummary",
    "check_against_config",
    "grid_positions",
    "load_spec",
    "make_axis",
    "permute",
    "plan_expansion",
    "prompt_keys",
    "run_sweep",
    "spec_from_dict",
    "sweep_record",
    "write_expansion",
]
