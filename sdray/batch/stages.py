"""Pipeline stages: prepare (validate) -> generate (model actor) -> encode (CPU).

Each stage is a callable over a pyarrow batch that checks its input columns, adds its own, and
carries every other column through, so no row is ever lost on the way.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import pyarrow as pa

from sdray.config import GenerationConfig, ModelConfig, OutputConfig
from sdray.errors import SdrayError
from sdray.requests import PREPARED_SCHEMA, prepare_table, request_from_row

log = logging.getLogger(__name__)

PIXELS_COLUMN = "__sdray_pixels"
IMAGE_COLUMN = "__sdray_image"


def require_columns(batch: pa.Table, names: list[str] | tuple[str, ...], stage: str) -> None:
    """Raise a ValueError naming the columns a stage needs and did not get."""
    missing = [n for n in names if n not in batch.column_names]
    if missing:
        raise ValueError(f"{stage}: missing input columns {', '.join(missing)}")


def _set_column(table: pa.Table, name: str, values: pa.Array | list, type_=None) -> pa.Table:
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


class PrepareStage:
    """Validate rows, fill defaults, derive ids and seeds; bad rows become error rows."""

    def __init__(self, generation: GenerationConfig) -> None:
        self.generation = generation

    def __call__(self, batch: pa.Table) -> pa.Table:
        return prepare_table(batch, self.generation)  # refuses a table without `prompt` itself


# Fault injection for tests: when set to a path, the first model actor to see a batch creates
# that file and dies, so tests can show a crashed actor's batch is retried and nothing is lost.
CRASH_ONCE_ENV = "SDRAY_TEST_CRASH_ONCE"


class ErrorBudgetExceeded(SdrayError):
    """Raised by a model actor when most rows fail, to stop a run burning GPU hours."""


class GenerateStage:
    """Model actor: loads the engine once, then turns ok rows into raw pixels."""

    def __init__(
        self,
        model: ModelConfig,
        model_name: str,
        batch_size: int,
        torch_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
        max_error_fraction: float = 1.0,
        min_rows_for_budget: int = 32,
        model_sha256: str | None = None,
    ) -> None:
        from sdray.engine import DiffusionEngine

        started = time.perf_counter()
        # model_sha256: the identity the driver recorded; an actor (re)starting after the model
        # changed under the job refuses to load it rather than mix two models in one output.
        self.engine = DiffusionEngine.from_config(
            model,
            max_batch_size=batch_size,
            torch_threads=torch_threads,
            storage_options=storage_options,
            expected_sha256=model_sha256,
        )
        self.model_name = model_name
        self.max_error_fraction = max_error_fraction
        self.min_rows_for_budget = min_rows_for_budget
        self.attempted = 0
        self.failed = 0
        log.info("model actor ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, [f.name for f in PREPARED_SCHEMA], "generate")
        _maybe_crash_once()
        rows = batch.select([f.name for f in PREPARED_SCHEMA]).to_pylist()
        status = [r["status"] for r in rows]
        errors = [r["error"] for r in rows]
        pixels: list[bytes | None] = [None] * len(rows)
        truncated: list[bool | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        requests = [request_from_row(rows[i]) for i in todo]
        for index, result in zip(todo, self._generate(requests), strict=True):
            truncated[index] = result.truncated
            if result.error is None:
                pixels[index] = result.image.tobytes()
            else:
                status[index], errors[index] = "error", result.error
                self.failed += 1
        self.attempted += len(todo)
        self._check_budget()
        batch = _set_column(batch, "model", [self.model_name] * len(rows), pa.string())
        batch = _set_column(batch, "status", status, pa.string())
        batch = _set_column(batch, "error", errors, pa.string())
        batch = _set_column(batch, "truncated", truncated, pa.bool_())
        return _set_column(batch, PIXELS_COLUMN, pixels, pa.binary())

    def _check_budget(self) -> None:
        """Abort when this actor has seen enough rows and too many of them failed."""
        if self.attempted >= self.min_rows_for_budget and (
            self.failed / self.attempted > self.max_error_fraction
        ):
            raise ErrorBudgetExceeded(
                f"{self.failed} of {self.attempted} rows failed in one model actor, above "
                f"batch.max_error_fraction={self.max_error_fraction}"
            )

    def _generate(self, requests):
        """Generate; if a whole batch raises, retry row by row so one bad row fails alone.

        A device fault (a broken CUDA context) is no row's fault and poisons every later call:
        the actor exits, so Ray starts a fresh one and retries the batch there, within
        `batch.max_actor_restarts`. Out of device memory frees the cache before the retry.
        """
        from sdray.engine import (
            GenerationResult,
            free_device_memory,
            is_device_fault,
            is_out_of_memory,
        )

        if not requests:
            return []
        try:
            return self.engine.generate(requests)
        except Exception as error:  # noqa: BLE001 - becomes row data, the job goes on
            if is_device_fault(error):
                log.error("device fault in a model actor, restarting it: %s", error)
                _exit_actor()
            if is_out_of_memory(error):
                free_device_memory()
            if len(requests) == 1:
                log.warning("row %s failed: %s", requests[0].id, error)
                message = f"generation failed: {type(error).__name__}: {error}"
                return [GenerationResult(requests[0], None, False, message)]
            return [result for request in requests for result in self._generate([request])]


def _exit_actor() -> None:
    """End this actor's process at once; Ray restarts it and retries its batch elsewhere."""
    import os
    import sys

    sys.stderr.flush()
    os._exit(1)


def _maybe_crash_once() -> None:
    import os

    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.warning("%s: crashing this model actor once on purpose", CRASH_ONCE_ENV)
    _exit_actor()


class EncodeStage:
    """CPU stage: raw pixels -> PNG/JPEG/WebP bytes with embedded parameters, plus sha256."""

    def __init__(self, output: OutputConfig) -> None:
        self.image_format = output.image_format
        self.quality = output.jpeg_quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np

        from sdray.images import encode_image, infotext

        needed = [f.name for f in PREPARED_SCHEMA] + ["model", PIXELS_COLUMN]
        require_columns(batch, needed, "encode")
        present = np.flatnonzero(batch.column(PIXELS_COLUMN).is_valid())  # error rows: none
        encoded: list[bytes | None] = [None] * batch.num_rows
        digests: list[str | None] = [None] * batch.num_rows
        for index, row in zip(present, batch.select(needed).take(present).to_pylist(), strict=True):
            raw = row[PIXELS_COLUMN]
            pixels = np.frombuffer(raw, np.uint8).reshape(row["height"], row["width"], 3)
            data = encode_image(pixels, self.image_format, infotext(row), self.quality)
            encoded[index] = data
            digests[index] = hashlib.sha256(data).hexdigest()
        batch = batch.drop_columns([PIXELS_COLUMN])
        batch = _set_column(batch, IMAGE_COLUMN, encoded, pa.binary())
        return _set_column(batch, "sha256", digests, pa.string())
