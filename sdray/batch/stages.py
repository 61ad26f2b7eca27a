"""Pipeline stages: prepare (validate) -> generate (model actor) -> encode (CPU).

Each stage is a callable over a pyarrow batch that checks its input columns, adds its own, and
carries every other column through, so no row is ever lost on the way.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import pyarrow as pa

from sdray.config import GenerationConfig, ModelConfig, OutputConfig
from sdray.errors import SdrayError
from sdray.requests import (
    IMAGE_BYTES,
    IMAGE_DIGESTS,
    IMAGE_INPUTS,
    PREPARED_SCHEMA,
    SOURCE_COLUMN,
    denoising_start,
    prepare_table,
    request_from_row,
)

log = logging.getLogger(__name__)

PIXELS_COLUMN = "__sdray_pixels"
IMAGE_COLUMN = "__sdray_image"
# Ready init/mask pixels (raw uint8 at the row's width x height), from ImageInputStage.
INPUT_PIXELS = {"init_image": "__sdray_init_pixels", "mask_image": "__sdray_mask_pixels"}
# Previews from the model actor: steps, and raw uint8 frames; then the encoded filmstrip.
PREVIEW_STEPS = "__sdray_preview_steps"
PREVIEW_FRAMES = "__sdray_preview_frames"
STRIP_COLUMN = "__sdray_strip"


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


class ImageInputStage:
    """CPU stage before the model actors: fetch each image-to-image row's init image (and mask)
    — from any fsspec URI, relative ones from the table's own location, or bytes in the table —,
    decode, check and size them (`sdray.images.prepare_inputs`), and hand the model actors
    ready pixels. A bad image makes its row an error row naming the field and value."""

    def __init__(
        self,
        generation: GenerationConfig,
        input_base: str,
        storage_options: dict[str, Any] | None = None,
        threads: int = 8,
    ) -> None:
        self.generation = generation
        self.input_base = input_base.rstrip("/")
        self.storage_options = storage_options
        self.threads = threads

    def __call__(self, batch: pa.Table) -> pa.Table:
        from concurrent.futures import ThreadPoolExecutor

        require_columns(batch, [f.name for f in PREPARED_SCHEMA], "image inputs")
        todo = self._wanting_images(batch)
        if not todo:  # text-to-image only: no row to look at one by one
            for name in (*INPUT_PIXELS.values(), *IMAGE_DIGESTS.values()):
                batch = _set_column(batch, name, pa.nulls(batch.num_rows, _kind(name)))
            hidden = [c for c in IMAGE_BYTES.values() if c in batch.column_names]
            return batch.drop_columns(hidden)
        columns = [
            c
            for c in ["status", "error", "width", "height", *IMAGE_INPUTS, SOURCE_COLUMN]
            + list(IMAGE_BYTES.values())
            if c in batch.column_names
        ]
        rows = batch.select(columns).to_pylist()
        with ThreadPoolExecutor(min(self.threads, len(todo))) as pool:
            outcomes = list(pool.map(lambda i: self._prepare(rows[i]), todo))
        n = batch.num_rows
        out: dict[str, list] = {
            "status": [r["status"] for r in rows],
            "error": [r["error"] for r in rows],
            "width": [r["width"] for r in rows],
            "height": [r["height"] for r in rows],
            **{name: [None] * n for name in (*INPUT_PIXELS.values(), *IMAGE_DIGESTS.values())},
        }
        for index, (prepared, digests, error) in zip(todo, outcomes, strict=True):
            for name, digest in digests.items():
                out[IMAGE_DIGESTS[name]][index] = digest
            if error is not None:
                out["status"][index], out["error"][index] = "error", error
                continue
            out["width"][index], out["height"][index] = prepared.width, prepared.height
            out[INPUT_PIXELS["init_image"]][index] = prepared.init.tobytes()
            if prepared.mask is not None:
                out[INPUT_PIXELS["mask_image"]][index] = prepared.mask.tobytes()
        types = {
            "status": pa.string(),
            "error": pa.string(),
            "width": pa.int64(),
            "height": pa.int64(),
        }
        for name, values in out.items():
            batch = _set_column(batch, name, values, types.get(name, _kind(name)))
        hidden = [c for c in IMAGE_BYTES.values() if c in batch.column_names]
        return batch.drop_columns(hidden)

    @staticmethod
    def _wanting_images(batch: pa.Table) -> list[int]:
        """Rows still ok that name an init image (a URI, or bytes in the table)."""
        import numpy as np
        import pyarrow.compute as pc

        def given(column: pa.ChunkedArray) -> pa.ChunkedArray:
            length = pc.utf8_length if pa.types.is_string(column.type) else pc.binary_length
            return pc.fill_null(pc.greater(length(column), 0), False)

        wants = given(batch.column("init_image"))
        raw = IMAGE_BYTES["init_image"]
        if raw in batch.column_names:
            wants = pc.or_(wants, given(batch.column(raw)))
        wants = pc.and_(wants, pc.fill_null(pc.equal(batch.column("status"), "ok"), False))
        return np.flatnonzero(wants.to_numpy(zero_copy_only=False)).tolist()

    def _prepare(self, row: dict[str, Any]):
        """(PreparedInputs | None, {field: sha256 of the source bytes}, error | None)."""
        from sdray.images import ImageInputError, prepare_inputs

        data, digests, shown = {}, {}, {}
        try:
            for name in IMAGE_INPUTS:
                raw = row.get(IMAGE_BYTES[name])
                uri = row.get(name)
                if raw is None and uri is None:
                    continue
                shown[name] = repr(uri) if uri is not None else f"<{len(raw)} bytes>"
                data[name] = raw if raw is not None else self._fetch(name, uri, row)
                digests[name] = hashlib.sha256(data[name]).hexdigest()
            g = self.generation
            prepared = prepare_inputs(
                data["init_image"],
                data.get("mask_image"),
                width=row["width"],
                height=row["height"],
                max_width=g.max_width,
                max_height=g.max_height,
                max_pixels=g.max_input_pixels,
                shown=shown,
            )
        except ImageInputError as error:
            return None, digests, str(error)
        return prepared, digests, None

    def _fetch(self, name: str, uri: str, row: dict[str, Any]) -> bytes:
        from sdray.images import ImageInputError
        from sdray.storage import filesystem, join

        location = uri
        if "://" not in uri and not uri.startswith("/"):  # relative to the table's own folder
            folder = (row.get(SOURCE_COLUMN) or "").rpartition("/")[0]
            location = join(self.input_base, folder, uri) if folder else join(self.input_base, uri)
        try:
            fs, path = filesystem(location, self.storage_options)
            with fs.open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ImageInputError(f"{name}={uri!r}: no such file ({location})") from None
        except (OSError, ValueError) as error:
            raise ImageInputError(f"{name}={uri!r}: cannot be read ({error})") from None


def _kind(name: str) -> pa.DataType:
    return pa.string() if name in IMAGE_DIGESTS.values() else pa.binary()


# Fault injection for tests: when set to a path, the first model actor to see a batch creates
# that file and dies, so tests can show a crashed actor's batch is retried and nothing is lost.
CRASH_ONCE_ENV = "SDRAY_TEST_CRASH_ONCE"
# ... and when set at all, every model actor dies at every batch: a crash loop.
CRASH_ALWAYS_ENV = "SDRAY_TEST_CRASH_ALWAYS"


class ErrorBudgetExceeded(SdrayError):
    """Raised by a model actor when most rows fail, to stop a run burning GPU hours."""


class GenerateStage:
    """Model actor: loads the engine once, then turns ok rows into raw pixels.

    Ray Data runs `__call__` on one thread of the actor; with `batch.overlap` the actor takes
    two tasks at once (`max_concurrent_calls_per_actor=2`), so fetching and slicing the next
    block and serializing the last one's pixels overlap the engine's work on this one. The
    engine itself runs one call at a time (`engine_lock`).
    """

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
        model_family: str | None = None,
        preview_every: int = 0,
    ) -> None:
        from sdray.batch.cluster import actor_identity

        started = time.perf_counter()
        self.engine = self.load_engine(
            model, batch_size, torch_threads, storage_options, model_sha256
        )
        self.model_name = model_name
        self.model_family = model_family or self.engine.plan.family
        self.preview_every = preview_every
        self.max_error_fraction = max_error_fraction
        self.min_rows_for_budget = min_rows_for_budget
        self.attempted = 0
        self.failed = 0
        self.engine_lock = threading.Lock()
        # This actor's running totals: each call it hands on carries a copy (see `UnitStage`),
        # so the job's per-node figures travel with the calls to the sink. Memory: the
        # process's own (private) memory once ready, and its peak so far.
        self.memory = PrivateMemoryPeak()
        self.figures = {
            **actor_identity(),
            "images": 0,
            "errors": 0,
            "busy_s": 0.0,
            "ready_mb": self.memory.now(),
            "peak_mb": self.memory.peak,
        }
        log.info("model actor ready in %.1fs", time.perf_counter() - started)

    def load_engine(self, model, batch_size, torch_threads, storage_options, model_sha256):
        """The engine this actor runs (a stand-in device overrides it: `sdray.tools.bench_device`).
        `model_sha256`: the identity the driver recorded; an actor (re)starting after the model
        changed under the job refuses to load it rather than mix two models in one output."""
        from sdray.engine import DiffusionEngine

        return DiffusionEngine.from_config(
            model,
            max_batch_size=batch_size,
            torch_threads=torch_threads,
            storage_options=storage_options,
            expected_sha256=model_sha256,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, [f.name for f in PREPARED_SCHEMA], "generate")
        _maybe_crash_once()
        rows = batch.select([f.name for f in PREPARED_SCHEMA]).to_pylist()
        status = [r["status"] for r in rows]
        errors = [r["error"] for r in rows]
        pixels: list[bytes | None] = [None] * len(rows)
        truncated: list[bool | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        inputs = {
            name: batch.column(column).to_pylist() if column in batch.column_names else None
            for name, column in INPUT_PIXELS.items()
        }
        requests = [
            self._request(rows[i], {k: v and v[i] for k, v in inputs.items()}) for i in todo
        ]
        preview_steps: list[list[int] | None] = [None] * len(rows)
        preview_frames: list[list[bytes] | None] = [None] * len(rows)
        with self.engine_lock:  # an overlapping task (batch.overlap) waits here for the engine
            started, failed_before = time.perf_counter(), self.failed
            results = self._generate(requests)
            self.failed += sum(r.error is not None for r in results)
            self.attempted += len(todo)
            failed = self.failed - failed_before
            self.figures["images"] += len(todo) - failed
            self.figures["errors"] += failed
            self.figures["busy_s"] += time.perf_counter() - started
            self._check_budget()
        self.figures["peak_mb"] = self.memory.peak
        for index, result in zip(todo, results, strict=True):
            truncated[index] = result.truncated
            if result.error is None:
                pixels[index] = result.image
                if result.previews:
                    preview_steps[index] = [step for step, _ in result.previews]
                    preview_frames[index] = [frame.tobytes() for _, frame in result.previews]
            else:
                status[index], errors[index] = "error", result.error
        batch = _set_column(batch, "model", [self.model_name] * len(rows), pa.string())
        batch = _set_column(batch, "model_family", [self.model_family] * len(rows), pa.string())
        batch = batch.drop_columns([c for c in INPUT_PIXELS.values() if c in batch.column_names])
        if self.preview_every:
            batch = _set_column(batch, PREVIEW_STEPS, preview_steps, pa.list_(pa.int64()))
            frames = pa.array(preview_frames, pa.large_list(pa.large_binary()))
            batch = _set_column(batch, PREVIEW_FRAMES, frames)
        batch = _set_column(batch, "status", status, pa.string())
        batch = _set_column(batch, "error", errors, pa.string())
        batch = _set_column(batch, "truncated", truncated, pa.bool_())
        return _set_column(batch, PIXELS_COLUMN, pixel_array(pixels))

    def _request(self, row: dict[str, Any], pixels: dict[str, bytes | None]):
        """The row's GenerationRequest, with its ready input pixels and preview steps."""
        import numpy as np

        shape = (row["height"], row["width"])
        images = {
            name: None if raw is None else np.frombuffer(raw, np.uint8).reshape(*shape, -1)
            for name, raw in pixels.items()
        }
        if images["mask_image"] is not None:
            images["mask_image"] = images["mask_image"][..., 0]
        preview_at: tuple[int, ...] = ()
        if self.preview_every:
            run = row["steps"] - denoising_start(row["steps"], row.get("strength"))
            preview_at = tuple(range(self.preview_every, run + 1, self.preview_every))
        return request_from_row(row, **images, preview_at=preview_at)

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
        """Generate, one engine call per denoising batch; if one raises, retry its rows one by
        one so one bad row fails alone (and the batches already made are kept).

        A device fault (a broken CUDA context) is no row's fault and poisons every later call:
        the actor exits, so Ray starts a fresh one and retries the batch there, within
        `batch.max_actor_restarts`. Out of device memory frees the cache before the retry.
        """
        from sdray.engine import (
            GenerationResult,
            free_device_memory,
            group_compatible,
            is_device_fault,
            is_out_of_memory,
        )

        if not requests:
            return []
        groups = group_compatible(requests, self.engine.max_batch_size)
        if len(groups) > 1:  # one engine call per denoising batch: a failure costs only its own
            results: list = [None] * len(requests)
            for indices in groups:
                done = self._generate([requests[i] for i in indices])
                for index, result in zip(indices, done, strict=True):
                    results[index] = result
            return results
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


def pixel_array(images: list) -> pa.Array:
    """Raw images (HxWx3 uint8 arrays, or None for rows without one) as one Arrow array of
    their bytes, copied once (64-bit offsets: no size of call can overflow them)."""
    import numpy as np

    sizes = np.array([0 if image is None else image.nbytes for image in images], np.int64)
    offsets = np.zeros(len(images) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for image, start, size in zip(images, offsets[:-1].tolist(), sizes.tolist(), strict=True):
        if size:
            data[start : start + size] = image.reshape(-1)
    valid = np.array([image is not None for image in images])
    mask = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(images),
        [mask, pa.py_buffer(offsets), pa.py_buffer(data)],
        null_count=int((~valid).sum()),
    )


class PrivateMemoryPeak:
    """This process's private resident memory (Linux: `RssAnon`, which leaves out the object
    store's shared pages a Ray worker maps and writes into), in MB, and its peak, sampled by a
    thread every `every` seconds. Elsewhere: the resident size and its peak."""

    def __init__(self, every: float = 0.05) -> None:
        self.peak = self.now()
        thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        thread.start()

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)

    def _sample(self, every: float) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(every)


def _exit_actor() -> None:
    """End this actor's process at once; Ray restarts it and retries its batch elsewhere."""
    import os
    import sys

    sys.stderr.flush()
    os._exit(1)


def _maybe_crash_once() -> None:
    import os

    if os.environ.get(CRASH_ALWAYS_ENV):
        log.warning("%s: crashing this model actor on purpose", CRASH_ALWAYS_ENV)
        _exit_actor()
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
    """CPU stage: raw pixels -> PNG/JPEG/WebP bytes with embedded parameters, plus sha256; and
    each image's previews -> one filmstrip PNG (labelled by step, the final image last)."""

    def __init__(self, output: OutputConfig) -> None:
        self.image_format = output.image_format
        self.quality = output.jpeg_quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np

        from sdray.images import encode_image, filmstrip, infotext

        needed = [f.name for f in PREPARED_SCHEMA] + ["model", PIXELS_COLUMN]
        require_columns(batch, needed, "encode")
        present = np.flatnonzero(batch.column(PIXELS_COLUMN).is_valid())  # error rows: none
        previews = PREVIEW_FRAMES in batch.column_names
        steps = batch.column(PREVIEW_STEPS).to_pylist() if previews else None
        frames = batch.column(PREVIEW_FRAMES).to_pylist() if previews else None
        encoded: list[bytes | None] = [None] * batch.num_rows
        digests: list[str | None] = [None] * batch.num_rows
        strips: list[bytes | None] = [None] * batch.num_rows
        for index, row in zip(present, batch.select(needed).take(present).to_pylist(), strict=True):
            shape = (row["height"], row["width"], 3)
            pixels = np.frombuffer(row[PIXELS_COLUMN], np.uint8).reshape(shape)
            data = encode_image(pixels, self.image_format, infotext(row), self.quality)
            encoded[index] = data
            digests[index] = hashlib.sha256(data).hexdigest()
            if previews and frames[index]:
                run = row["steps"] - denoising_start(row["steps"], row["strength"])
                labelled = [
                    (f"step {step}/{run}", np.frombuffer(f, np.uint8).reshape(shape))
                    for step, f in zip(steps[index], frames[index], strict=True)
                ]
                strips[index] = filmstrip([*labelled, ("final", pixels)])
        batch = batch.drop_columns([PIXELS_COLUMN])
        batch = _set_column(batch, IMAGE_COLUMN, encoded, pa.binary())
        if previews:
            batch = batch.drop_columns([PREVIEW_STEPS, PREVIEW_FRAMES])
            batch = _set_column(batch, STRIP_COLUMN, strips, pa.binary())
        return _set_column(batch, "sha256", digests, pa.string())
