"""The Ray Serve deployment: one DiffusionEngine per replica behind Serve request batching."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from sdray.config import SdrayConfig
from sdray.requests import GenerationRequest
from sdray.serve.api import ImageOutcome, create_api

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ImageService"


@dataclass
class ImageJob:
    """One image waiting in the replica's batch queue, and when it got there."""

    request: GenerationRequest
    enqueued: float


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class ImageService:
    """A replica: loads the engine once, batches concurrent images, serves the HTTP API.

    The batching unit is one image, so the `n` images of a request count toward
    `serve.max_batch_size` and a large `n` spreads over several engine calls. Each Serve batch
    is split into compatible groups (size, steps, scheduler, guidance) before it reaches the
    engine, so incompatible requests never share a denoising batch.
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
        self.device = self.engine.device
        self.load_seconds = self.engine.load_seconds
        self.loaded_at = time.time()
        self._key_digests = tuple(key_digests)
        # One engine thread: batches run one at a time off the event loop, so the replica keeps
        # answering (health checks, /healthz, queueing, PNG encoding) while the model works.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="sdray-engine")
        self._call_ids = itertools.count()
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._warm_up()
        log.info("replica ready: model %s on %s", self.model_name, self.device)

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__: the FastAPI app bound to this replica."""
        return create_api(self, self._key_digests)

    def _warm_up(self) -> None:
        """One small generation, so lazy initialization does not land on the first request."""
        generation = self.config.generation
        request = GenerationRequest(
            id="warm-up",
            prompt="warm up",
            negative_prompt="",
            seed=0,
            steps=2,
            guidance_scale=generation.guidance_scale,
            width=64,
            height=64,
            scheduler=generation.scheduler,
        )
        try:
            self.engine.generate([request])
        except Exception as error:  # noqa: BLE001 - a failed warm-up only costs latency
            log.warning("warm-up generation failed: %s: %s", type(error).__name__, error)

    def ready(self) -> bool:
        """True once the engine is loaded (always, after __init__)."""
        return self.engine is not None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[ImageOutcome]:
        """Queue each image for batching; one outcome per request, in order."""
        now = time.perf_counter()
        jobs = [ImageJob(request, now) for request in requests]
        return list(await asyncio.gather(*(self._run_batch(job) for job in jobs)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # set from the config in __init__
    async def _run_batch(self, jobs: list[ImageJob]) -> list[ImageOutcome]:
        loop = asyncio.get_running_loop()
        outcomes: list[ImageOutcome | None] = [None] * len(jobs)
        requests = [job.request for job in jobs]
        for indices in self._group_compatible(requests, self.engine.max_batch_size):
            group = [requests[i] for i in indices]
            call_id = next(self._call_ids)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._engine_thread, self.engine.generate, group
                )
                found = [(r.image, r.error, r.truncated) for r in results]
            except Exception as error:  # noqa: BLE001 - becomes these requests' 500s
                log.exception("engine call failed for %d images", len(group))
                found = [(None, f"{type(error).__name__}: {error}", False)] * len(group)
            seconds = time.perf_counter() - started
            for index, (image, error, truncated) in zip(indices, found, strict=True):
                outcomes[index] = ImageOutcome(
                    image=image,
                    error=error,
                    truncated=truncated,
                    call_id=call_id,
                    batch_size=len(group),
                    engine_seconds=seconds,
                    queue_seconds=started - jobs[index].enqueued,
                )
        return outcomes  # type: ignore[return-value]
