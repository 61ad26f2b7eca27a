"""The FastAPI app: routes, auth, OpenAI error bodies; generation goes to an ImageBackend.

Nothing here knows about Ray: a Serve replica is one backend, a test double is another.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
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


@dataclass
class ImageOutcome:
    """One image's result plus how it was served: its engine call and time in the queue."""

    image: np.ndarray | None
    error: str | None
    truncated: bool
    call_id: int
    batch_size: int
    engine_seconds: float
    queue_seconds: float


class ImageBackend(Protocol):
    """What the routes need from whoever holds the engine."""

    config: SdrayConfig
    model_name: str
    device: str
    load_seconds: float
    loaded_at: float

    def ready(self) -> bool:
        """Whether the model is loaded and requests can be served."""
        ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[ImageOutcome]:
        """One outcome per request, in order."""
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
        log.exception("request to %s failed", request.url.path)
        message = f"The server failed to handle the request: {type(error).__name__}."
        return _error_response(ApiError(500, message, type="server_error", code="server_error"))

    async def read(request: Request, model: type) -> Any:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise ApiError(
                413,
                f"The request body is {len(raw)} bytes, above the limit of {max_body_bytes}.",
                code="body_too_large",
            )
        return parse_body(raw, model)

    async def run(requests: list[GenerationRequest]) -> list[ImageOutcome]:
        if not backend.ready():
            raise ApiError(
                503,
                "The model is still loading; retry shortly.",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": str(max(1, round(limits.retry_after_s)))},
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
        failed = [o.error for o in outcomes if o.error is not None]
        if failed:
            raise ApiError(500, f"Generation failed: {failed[0]}", type="server_error")
        return outcomes

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 once the model is loaded (no auth)."""
        if not backend.ready():
            return JSONResponse({"status": "loading"}, status_code=503)
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
        card = ModelCard(id=backend.model_name, created=int(backend.loaded_at))
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
