"""`sdray serve` over real HTTP with image inputs and streaming: the official openai client's
`images.edit` (with and without a mask) and streamed `images.generate`/`images.edit`; a client
that disconnects mid-stream breaks nobody else's batch; upload limits and bad images through
Serve's proxy. (Online == offline for image-to-image and inpainting: test_serve.py.)

One server (a subprocess joined to the session's Ray cluster) serves the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdray.images import read_infotext

from .pictures import SIZE, masks, png, scene
from .serve_harness import ServeProcess, start_server

pytestmark = pytest.mark.integration

API_KEY = "sk-sdray-images-4c2e8a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_UPLOAD = 262_144
CONFIG = {
    "generation": {"width": 64, "height": 64, "steps": 4, "max_width": 256, "max_height": 256},
    "serve": {
        "max_batch_size": 4,
        # Long enough that two streams sent together share a batch on a busy machine.
        "batch_wait_timeout_s": 0.5,
        "max_ongoing_requests": 8,
        "max_upload_bytes": MAX_UPLOAD,
        "request_timeout_s": 120,
    },
}


@pytest.fixture(scope="module")
def server(sdray_env, tmp_path_factory) -> ServeProcess:
    directory = tmp_path_factory.mktemp("serve-images")
    process = start_server(directory, sdray_env, CONFIG, api_keys=API_KEY)
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def api(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def psnr(a: bytes, b: bytes) -> float:
    mse = np.mean((pixels(a).astype(np.float64) - pixels(b).astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def generate_png(server: ServeProcess, **body) -> bytes:
    response = httpx.post(f"{server.url}/v1/generate", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_openai_client_edits_with_and_without_a_mask(api, server):
    openai_mask, row_mask = masks()
    extra = {"seed": 21, "steps": 6, "strength": 0.8}
    plain = api.images.edit(
        image=("scene.png", scene(), "image/png"),
        prompt="a red balloon",
        n=2,
        response_format="b64_json",
        extra_body=extra,
    )
    assert [item.seed for item in plain.data] == [21, 22]
    first = base64.b64decode(plain.data[0].b64_json)
    assert pixels(first).shape == (SIZE[1], SIZE[0], 3)
    assert "Denoising strength: 0.8" in read_infotext(first)
    assert "Size: 80x72" in read_infotext(first)

    masked = api.images.edit(
        image=("scene.png", scene(), "image/png"),
        mask=("mask.png", openai_mask, "image/png"),
        prompt="a red balloon",
        extra_body=extra,
    )
    inpainted = base64.b64decode(masked.data[0].b64_json)
    assert psnr(inpainted, first) < 30  # the mask made it an inpainting, not the same img2img
    # OpenAI's transparent area is the rows' white area: the same image as /v1/generate's.
    same = generate_png(
        server,
        prompt="a red balloon",
        init_image=b64(scene()),
        mask_image=b64(row_mask),
        **extra,
    )
    assert psnr(inpainted, same) >= 40


def test_openai_client_streams_partial_images_then_the_image(api, server):
    stream = api.images.generate(
        model="tiny",
        prompt="a lighthouse",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"seed": 31, "steps": 6},
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for event in events[:2]:
        assert pixels(base64.b64decode(event.b64_json)).shape == (64, 64, 3)
    final = base64.b64decode(events[-1].b64_json)
    assert "Seed: 31," in read_infotext(final)
    alone = generate_png(server, prompt="a lighthouse", seed=31, steps=6)
    assert psnr(final, alone) >= 40

    edits = list(
        api.images.edit(
            image=("scene.png", scene(), "image/png"),
            prompt="a kite",
            stream=True,
            partial_images=1,
            extra_body={"seed": 5, "steps": 8},
        )
    )
    assert [event.type for event in edits] == ["image_edit.partial_image", "image_edit.completed"]
    assert edits[-1].size == "80x72"


async def _stream(url: str, body: dict, leave_after_first: bool) -> list[dict]:
    """Read a stream's events; optionally hang up right after the first one."""
    found = []
    async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    found.append(json.loads(line[6:]))
                    if leave_after_first:
                        break  # closes the connection mid-stream
    return found


def test_a_client_that_disconnects_mid_stream_breaks_nobody_elses_batch(server):
    url = f"{server.url}/v1/images/generations"
    common = {"prompt": "a harbour", "steps": 40, "stream": True, "partial_images": 3}
    leaving, staying = {**common, "seed": 41}, {**common, "seed": 42}

    # A batch forms when the engine is free: the two streams go in while a longer stream holds
    # the engine (seen by its first partial image), so they queue together for the next call.
    blocker = {**common, "prompt": "a storm", "steps": 80, "seed": 40}

    async def both():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            async with client.stream("POST", url, json=blocker) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break  # the blocker is in the engine
                together = await asyncio.gather(
                    _stream(url, leaving, True), _stream(url, staying, False)
                )
                async for _ in lines:  # let the blocker finish
                    pass
        return together

    left, stayed = asyncio.run(both())
    assert stayed[-1]["batch_size"] == 2, "the two streams did not share an engine call"
    assert [event["type"] for event in left] == ["image_generation.partial_image"]
    assert [event["type"] for event in stayed] == [
        *["image_generation.partial_image"] * 3,
        "image_generation.completed",
    ]
    final = base64.b64decode(stayed[-1]["b64_json"])
    alone = generate_png(server, prompt="a harbour", steps=40, seed=42)
    assert psnr(final, alone) >= 40
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200


def test_bad_uploads_through_the_proxy(api, server):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        api.images.edit(image=("notes.txt", b"not a picture", "text/plain"), prompt="a")
    assert caught.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.edit(
            image=("scene.png", scene(), "image/png"),
            mask=("mask.png", png(Image.new("RGBA", (16, 16))), "image/png"),
            prompt="a",
        )
    assert caught.value.body["param"] == "mask" and "16x16" in caught.value.body["message"]
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), np.uint8)
    big = png(Image.fromarray(noise))  # ~300 kB, over the 256 kB limit
    assert len(big) > MAX_UPLOAD
    response = httpx.post(
        f"{server.url}/v1/images/edits",
        headers=AUTH,
        data={"prompt": "a"},
        files={"image": ("big.png", big, "image/png")},
        timeout=60,
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"
    too_big = {"prompt": "a", "init_image": b64(big)}
    response = httpx.post(f"{server.url}/v1/generate", json=too_big, headers=AUTH, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
