"""The FastAPI app: routes, auth, OpenAI error bodies; generation goes to an ImageBackend.

Nothing here knows about Ray: a Serve replica is one backend, a test double is another.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
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
    edit_requests,
    generate_request,
    images_requests,
    parse_body,
    parse_form,
)
from sdray.serve.streaming import SSE_HEADERS, image_events
from sdray.serve.uploads import read_edit_form

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

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_preview: PreviewSink | None = None,
    ) -> list[ImageOutcome]:
        """One outcome per request, in order; `on_preview(index, step, pixels)` (called from
        any thread) receives the previews the requests ask for (`preview_at`)."""
        ...

    def incoming(self) -> contextlib.AbstractContextManager:
        """Held while a request's body is read: its images are on their way to `generate`."""
        ...


# Where a backend sends previews: (request index, step, HxWx3 uint8 pixels), from any thread.
PreviewSink = Callable[[int, int, np.ndarray], None]


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _png(request: GenerationRequest, outcome: ImageOutcome, model: str) -> bytes:
    """The final image with its parameters embedded, as `sdray generate` writes them."""
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
        "strength": request.strength if request.init_image is not None else None,
    }
    return encode_image(outcome.image, "png", infotext(params))


def _preview_png(pixels: np.ndarray) -> bytes:
    """A partial image: a plain PNG (it is no image the parameters would reproduce)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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
    # A body can hold two prompts at the limit (4 bytes/char at worst) plus the other fields;
    # image inputs add up to max_upload_bytes (as base64 in JSON: 4 bytes per 3).
    text_bytes = 16_384 + 8 * limits.max_prompt_chars
    max_body_bytes = text_bytes
    max_generate_bytes = text_bytes + 4 * -(-limits.max_upload_bytes // 3)
    max_edit_bytes = text_bytes + limits.max_upload_bytes
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

    def too_large(limit: int) -> Callable[[int | None], ApiError]:
        def refuse(size: int | None) -> ApiError:
            shown = "larger than" if size is None else f"{size} bytes, above"
            return ApiError(
                413,
                f"The request body is {shown} the limit of {limit} bytes.",
                code="body_too_large",
            )

        return refuse

    async def read(request: Request, model: type, limit: int = max_body_bytes) -> Any:
        """The JSON body, refused as soon as it is known to be too large: by its declared
        Content-Length before reading anything, else while streaming it in."""
        refuse = too_large(limit)
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit():
            if int(declared) > limit:
                raise refuse(int(declared))
        chunks, size = [], 0
        with backend.incoming():  # a forming batch may wait for this request's images
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise refuse(None)
                chunks.append(chunk)
        return parse_body(b"".join(chunks), model)

    retry_after = {"Retry-After": str(max(1, round(limits.retry_after_s)))}

    def check_ready() -> None:
        if not backend.ready():
            raise ApiError(
                503,
                "The model is not ready on this replica (still loading, or its engine failed); "
                "retry shortly.",
                type="server_error",
                code="model_unavailable",
                headers=retry_after,
            )

    async def generate(
        requests: list[GenerationRequest], on_preview: PreviewSink | None = None
    ) -> list[ImageOutcome]:
        """The backend's outcomes within the request timeout; failures as ApiErrors."""
        try:
            running = (
                backend.generate(requests)
                if on_preview is None
                else backend.generate(requests, on_preview)
            )
            outcomes = await asyncio.wait_for(running, timeout=limits.request_timeout_s)
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

    def encode_final(request: GenerationRequest, outcome: ImageOutcome) -> bytes:
        return _png(request, outcome, backend.model_name)

    async def images(
        requests: list[GenerationRequest], kind: str, stream: bool
    ) -> JSONResponse | StreamingResponse:
        """The Images API answer: every image as base64 PNG with its seed, or, streamed, its
        partial images as the engine makes them and then each final image."""
        check_ready()
        if stream:
            events = image_events(kind, requests, generate, _preview_png, encode_final)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        outcomes = await generate(requests)

        def encode() -> list[ImageData]:
            return [
                ImageData(b64_json=base64.b64encode(encode_final(r, o)).decode(), seed=r.seed)
                for r, o in zip(requests, outcomes, strict=True)
            ]

        data = await asyncio.to_thread(encode)
        first = requests[0]
        response = ImagesResponse(
            created=int(time.time()), data=data, size=f"{first.width}x{first.height}"
        )
        return JSONResponse(response.model_dump(), headers=_serving_headers(outcomes))

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
    async def images_generations(request: Request) -> Response:
        """OpenAI Images API: `n` images as base64 PNG, each with its seed; or, with `stream`,
        Server-Sent Events of `partial_images` partials and then the completed images."""
        body: ImagesGenerationRequest = await read(request, ImagesGenerationRequest)
        check_model(body.model, backend.model_name)
        requests = images_requests(body, generation, limits)
        return await images(requests, "generation", bool(body.stream))

    @api.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        """OpenAI Images API edits (multipart: `image`, optional `mask`, `prompt`, ...):
        image-to-image, or inpainting with a mask (transparent, or white where it has no
        transparency, is repainted); answered like /v1/images/generations."""
        with backend.incoming():  # a forming batch may wait for this request's images
            upload = await read_edit_form(
                request, max_edit_bytes, text_bytes, too_large(max_edit_bytes)
            )
        form = parse_form(upload.fields)
        check_model(form.model, backend.model_name)
        shown = {"init_image": upload.image.shown()}
        mask = None
        if upload.mask is not None:
            mask = upload.mask.data
            shown["mask_image"] = upload.mask.shown()
        requests = await asyncio.to_thread(
            edit_requests, form, upload.image.data, mask, generation, limits, shown
        )
        return await images(requests, "edit", bool(form.stream))

    @api.post(
        "/v1/generate",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def generate_png(request: Request) -> Response:
        """One image as image/png; its seed is in the x-sdray-seed header and the PNG text.
        With `init_image` (base64; and `mask_image`), image-to-image or inpainting."""
        body: GenerateRequest = await read(request, GenerateRequest, max_generate_bytes)
        check_model(body.model, backend.model_name)
        one = await asyncio.to_thread(generate_request, body, generation, limits)
        check_ready()
        outcomes = await generate([one])
        png = await asyncio.to_thread(_png, one, outcomes[0], backend.model_name)
        headers = {SEED: str(one.seed), **_serving_headers(outcomes)}
        return Response(png, media_type="image/png", headers=headers)

    return api
