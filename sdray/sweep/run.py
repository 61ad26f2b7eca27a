"""Running a sweep: expand the spec, generate it on the batch path, then draw sheets and page."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdray.config import SdrayConfig
from sdray.errors import SdrayError
from sdray.sweep.expand import Expansion, plan_expansion, write_expansion
from sdray.sweep.paths import GALLERY_PAGE, SHEETS_DIR, SWEEP_OWNED, SWEEP_RECORD, SWEEP_TABLE
from sdray.sweep.spec import SweepSpec, check_against_config, load_spec

if TYPE_CHECKING:
    from sdray.batch import JobSummary


@dataclass
class SweepSummary:
    """A finished sweep: the generation job's summary plus what the sweep added."""

    job: JobSummary
    sheets: int = 0
    gallery: str = ""

    @property
    def rows(self) -> int:
        """Rows in the sweep."""
        return self.job.rows

    @property
    def ok(self) -> int:
        """Images generated."""
        return self.job.ok

    @property
    def error(self) -> int:
        """Rows in error."""
        return self.job.error

    @property
    def manifest(self) -> dict[str, Any]:
        """The job's manifest.json."""
        return self.job.manifest

    def line(self) -> str:
        """One line for the terminal."""
        return (
            f"{self.job.line()}; {self.sheets} contact sheets in {SHEETS_DIR}/, "
            f"gallery: {self.gallery}"
        )


def _say(message: str) -> None:
    print(f"sdray: {message}", file=sys.stderr, flush=True)


def sweep_record(spec: SweepSpec, expansion: Expansion) -> dict[str, Any]:
    """What sweep.json holds: the spec, its axes and sheet layout, and the row counts."""
    rows, cols = spec.sheet_axes()
    return {
        "name": spec.name,
        "mode": spec.mode,
        "fingerprint": spec.row_fingerprint(expansion.base_seed),
        "spec": spec.model_dump(mode="json"),
        "prompts": expansion.prompts.count,
        "combinations": spec.combinations(),
        "rows": expansion.rows,
        "axes": [axis.describe() for axis in spec.axis_list],
        # Where the seeds come from: the seed axis, or one per prompt derived from this base.
        "seeds": "axis" if not spec.derives_seeds else {"base_seed": expansion.base_seed},
        "sheet": {"rows": rows, "cols": cols, "max_tile": spec.sheet.max_tile},
        "gallery": spec.gallery.model_dump(),
    }


def _write_record(fs, root: str, record: dict[str, Any]) -> None:
    from sdray.storage import join, write_bytes_atomic

    write_bytes_atomic(fs, join(root, SWEEP_RECORD), json.dumps(record, indent=2).encode())


def _prepare_sweep_output(
    output_uri: str, *, overwrite: bool, resume: bool, storage: dict[str, Any]
) -> bool:
    """Refuse a non-empty output before writing anything; return whether the job resumes."""
    from sdray.batch import prepare_output
    from sdray.batch.job import MANIFEST, output_entries
    from sdray.storage import filesystem, join

    fs, root = filesystem(output_uri, storage)
    if resume and fs.exists(root):
        has_manifest = fs.exists(join(root, MANIFEST))
        if not has_manifest:
            if all(entry in SWEEP_OWNED for entry in output_entries(fs, root)):
                return False  # only the expansion was written: start the job afresh
        elif not fs.exists(join(root, SWEEP_RECORD)):
            raise SdrayError(
                f"cannot resume {output_uri!r} as a sweep: it has {MANIFEST} but no "
                f"{SWEEP_RECORD}, so it is not a sweep's output (an `sdray generate` job wrote "
                "it, or its sweep record was removed). Resume it with `sdray generate --resume`, "
                "or give the sweep another --output."
            )
    previous = prepare_output(
        output_uri,
        overwrite=overwrite,
        resume=resume,
        extra_owned=SWEEP_OWNED,
        storage_options=storage,
    )
    return previous is not None


def run_sweep(
    spec_path: str,
    output_uri: str,
    config: SdrayConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> SweepSummary:
    """Expand a sweep spec into OUTPUT/sweep.parquet, generate it exactly as `sdray generate`
    would, then draw the contact sheets and write the gallery page (holding the output's lease
    throughout, as `run_generate` does)."""
    from sdray.batch.lease import output_lease
    from sdray.storage import absolute_uri

    output_uri = absolute_uri(output_uri)
    with output_lease(output_uri, config.storage.storage_options, command="sweep"):
        return _run_sweep(
            spec_path, output_uri, config, overwrite=overwrite, resume=resume, progress=progress
        )


def _run_sweep(
    spec_path: str,
    output_uri: str,
    config: SdrayConfig,
    *,
    overwrite: bool,
    resume: bool,
    progress: bool,
) -> SweepSummary:
    from sdray.batch import run_generate
    from sdray.storage import filesystem, join, read_json
    from sdray.sweep.contact_sheets import write_contact_sheets
    from sdray.sweep.gallery import write_gallery

    say = _say if progress else (lambda message: None)
    storage = config.storage.storage_options
    spec = load_spec(spec_path, storage)
    check_against_config(spec, config.generation)
    expansion = plan_expansion(spec, storage, base_seed=config.generation.seed)
    resuming = _prepare_sweep_output(
        output_uri, overwrite=overwrite, resume=resume, storage=storage
    )
    fs, root = filesystem(output_uri, storage)
    record = sweep_record(spec, expansion)
    previous = read_json(fs, join(root, SWEEP_RECORD)) if resume else None
    if previous is not None and previous.get("fingerprint") != record["fingerprint"]:
        if not resuming:  # nothing was generated from the old expansion: expand afresh
            previous = None
        else:
            raise SdrayError(
                f"cannot resume {output_uri!r}: its sweep was expanded from another spec "
                "(prompts, axes, mode, samples, seed, or generation.seed without a seed axis "
                "differ). Resume with the same spec, or start over with --overwrite."
            )
    table_uri = join(output_uri, SWEEP_TABLE)
    if previous is not None and fs.exists(join(root, SWEEP_TABLE)):
        say(f"sweep {spec.name!r}: reusing {SWEEP_TABLE} ({previous['rows']} rows)")
        if previous != json.loads(json.dumps(record)):  # same rows, other sheet/page layout
            _write_record(fs, root, record)
    else:
        started = time.perf_counter()
        rows = write_expansion(expansion, table_uri, storage)
        _write_record(fs, root, record)  # written last: it marks the expansion as complete
        say(
            f"sweep {spec.name!r}: {rows} rows ({expansion.prompts.count} prompts x "
            f"{spec.combinations()} {spec.mode} combinations) in {SWEEP_TABLE} "
            f"({time.perf_counter() - started:.1f}s)"
        )
    summary = run_generate(
        table_uri,
        output_uri,
        config,
        resume=resuming,
        overwrite=overwrite,  # the old output goes once the job is planned, but for its input:
        keep=(SWEEP_TABLE, SWEEP_RECORD),
        progress=progress,
        extra_owned=SWEEP_OWNED,
        hold_lease=False,  # run_sweep holds it
    )
    say("drawing contact sheets and gallery thumbnails")
    views = write_contact_sheets(output_uri, record, storage_options=storage)
    say(f"writing the gallery page {GALLERY_PAGE}")
    gallery = write_gallery(output_uri, record, views, storage_options=storage)
    return SweepSummary(summary, sheets=views.sheet_count, gallery=gallery)
