"""OpenAI image streaming: Server-Sent Events of partial images as the engine decodes them,
then each completed image; failures after the stream began are an `error` event."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sdray.requests import GenerationRequest, denoising_start
from sdray.serve.protocol import ApiError

log = logging.getLogger(__name__)

# Route kind -> the prefix of its event types (`image_generation.partial_image`, ...).
EVENT_PREFIX = {"generation": "image_generation", "edit": "image_edit"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    created_at: int = Field(description="Unix time of the event.")
    size: str = Field(description="WIDTHxHEIGHT of the image.")
    quality: Literal["auto"] = Field("auto", description="Always auto.")
    background: Literal["opaque"] = Field("opaque", description="Always opaque.")
    output_format: Literal["png"] = Field("png", description="Image encoding.")
    b64_json: str = Field(description="Base64 of the PNG file.")
    image_index: int = Field(description="sdray: which of the request's `n` images (0-based).")


class PartialImageEvent(_Event):
    """`image_generation.partial_image` / `image_edit.partial_image`: the model's estimate of
    the final image after a denoising step."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int = Field(description="0-based index of this image's partials.")
    step: int = Field(description="sdray: the denoising step (1-based, of those run).")
    steps: int = Field(description="sdray: the denoising steps run.")


class UsageDetails(BaseModel):
    """Token counts of the prompt (GPT image models only; sdray reports zeros)."""

    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """Token usage (GPT image models only; sdray reports zeros)."""

    input_tokens: int = 0
    input_tokens_details: UsageDetails = Field(default_factory=UsageDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class CompletedImageEvent(_Event):
    """`image_generation.completed` / `image_edit.completed`: a final image (PNG with its
    parameters embedded), its seed and the engine batch it rode in."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: Usage = Field(default_factory=Usage, description="Zeros: no tokens are billed.")
    seed: int = Field(description="sdray: the seed that reproduces this image.")
    batch_size: int = Field(description="sdray: images in the engine call that made it.")


def sse(event_type: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode()


def error_event(error: ApiError) -> bytes:
    """The stream's `error` event: the OpenAI error body, which the openai client raises."""
    return sse("error", error.body())


Generate = Callable[[list[GenerationRequest], Callable[[int, int, np.ndarray], None]], Awaitable]


async def image_events(
    kind: str,
    requests: list[GenerationRequest],
    generate: Generate,
    encode_preview: Callable[[np.ndarray], bytes],
    encode_final: Callable[[GenerationRequest, Any], bytes],
) -> AsyncIterator[bytes]:
    """The event stream of one request: its images' partials as the engine decodes them
    (`generate(requests, on_preview)` calls `on_preview(index, step, pixels)` from any thread),
    then one completed event per image, in order.

    If the client goes away, the generator is cancelled and so is `generate`: its images leave
    the replica's queue, or, already in an engine call, finish there without holding anyone up.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    prefix = EVENT_PREFIX[kind]

    def on_preview(index: int, step: int, pixels: np.ndarray) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, step, pixels))

    task = asyncio.ensure_future(generate(requests, on_preview))
    # Callbacks run in order: every preview the engine sent is queued before this marker.
    task.add_done_callback(lambda _: queue.put_nowait(None))
    sent: list[set[int]] = [set() for _ in requests]  # a batch retried alone repeats steps
    try:
        while (item := await queue.get()) is not None:
            index, step, pixels = item
            if step in sent[index]:
                continue
            sent[index].add(step)
            request = requests[index]
            png = await asyncio.to_thread(encode_preview, pixels)
            event = PartialImageEvent(
                type=f"{prefix}.partial_image",
                created_at=int(time.time()),
                size=f"{request.width}x{request.height}",
                b64_json=base64.b64encode(png).decode(),
                image_index=index,
                partial_image_index=len(sent[index]) - 1,
                step=step,
                steps=request.steps - denoising_start(request.steps, request.strength),
            )
            yield sse(event.type, event.model_dump())
        try:
            outcomes = task.result()
        except ApiError as error:
            yield error_event(error)
            return
        except Exception:  # noqa: BLE001 - the stream has begun: report it as an event
            error_id = uuid.uuid4().hex[:12]
            log.exception("streamed generation failed (error id %s)", error_id)
            yield error_event(
                ApiError(
                    500,
                    f"The server failed to handle the request (error id {error_id}).",
                    type="server_error",
                    code="server_error",
                )
            )
            return
        for index, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            png = await asyncio.to_thread(encode_final, request, outcome)
            event = CompletedImageEvent(
                type=f"{prefix}.completed",
                created_at=int(time.time()),
                size=f"{request.width}x{request.height}",
                b64_json=base64.b64encode(png).decode(),
                image_index=index,
                seed=request.seed,
                batch_size=outcome.batch_size,
            )
            yield sse(event.type, event.model_dump())
    finally:
        task.cancel()
