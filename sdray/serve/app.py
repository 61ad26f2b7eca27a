"""The Ray Serve deployment: one DiffusionEngine per replica behind Serve request batching."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from sdray.config import SdrayConfig
from sdray.engine import free_device_memory, is_device_fault
from sdray.engine import is_out_of_memory as engine_out_of_memory
from sdray.requests import GenerationRequest
from sdray.serve.api import OUT_OF_MEMORY, SERVER_ERROR, UNAVAILABLE, ImageOutcome, create_api
from sdray.serve.batcher import AdaptiveBatcher

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ImageService"
# Engine calls in a row that raise (not counting out-of-memory) before the replica checks its
# engine with the warm-up request; if that fails too, the replica reports itself unhealthy.
# Failures of one request are usually the request's; several in a row, and a failed probe, are
# the engine's.
FAILURES_BEFORE_PROBE = 3


@dataclass
class ImageJob:
    """One image waiting in the replica's batch queue, and when it got there.

    `on_preview(step, pixels)` receives its previews from the engine thread; `abandoned` is set
    when its client has gone, so it is skipped wherever it has not run yet.
    """

    request: GenerationRequest
    enqueued: float
    on_preview: Callable[[int, np.ndarray], None] | None = None
    abandoned: bool = False


class EngineOutOfMemory(RuntimeError):
    """The device ran out of memory during an engine call (the call's memory is released)."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error of the device (torch's, or our wrapper)."""
    return isinstance(error, EngineOutOfMemory) or engine_out_of_memory(error)


class ImageReplica:
    """A replica: loads the engine once, batches concurrent images, serves the HTTP API.

    The batching unit is one image, so the `n` images of a request count toward
    `serve.max_batch_size` and a large `n` spreads over several engine calls. Batches form when
    the engine is free (`AdaptiveBatcher`): a lone request never waits for company. A batch
    forms from queued images that can share a denoising batch (size, steps, scheduler,
    guidance), so mixed traffic still rides in full batches. When a batched engine call
    raises, its images are tried again one by one, so one bad request fails alone.

    A plain class, so tests can drive it without Serve; `ImageService` is its deployment.
    """

    def __init__(self, config: dict[str, Any], key_digests: Sequence[str] = ()) -> None:
        from sdray.engine import DiffusionEngine, group_compatible

        self.config = SdrayConfig.model_validate(config)
        settings = self.config.serve
        self._group_compatible = group_compatible
        self.engine = DiffusionEngine.from_config(
            self.config.model,
            max_batch_size=settings.max_batch_size,
            torch_threads=settings.torch_threads or max(1, int(settings.num_cpus_per_replica)),
            storage_options=self.config.storage.storage_options,
        )
        self.model_name = self.engine.model_name
        self.family = self.engine.plan.family
        self.device = self.engine.device
        self.load_seconds = self.engine.load_seconds
        self.loaded_at = time.time()
        self._key_digests = tuple(key_digests)
        # One engine thread: batches run one at a time off the event loop, so the replica keeps
        # answering (health checks, /healthz, queueing, PNG encoding) while the model works.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="sdray-engine")
        self._call_ids = itertools.count()
        self._failed_calls = 0  # engine calls in a row that raised
        self._fatal: str | None = None  # why the engine cannot serve any more
        self.batcher = AdaptiveBatcher(
            self.generate_batch,
            settings.max_batch_size,
            settings.batch_wait_timeout_s,
            key=lambda job: job.request.batch_key(),  # one denoising batch per Serve batch
        )
        self._warm_up()
        log.info("replica ready: model %s on %s", self.model_name, self.device)

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__: the FastAPI app bound to this replica."""
        return create_api(self, self._key_digests)

    def _probe_request(self) -> GenerationRequest:
        generation = self.config.generation
        return GenerationRequest(
            id="probe",
            prompt="warm up",
            negative_prompt="",
            seed=0,
            steps=2,
            guidance_scale=generation.guidance_scale,
            width=64,
            height=64,
            scheduler=generation.scheduler,
        )

    def _warm_up(self) -> None:
        """One small generation, so lazy initialization does not land on the first request, and
        a replica whose engine cannot generate fails to start (Serve retries or reports it)."""
        try:
            (result,) = self.engine.generate([self._probe_request()])
        except Exception as error:
            raise RuntimeError(
                f"warm-up generation failed, so this replica cannot serve: "
                f"{type(error).__name__}: {error}"
            ) from error
        if result.error:
            log.warning("warm-up image is unusable: %s", result.error)

    def ready(self) -> bool:
        """True while the engine can serve (it is loaded once __init__ returns)."""
        return self._fatal is None

    def check_health(self) -> None:
        """Serve's periodic health check: raise after a fatal engine error, so Serve replaces
        this replica."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine failed and cannot serve: {self._fatal}")

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_preview: Callable[[int, int, np.ndarray], None] | None = None,
    ) -> list[ImageOutcome]:
        """Queue each image for batching; one outcome per request, in order. Previews go to
        `on_preview(index, step, pixels)` from the engine thread. Cancelled (the client went
        away), its images leave the queue, and any not yet in an engine call are skipped."""
        now = time.perf_counter()
        jobs = [
            ImageJob(request, now, on_preview and functools.partial(on_preview, index))
            for index, request in enumerate(requests)
        ]
        try:
            return await self.batcher.submit(jobs)
        except asyncio.CancelledError:
            for job in jobs:
                job.abandoned = True
            raise

    def incoming(self):
        """Context of a request whose body is being read (see `AdaptiveBatcher.incoming`)."""
        return self.batcher.incoming()

    async def generate_batch(self, jobs: list[ImageJob]) -> list[ImageOutcome]:
        """One Serve batch: compatible groups, one engine call each; outcomes in job order."""
        outcomes: list[ImageOutcome | None] = [None] * len(jobs)
        requests = [job.request for job in jobs]
        for indices in self._group_compatible(requests, self.engine.max_batch_size):
            for index in [i for i in indices if jobs[i].abandoned]:
                outcomes[index] = self._failure(
                    jobs[index], SERVER_ERROR, "abandoned", None, time.perf_counter()
                )
            live = [i for i in indices if not jobs[i].abandoned]
            if live:
                group = await self._generate_group([jobs[i] for i in live])
                for index, outcome in zip(live, group, strict=True):
                    outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    async def _generate_group(self, jobs: list[ImageJob]) -> list[ImageOutcome]:
        """One engine call for compatible jobs; if it raises, each job again on its own."""
        if self._fatal is not None:
            now = time.perf_counter()
            return [self._failure(job, UNAVAILABLE, self._fatal, None, now) for job in jobs]
        call_id = next(self._call_ids)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        group = [job.request for job in jobs]
        try:
            results = await loop.run_in_executor(
                self._engine_thread, self._call_engine, group, _preview_relay(jobs)
            )
        except Exception as error:  # noqa: BLE001 - isolated below, then these requests' 5xx
            error_id = uuid.uuid4().hex[:12]
            log.error(
                "engine call %d failed for %d images (error id %s)",
                call_id,
                len(group),
                error_id,
                exc_info=error,
            )
            await self._count_failure(error)
            if len(jobs) > 1 and self._fatal is None:
                isolated = []
                for job in jobs:
                    if job.abandoned:  # its client has gone: no second try
                        isolated.append(
                            self._failure(job, SERVER_ERROR, "abandoned", None, started)
                        )
                    else:
                        isolated.extend(await self._generate_group([job]))
                return isolated
            code = OUT_OF_MEMORY if is_out_of_memory(error) else SERVER_ERROR
            if self._fatal is not None:
                code = UNAVAILABLE
            detail = f"{type(error).__name__}: {error}"
            return [self._failure(job, code, detail, error_id, started) for job in jobs]
        self._failed_calls = 0
        seconds = time.perf_counter() - started
        return [
            ImageOutcome(
                image=result.image,
                error=result.error,
                truncated=result.truncated,
                call_id=call_id,
                batch_size=len(group),
                engine_seconds=seconds,
                queue_seconds=started - job.enqueued,
                error_id=uuid.uuid4().hex[:12] if result.error else None,
            )
            for job, result in zip(jobs, results, strict=True)
        ]

    def _call_engine(self, requests: list[GenerationRequest], on_preview=None):
        """Run in the engine thread. After an out-of-memory error, release the failed call's
        memory (its frames are gone once the except block ends) before reporting it."""
        message = None
        try:
            if on_preview is None:
                return self.engine.generate(requests)
            return self.engine.generate(requests, on_preview=on_preview)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            message = f"{type(error).__name__}: {error}"
        free_device_memory()
        raise EngineOutOfMemory(message)

    async def _count_failure(self, error: Exception) -> None:
        if is_out_of_memory(error):
            return  # the device is fine; the batch was too big for it
        if is_device_fault(error):
            self._fatal = f"{type(error).__name__}: {error}"
        else:
            self._failed_calls += 1
            if self._failed_calls >= FAILURES_BEFORE_PROBE:
                await self._probe()
        if self._fatal is not None:
            log.error("replica marked unhealthy: %s", self._fatal)

    async def _probe(self) -> None:
        """After repeated failures, tell a broken engine from a run of bad requests."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._engine_thread, self.engine.generate, [self._probe_request()]
            )
        except Exception as error:  # noqa: BLE001 - the engine itself is broken
            self._fatal = (
                f"{self._failed_calls} engine calls in a row and the probe failed; last: "
                f"{type(error).__name__}: {error}"
            )
        else:
            self._failed_calls = 0

    @staticmethod
    def _failure(
        job: ImageJob, code: str, detail: str, error_id: str | None, started: float
    ) -> ImageOutcome:
        return ImageOutcome(
            image=None,
            error=detail,
            truncated=False,
            call_id=-1,
            batch_size=1,
            engine_seconds=0.0,
            queue_seconds=started - job.enqueued,
            error_id=error_id,
            error_code=code,
        )


def _preview_relay(jobs: list[ImageJob]):
    """The engine's preview callback for one call over `jobs` (None when none wants previews):
    each preview to its job's sink, unless its client has gone. A sink that fails is logged,
    never allowed to fail the engine call that the other jobs share."""
    if not any(job.on_preview for job in jobs):
        return None

    def relay(index: int, step: int, pixels: np.ndarray) -> None:
        job = jobs[index]
        if job.on_preview is None or job.abandoned:
            return
        try:
            job.on_preview(step, pixels)
        except Exception:  # noqa: BLE001 - one client's stream must not break the batch
            log.warning("dropping a preview of %s", job.request.id, exc_info=True)

    return relay


ImageService = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(ImageReplica))
