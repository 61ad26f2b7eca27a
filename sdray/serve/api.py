"""The FastAPI app: routes, auth, OpenAI error bodies; generation goes to an ImageBackend.

Nothing here knows about Ray: a Serve replica is one backend, a test double is another.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdray.config import SdrayConfig
from sdray.images import encode_image, infotext
from sdray.requests import GenerationRequest
from sdray.serve.auth import check_authorization
from sdray.serve.protocol import (
    ApiError,
    GenerateRequest,
    ImageData,
    ImagesGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    check_model,
    generate_request,
    images_requests,
    parse_body,
)

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz",)
# Response headers that show how a request was served (the benchmark reads them).
ENGINE_MS = "x-sdray-engine-ms"
QUEUE_MS = "x-sdray-queue-ms"
BATCH_SIZE = "x-sdray-batch-size"
SEED = "x-sdray-seed"
# How an image failed (ImageOutcome.error_code): the server's fault (500), or a condition that a
# later try, perhaps on another replica, may not meet (503 with Retry-After).
SERVER_ERROR = "server_error"
OUT_OF_MEMORY = "out_of_memory"
UNAVAILABLE = "replica_unavailable"


@dataclass
class ImageOutcome:
    """One image's result plus how it was served: its engine call and time in the queue.

    `error` is for the server's log only; clients see `error_code` and `error_id`.
    """

    image: np.ndarray | None
    error: str | None
    truncated: bool
    call_id: int
    batch_size: int
    engine_seconds: float
    queue_seconds: float
    error_id: str | None = None
    error_code: str = SERVER_ERROR


class ImageBackend(Protocol):
    """What the routes need from whoever holds the engine."""

    config: SdrayConfig
    model_name: str
    family: str  # the model's family: sd | sdxl
    device: str
    load_seconds: float
    loaded_at: float

    def ready(self) -> bool:
        """Whether the model is loaded and the engine can serve requests."""
        ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[ImageOutcome]:
        """One outcome per request, in order."""
        ...

    def incoming(self) -> contextlib.AbstractContextManager:
        """Held while a request's body is read: its images are on their way to `generate`."""
        ...


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _png(request: GenerationRequest, outcome: ImageOutcome, model: str) -> bytes:
    params = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "scheduler": request.scheduler,
        "guidance_scale": request.guidance_scale,
        "steps": request.steps,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "model": model,
    }
    return encode_image(outcome.image, "png", infotext(params))


def _serving_headers(outcomes: list[ImageOutcome]) -> dict[str, str]:
    """Engine time of the distinct engine calls that served a request, its largest batch, and
    its longest wait before an engine call started."""
    calls = {o.call_id: o for o in outcomes}
    engine = sum(o.engine_seconds for o in calls.values())
    return {
        ENGINE_MS: f"{engine * 1000:.2f}",
        QUEUE_MS: f"{max(o.queue_seconds for o in outcomes) * 1000:.2f}",
        BATCH_SIZE: str(max(o.batch_size for o in outcomes)),
    }


def _internal_error(error_id: str) -> ApiError:
    return ApiError(
        500,
        f"The server failed to handle the request (error id {error_id}).",
        type="server_error",
        code="server_error",
    )


def _generation_error(failed: list[ImageOutcome], retry_after: dict[str, str]) -> ApiError:
    """The client's view of failed images: a generic message with an id to find the server's
    log lines by; 503 with Retry-After where a later try may succeed."""
    for outcome in failed:
        log.error("image failed (error id %s): %s", outcome.error_id, outcome.error)
    retryable = [o for o in failed if o.error_code in (OUT_OF_MEMORY, UNAVAILABLE)]
    if not retryable:
        return _internal_error(failed[0].error_id or uuid.uuid4().hex[:12])
    first = retryable[0]
    reason = {
        OUT_OF_MEMORY: "The server ran out of accelerator memory for this request",
        UNAVAILABLE: "This replica's engine failed and it is being replaced",
    }[first.error_code]
    return ApiError(
        503,
        f"{reason}; retry shortly (error id {first.error_id or '-'}).",
        type="server_error",
        code=first.error_code,
        headers=retry_after,
    )


def create_api(backend: ImageBackend, key_digests: tuple[str, ...] = ()) -> FastAPI:
    """The HTTP app over `backend`; with key digests, every route but /healthz needs a key."""
    config = backend.config
    limits, generation = config.serve, config.generation
    # A body can hold two prompts at the limit (4 bytes/char at worst) plus the other fields.
    max_body_bytes = 16_384 + 8 * limits.max_prompt_chars
    api = FastAPI(title="sdray", summary="Diffusion image generation on Ray Serve")

    @api.middleware("http")
    async def authorize(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            try:
                check_authorization(request.headers.get("authorization"), key_digests)
            except ApiError as error:
                return _error_response(error)
        return await call_next(request)

    @api.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        detail = error.detail if isinstance(error.detail, str) else "HTTP error"
        return _error_response(ApiError(error.status_code, detail, code=code))

    @api.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.exception("request to %s failed (error id %s)", request.url.path, error_id)
        return _error_response(_internal_error(error_id))

    def too_large(size: int | None) -> ApiError:
        shown = "larger than" if size is None else f"{size} bytes, above"
        return ApiError(
            413,
            f"The request body is {shown} the limit of {max_body_bytes} bytes.",
            code="body_too_large",
        )

    async def read(request: Request, model: type) -> Any:
        """The JSON body, refused as soon as it is known to be too large: by its declared
        Content-Length before reading anything, else while streaming it in."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit():
            if int(declared) > max_body_bytes:
                raise too_large(int(declared))
        chunks, size = [], 0
        with backend.incoming():  # a forming batch may wait for this request's images
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise too_large(None)
                chunks.append(chunk)
        return parse_body(b"".join(chunks), model)

    retry_after = {"Retry-After": str(max(1, round(limits.retry_after_s)))}

    async def run(requests: list[GenerationRequest]) -> list[ImageOutcome]:
        if not backend.ready():
            raise ApiError(
                503,
                "The model is not ready on this replica (still loading, or its engine failed); "
                "retry shortly.",
                type="server_error",
                code="model_unavailable",
                headers=retry_after,
            )
        try:
            outcomes = await asyncio.wait_for(
                backend.generate(requests), timeout=limits.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                f"The request did not finish within {limits.request_timeout_s:g}s.",
                type="server_error",
                code="timeout",
            ) from None
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            raise _generation_error(failed, retry_after)
        return outcomes

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """Readiness (no auth): 200 from a replica whose model is loaded and whose engine works,
        503 otherwise. It rides the same queue as generation and needs a replica, so liveness
        probes belong on Serve's own /-/healthz."""
        if not backend.ready():
            return JSONResponse({"status": "unavailable"}, status_code=503, headers=retry_after)
        return JSONResponse(
            {
                "status": "ok",
                "model": backend.model_name,
                "device": backend.device,
                "load_seconds": round(backend.load_seconds, 3),
            }
        )

    @api.get("/v1/models")
    async def models() -> JSONResponse:
        """The served model, as an OpenAI model list."""
        card = ModelCard(
            id=backend.model_name, created=int(backend.loaded_at), family=backend.family
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    @api.post("/v1/images/generations")
    async def images_generations(request: Request) -> JSONResponse:
        """OpenAI Images API: `n` images as base64 PNG, each with its seed."""
        body: ImagesGenerationRequest = await read(request, ImagesGenerationRequest)
        check_model(body.model, backend.model_name)
        requests = images_requests(body, generation, limits)
        outcomes = await run(requests)

        def encode() -> list[ImageData]:
            return [
                ImageData(
                    b64_json=base64.b64encode(_png(r, o, backend.model_name)).decode(), seed=r.seed
                )
                for r, o in zip(requests, outcomes, strict=True)
            ]

        data = await asyncio.to_thread(encode)
        first = requests[0]
        response = ImagesResponse(
            created=int(time.time()), data=data, size=f"{first.width}x{first.height}"
        )
        return JSONResponse(response.model_dump(), headers=_serving_headers(outcomes))

    @api.post(
        "/v1/generate",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def generate(request: Request) -> Response:
        """One image as image/png; its seed is in the x-sdray-seed header and the PNG text."""
        body: GenerateRequest = await read(request, GenerateRequest)
        check_model(body.model, backend.model_name)
        one = generate_request(body, generation, limits)
        outcomes = await run([one])
        png = await asyncio.to_thread(_png, one, outcomes[0], backend.model_name)
        headers = {SEED: str(one.seed), **_serving_headers(outcomes)}
        return Response(png, media_type="image/png", headers=headers)

    return api
