"""Image inputs and streaming in the HTTP API, in process over a fake backend: /v1/images/edits
(multipart, OpenAI's mask convention, limits, every bad upload), init images in /v1/generate,
and Server-Sent Events in the shape the openai client parses."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdray.images import mask_layer, read_infotext
from sdray.serve.protocol import preview_steps
from tests.unit.test_serve_api import FakeBackend, assert_error, call

EDITS, GENERATIONS, ONE = "/v1/images/edits", "/v1/images/generations", "/v1/generate"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width: int = 80, height: int = 72) -> Image.Image:
    """A starting picture drawn in code: left half red, right half blue."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    ImageDraw.Draw(image).rectangle((width // 2, 0, width, height), fill=(30, 30, 200))
    return image


def alpha_mask(width: int = 80, height: int = 72) -> Image.Image:
    """OpenAI's kind of mask: opaque, with a transparent (to be edited) left half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, width // 2 - 1, height), fill=(0, 0, 0, 0))
    return mask


def edit(backend, fields=None, files=None, **kwargs):
    files = files if files is not None else {"image": ("pic.png", png(picture()), "image/png")}
    data = {"prompt": "a red cube", **(fields or {})}
    return call(backend, "POST", EDITS, data=data, files=files, **kwargs)


def images_of(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(d["b64_json"]) for d in response.json()["data"]]


def test_an_edit_is_image_to_image_at_the_pictures_size():
    backend = FakeBackend()
    response = edit(backend, {"n": "2", "seed": "5", "steps": "4", "strength": "0.5"})
    first, second = images_of(response)
    assert response.json()["size"] == "80x72"
    assert [d["seed"] for d in response.json()["data"]] == [5, 6]
    request = backend.seen[0]
    assert (request.mode, request.strength, request.width, request.height) == (
        "img2img",
        0.5,
        80,
        72,
    )
    assert np.array_equal(request.init_image, np.asarray(picture()))
    assert "Denoising strength: 0.5" in read_infotext(first)
    assert "Seed: 6," in read_infotext(second)


def test_an_edit_takes_the_default_strength_and_a_size_crops_without_distortion():
    backend = FakeBackend()
    images_of(edit(backend, {"size": "64x64"}))
    request = backend.seen[0]
    assert (request.width, request.height, request.strength) == (64, 64, 0.75)
    # Covered and centre-cropped: 80x72 scaled to 71x64, the middle 64 columns kept.
    left, right = request.init_image[32, 2], request.init_image[32, -3]
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]


def test_image_brackets_is_one_image_too():
    backend = FakeBackend()
    files = [("image[]", ("pic.png", png(picture()), "image/png"))]
    images_of(edit(backend, files=files))
    assert backend.seen[0].mode == "img2img"


def test_a_mask_with_alpha_repaints_where_it_is_transparent():
    backend = FakeBackend()
    files = {
        "image": ("pic.png", png(picture()), "image/png"),
        "mask": ("mask.png", png(alpha_mask()), "image/png"),
    }
    images_of(edit(backend, files=files))
    request = backend.seen[0]
    assert request.mode == "inpaint" and request.mask_image.shape == (72, 80)
    assert (request.mask_image[:, :38] >= 128).all()  # transparent: repaint
    assert (request.mask_image[:, 42:] < 128).all()  # opaque: keep


def test_mask_conventions():
    opaque_white = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.asarray(mask_layer(opaque_white, alpha=True)).min() == 255  # no transparency
    grey = Image.new("L", (8, 8), 0)
    ImageDraw.Draw(grey).rectangle((0, 0, 3, 7), fill=255)
    assert np.asarray(mask_layer(grey, alpha=True))[:, :4].min() == 255
    assert np.asarray(mask_layer(grey, alpha=True))[:, 4:].max() == 0
    half = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    ImageDraw.Draw(half).rectangle((0, 0, 3, 7), fill=(255, 255, 255, 0))
    assert np.asarray(mask_layer(half, alpha=True))[:, :4].min() == 255
    assert np.asarray(mask_layer(half, alpha=True))[:, 4:].max() == 0
    # Rows (alpha=False) read luminance only: this mask is white everywhere.
    assert np.asarray(mask_layer(half)).min() == 255
    palette = half.convert("P")  # transparency as a palette entry (tRNS)
    assert palette.has_transparency_data
    assert np.asarray(mask_layer(palette, alpha=True))[:, :4].min() == 255


def bad_png() -> bytes:
    """A truncated PNG: its header reads, its pixels do not."""
    noise = np.random.default_rng(2).integers(0, 256, (72, 80, 3), np.uint8)
    data = png(Image.fromarray(noise))
    return data[: len(data) // 2]


BAD_EDITS = [
    # (form fields, files, status, param, code)
    ({}, {}, 400, "image", "missing_parameter"),
    ({"image": "not a file"}, {}, 400, "image", "invalid_value"),
    ({}, {"image": ("a.png", b"", "image/png")}, 400, "image", "invalid_value"),
    ({}, {"image": ("a.txt", b"hello there", "text/plain")}, 400, "image", "invalid_value"),
    ({}, {"image": ("a.png", bad_png(), "image/png")}, 400, "image", "invalid_value"),
    (
        {},
        [("image[]", ("a.png", png(picture()), "image/png"))] * 2,
        400,
        "image",
        "invalid_value",
    ),
    (
        {},
        {
            "image": ("a.png", png(picture()), "image/png"),
            "mask": ("m.png", png(alpha_mask(40, 36)), "image/png"),
        },
        400,
        "mask",
        "invalid_value",
    ),
    (
        {},
        {
            "image": ("a.png", png(picture()), "image/png"),
            "mask": ("m.png", b"GIF89a nonsense", "image/gif"),
        },
        400,
        "mask",
        "invalid_value",
    ),
    ({"strength": "0"}, None, 400, "strength", "invalid_value"),
    ({"strength": "1.5"}, None, 400, "strength", "invalid_value"),
    ({"strength": "strong"}, None, 400, "strength", "invalid_type"),
    ({"steps": "2", "strength": "0.2"}, None, 400, "strength", "invalid_value"),
    ({"size": "65x64"}, None, 400, "size", "invalid_value"),
    ({"size": "4096x64"}, None, 400, "size", "invalid_value"),
    ({"n": "9"}, None, 400, "n", "above_limit"),
    ({"n": "two"}, None, 400, "n", "invalid_type"),
    ({"response_format": "url"}, None, 400, "response_format", "invalid_value"),
    ({"background": "transparent"}, None, 400, "background", "invalid_value"),
    ({"partial_images": "4", "stream": "true"}, None, 400, "partial_images", "invalid_value"),
    ({"stream": "maybe"}, None, 400, "stream", "invalid_type"),
    ({"markup": "x"}, None, 400, "markup", "unknown_parameter"),
    ({"scheduler": "nope"}, None, 400, "scheduler", "invalid_value"),
    ({"prompt": ""}, None, 400, "prompt", "invalid_value"),
    ({"prompt": "x" * 101}, None, 400, "prompt", "above_limit"),
    ({"model": "gpt-image-1"}, None, 404, "model", "model_not_found"),
    (
        {},
        {
            "image": ("a.png", png(picture()), "image/png"),
            "seed": ("s.txt", b"1", "text/plain"),
        },
        400,
        "seed",
        "invalid_type",
    ),
]


@pytest.mark.parametrize(
    ("fields", "files", "status", "param", "code"),
    BAD_EDITS,
    ids=[f"{case[3]}-{i}" for i, case in enumerate(BAD_EDITS)],
)
def test_bad_edits_are_4xx_naming_the_parameter(fields, files, status, param, code):
    backend = FakeBackend()
    if files == {}:  # no file at all: a text part keeps the body multipart
        files = {"n": (None, "1")}
    error = assert_error(edit(backend, fields, files), status, code)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert backend.seen == []


def test_an_edit_must_be_multipart():
    backend = FakeBackend()
    response = call(backend, "POST", EDITS, json={"prompt": "a", "image": "aGk="})
    assert_error(response, 415, "unsupported_media_type")


def test_an_upload_over_the_limit_is_refused_by_its_content_length_before_reading():
    sent = []

    async def body():
        for _ in range(1_000):
            sent.append(1)
            yield b"x" * 65_536

    headers = {
        "content-type": "multipart/form-data; boundary=xyz",
        "content-length": str(1_000 * 65_536),
    }
    response = call(FakeBackend(), "POST", EDITS, content=body(), headers=headers)
    error = assert_error(response, 413, "body_too_large")
    assert f"{1_000 * 65_536} bytes" in error["message"]
    assert len(sent) <= 1, f"{len(sent)} chunks were read before refusing"


def test_a_chunked_upload_is_read_only_up_to_the_limit():
    sent = []
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), np.uint8)
    big = png(Image.fromarray(noise))  # ~77 kB, over the 30 kB upload limit
    boundary = b"xyz"
    parts = (
        b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--xyz--\r\n"
    )

    async def body():  # no Content-Length: chunked
        for start in range(0, len(parts), 4_096):
            sent.append(1)
            yield parts[start : start + 4_096]

    headers = {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}
    backend = FakeBackend()
    response = call(backend, "POST", EDITS, content=body(), headers=headers)
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413, "body_too_large")
    assert "larger than" in error["message"]
    assert len(sent) < len(parts) // 4_096, "the whole body was read before refusing"
    assert backend.seen == []


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    backend = FakeBackend()
    backend.config.generation.max_input_pixels = 1_000
    response = edit(backend)
    error = assert_error(response, 400, "invalid_value")
    assert error["param"] == "image" and "80x72" in error["message"]
    assert "max_input_pixels" in error["message"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_generate_takes_base64_init_images_with_the_rows_mask_convention():
    backend = FakeBackend()
    mask = Image.new("L", (80, 72), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 39, 72), fill=255)  # white: repaint
    body = {
        "prompt": "a",
        "seed": 3,
        "steps": 4,
        "strength": 0.5,
        "init_image": "data:image/png;base64," + b64(png(picture())),
        "mask_image": b64(png(mask)),
    }
    response = call(backend, "POST", ONE, json=body)
    assert response.status_code == 200, response.text
    request = backend.seen[0]
    assert (request.mode, request.strength, request.width, request.height) == (
        "inpaint",
        0.5,
        80,
        72,
    )
    assert (request.mask_image[:, :38] == 255).all() and (request.mask_image[:, 42:] == 0).all()
    assert "Denoising strength: 0.5" in read_infotext(response.content)


BAD_GENERATES = [
    ({"init_image": "not base64!"}, 400, "init_image", "invalid_value"),
    ({"init_image": ""}, 400, "init_image", "invalid_value"),
    ({"init_image": b64(b"plain text")}, 400, "init_image", "invalid_value"),
    ({"init_image": b64(bad_png())}, 400, "init_image", "invalid_value"),
    ({"mask_image": b64(png(alpha_mask()))}, 400, "mask_image", "invalid_value"),
    (
        {"init_image": b64(png(picture())), "mask_image": b64(png(alpha_mask(40, 36)))},
        400,
        "mask_image",
        "invalid_value",
    ),
    ({"strength": 0.5}, 400, "strength", "invalid_value"),
    ({"init_image": b64(png(picture())), "strength": 0}, 400, "strength", "invalid_value"),
    ({"init_image": b64(png(picture())), "strength": "0.5"}, 400, "strength", "invalid_type"),
    ({"init_image": 5}, 400, "init_image", "invalid_type"),
]


@pytest.mark.parametrize(
    ("extra", "status", "param", "code"),
    BAD_GENERATES,
    ids=[f"{case[2]}-{i}" for i, case in enumerate(BAD_GENERATES)],
)
def test_bad_init_images_in_generate_are_400s_naming_the_parameter(extra, status, param, code):
    backend = FakeBackend()
    response = call(backend, "POST", ONE, json={"prompt": "a", **extra})
    error = assert_error(response, status, code)
    assert error["param"] == param, error
    assert backend.seen == []


def test_generate_accepts_images_up_to_the_upload_limit_and_refuses_more():
    noise = np.random.default_rng(1).integers(0, 256, (96, 96, 3), np.uint8)
    near = png(Image.fromarray(noise))  # ~28 kB, under the 30 kB upload limit
    assert 25_000 < len(near) < 30_000
    backend = FakeBackend()
    body = {"prompt": "a", "init_image": b64(near), "steps": 4}
    assert call(backend, "POST", ONE, json=body).status_code == 200
    over = {"prompt": "a", "init_image": b64(near + near), "steps": 4}
    assert_error(call(backend, "POST", ONE, json=over), 413, "body_too_large")
    # Images widen only /v1/generate's limit, not that of text-only routes.
    text = {"prompt": "a", "user": "x" * 40_000}
    assert_error(call(backend, "POST", GENERATIONS, json=text), 413, "body_too_large")


def events(response) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a response: (event type, data)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    found = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_preview_steps_are_evenly_spaced_before_the_last():
    assert preview_steps(6, None, 2) == (2, 4)
    assert preview_steps(20, None, 3) == (5, 10, 15)
    assert preview_steps(20, 0.5, 1) == (5,)  # of the 10 steps run
    assert preview_steps(2, None, 3) == (1,)  # a short schedule streams fewer
    assert preview_steps(1, None, 3) == ()
    assert preview_steps(20, None, 0) == ()


def test_streamed_generation_sends_partials_then_the_completed_image_as_openai_types():
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    backend = FakeBackend()
    body = {"prompt": "a", "seed": 9, "steps": 6, "stream": True, "partial_images": 2}
    found = events(call(backend, "POST", GENERATIONS, json=body))
    assert [kind for kind, _ in found] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert backend.seen[0].preview_at == (2, 4)
    for index, (kind, data) in enumerate(found[:2]):
        event = ImageGenPartialImageEvent.model_validate(data)
        assert event.type == kind and event.partial_image_index == index
        assert (data["step"], data["steps"], event.size) == (2 * (index + 1), 6, "64x64")
        partial = np.asarray(Image.open(io.BytesIO(base64.b64decode(event.b64_json))))
        assert partial.shape == (64, 64, 3) and (partial == data["step"]).all()
    completed = ImageGenCompletedEvent.model_validate(found[2][1])
    final = base64.b64decode(completed.b64_json)
    assert "Seed: 9," in read_infotext(final) and found[2][1]["seed"] == 9
    assert (np.asarray(Image.open(io.BytesIO(final))) == 9).all()


def test_a_stream_without_partials_and_with_n_images():
    backend = FakeBackend()
    body = {"prompt": "a", "seed": 1, "n": 2, "stream": True}
    found = events(call(backend, "POST", GENERATIONS, json=body))
    assert [(kind, data["image_index"], data["seed"]) for kind, data in found] == [
        ("image_generation.completed", 0, 1),
        ("image_generation.completed", 1, 2),
    ]
    assert backend.seen[0].preview_at == ()
    # partial_images without stream asks for no previews.
    call(backend, "POST", GENERATIONS, json={"prompt": "a", "partial_images": 2})
    assert backend.seen[-1].preview_at == ()


def test_streamed_edits_use_the_edit_event_types():
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent

    backend = FakeBackend()
    fields = {"steps": "8", "strength": "0.5", "stream": "true", "partial_images": "1"}
    found = events(edit(backend, fields))
    assert [kind for kind, _ in found] == ["image_edit.partial_image", "image_edit.completed"]
    partial = ImageEditPartialImageEvent.model_validate(found[0][1])
    assert (found[0][1]["step"], found[0][1]["steps"], partial.size) == (2, 4, "80x72")
    completed = ImageEditCompletedEvent.model_validate(found[1][1])
    final = np.asarray(Image.open(io.BytesIO(base64.b64decode(completed.b64_json))))
    assert np.array_equal(final, np.asarray(picture()))


def test_a_failure_after_the_stream_began_is_an_error_event():
    backend = FakeBackend(fail="TypeError: secret internals")
    body = {"prompt": "a", "steps": 6, "stream": True, "partial_images": 1}
    found = events(call(backend, "POST", GENERATIONS, json=body))
    assert [kind for kind, _ in found] == ["image_generation.partial_image", "error"]
    error = found[1][1]["error"]
    assert error["code"] == "server_error" and "error id e1d" in error["message"]
    assert "secret" not in json.dumps(found[1][1])


def test_a_stream_refused_before_it_begins_is_a_plain_error():
    backend = FakeBackend(loaded=False)
    body = {"prompt": "a", "stream": True, "partial_images": 1}
    assert_error(call(backend, "POST", GENERATIONS, json=body), 503, "model_unavailable")
    bad = {"prompt": "a", "stream": True, "partial_images": -1}
    assert_error(call(FakeBackend(), "POST", GENERATIONS, json=bad), 400, "invalid_value")


def test_a_stream_whose_client_left_cancels_its_generation():
    """Starlette cancels a streaming response's iteration when the client goes; the stream
    then cancels the generation it waits for, which frees the request's place in the replica."""
    from sdray.requests import GenerationRequest
    from sdray.serve.streaming import image_events

    one = GenerationRequest("r", "a", "", 1, 6, 7.5, 64, 64, "ddim", preview_at=(2, 4))

    async def scenario():
        cancelled = asyncio.Event()

        async def generate(requests, on_preview):
            on_preview(0, 2, np.zeros((64, 64, 3), np.uint8))
            try:
                await asyncio.Event().wait()  # an engine call that is still running
            except asyncio.CancelledError:
                cancelled.set()
                raise

        events = image_events("generation", [one], generate, lambda px: b"png", None)
        first = await asyncio.wait_for(anext(events), 30)
        await events.aclose()  # the client has gone
        await asyncio.wait_for(cancelled.wait(), 30)
        return first

    first = asyncio.run(scenario())
    assert first.startswith(b"event: image_generation.partial_image\n")
