"""The FastAPI app over a fake backend, in process: routes, headers and server-side errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdray.config import config_from_dict
from sdray.images import read_infotext
from sdray.serve.api import (
    BATCH_SIZE,
    ENGINE_MS,
    OUT_OF_MEMORY,
    SEED,
    SERVER_ERROR,
    UNAVAILABLE,
    ImageOutcome,
    create_api,
)
from sdray.serve.auth import api_key_digests


class FakeBackend:
    """Answers with a flat image per request (its init image, for image-to-image), or fails
    (with an error code)/stalls as told; sends each preview a request asks for, from a thread,
    as a flat image of the step's value."""

    def __init__(
        self,
        *,
        fail: str | None = None,
        code: str = SERVER_ERROR,
        stall_s: float = 0.0,
        loaded: bool = True,
    ):
        self.config = config_from_dict(
            {
                "generation": {"width": 64, "height": 64, "steps": 2},
                "serve": {
                    "request_timeout_s": 0.2,
                    "max_prompt_chars": 100,
                    "max_upload_bytes": 30_000,
                },
            }
        )
        self.model_name = "fake"
        self.family = "sd"
        self.device = "cpu"
        self.load_seconds = 0.5
        self.loaded_at = time.time()
        self.fail = fail
        self.code = code
        self.stall_s = stall_s
        self.loaded = loaded
        self.seen: list = []

    def ready(self) -> bool:
        return self.loaded

    def incoming(self):
        return contextlib.nullcontext()

    async def generate(self, requests, on_preview=None):
        self.seen.extend(requests)
        if on_preview is not None:

            def previews():
                for index, r in enumerate(requests):
                    for step in r.preview_at:
                        on_preview(index, step, np.full((r.height, r.width, 3), step, np.uint8))

            await asyncio.to_thread(previews)
        await asyncio.sleep(self.stall_s)
        return [
            ImageOutcome(
                image=None
                if self.fail
                else r.init_image
                if r.init_image is not None
                else np.full((r.height, r.width, 3), r.seed % 256, np.uint8),
                error=self.fail,
                truncated=False,
                call_id=0,
                batch_size=len(requests),
                engine_seconds=0.01,
                queue_seconds=0.0,
                error_id="e1d" if self.fail else None,
                error_code=self.code,
            )
            for r in requests
        ]


def call(backend: FakeBackend, method: str, path: str, keys: str = "", **kwargs) -> httpx.Response:
    async def go():
        digests = api_key_digests(keys) if keys else ()
        transport = httpx.ASGITransport(app=create_api(backend, digests))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def assert_error(response: httpx.Response, status: int, code: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]


def test_images_route_returns_pngs_with_seeds_and_serving_headers():
    backend = FakeBackend()
    response = call(
        backend, "POST", "/v1/images/generations", json={"prompt": "a", "n": 2, "seed": 41}
    )
    assert response.status_code == 200
    body = response.json()
    assert [d["seed"] for d in body["data"]] == [41, 42]
    assert body["size"] == "64x64"
    png = base64.b64decode(body["data"][1]["b64_json"])
    assert np.asarray(Image.open(io.BytesIO(png)))[0, 0, 0] == 42
    assert "Seed: 42" in read_infotext(png) and "Model: fake" in read_infotext(png)
    assert response.headers[BATCH_SIZE] == "2" and float(response.headers[ENGINE_MS]) > 0


def test_generate_route_returns_one_png():
    response = call(FakeBackend(), "POST", "/v1/generate", json={"prompt": "a", "seed": 7})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers[SEED] == "7"


def test_engine_failure_is_a_500_with_an_error_id_but_not_the_error(caplog):
    backend = FakeBackend(fail="TypeError: secret internals")
    response = call(backend, "POST", "/v1/generate", json={"prompt": "a"})
    error = assert_error(response, 500, "server_error")
    assert error["type"] == "server_error" and "error id e1d" in error["message"]
    assert "secret" not in response.text and "TypeError" not in response.text
    assert "secret internals" in caplog.text and "e1d" in caplog.text  # the server's log has it


@pytest.mark.parametrize(("code", "words"), [(OUT_OF_MEMORY, "memory"), (UNAVAILABLE, "replaced")])
def test_out_of_memory_and_a_failed_engine_are_503s_with_retry_after(code, words):
    backend = FakeBackend(fail="OutOfMemoryError: CUDA out of memory", code=code)
    response = call(backend, "POST", "/v1/images/generations", json={"prompt": "a", "n": 2})
    error = assert_error(response, 503, code)
    assert words in error["message"] and "CUDA" not in error["message"]
    assert response.headers["retry-after"] == "1"


def test_request_timeout_is_a_504():
    response = call(FakeBackend(stall_s=30), "POST", "/v1/generate", json={"prompt": "a"})
    assert assert_error(response, 504, "timeout")["type"] == "server_error"


def test_no_generation_while_the_replica_is_not_ready():
    backend = FakeBackend(loaded=False)
    health = call(backend, "GET", "/healthz")
    assert health.status_code == 503 and health.json() == {"status": "unavailable"}
    response = call(backend, "POST", "/v1/generate", json={"prompt": "a"})
    assert_error(response, 503, "model_unavailable")
    assert response.headers["retry-after"] == "1"
    assert backend.seen == []


def test_oversized_body_is_413_before_parsing():
    response = call(FakeBackend(), "POST", "/v1/generate", content=b"x" * 100_000)
    error = assert_error(response, 413, "body_too_large")
    assert "100000 bytes" in error["message"]


def test_declared_content_length_is_refused_before_the_body_is_read():
    sent = []

    async def body():
        for _ in range(10_000):
            sent.append(1)
            yield b"x" * 65_536

    headers = {"content-length": str(10_000 * 65_536)}
    response = call(FakeBackend(), "POST", "/v1/generate", content=body(), headers=headers)
    assert_error(response, 413, "body_too_large")
    assert len(sent) <= 1, f"{len(sent)} chunks were read before refusing"


def test_a_streamed_body_is_read_only_up_to_the_limit():
    sent = []

    async def body():  # no Content-Length: chunked
        for _ in range(10_000):
            sent.append(1)
            yield b"x" * 8_192

    response = call(FakeBackend(), "POST", "/v1/images/generations", content=body())
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413, "body_too_large")
    assert "larger than" in error["message"]
    assert len(sent) < 10, f"{len(sent)} chunks were read before refusing"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"prompt": "a red \ud800 cube"}', "prompt"),
        (rb'{"prompt": "a", "negative_prompt": "\udfff"}', "negative_prompt"),
        (rb'{"prompt": "a", "user": "\ud83d"}', "user"),
        (rb'{"prompt": "a", "model": "x\ud800"}', "model"),
        (rb'{"prompt": "a", "style": ["ok", {"k": "\ud800"}]}', "style"),
        (rb'{"prompt": "a", "\ud800": 1}', "\\ud800"),
    ],
)
def test_text_that_is_not_unicode_is_a_400_naming_the_parameter(raw, param):
    backend = FakeBackend()
    for route in ("/v1/images/generations", "/v1/generate"):
        response = call(backend, "POST", route, content=raw)
        error = assert_error(response, 400, "invalid_value")
        assert error["param"] == param and "not valid Unicode" in error["message"]
    assert backend.seen == []
    # A valid surrogate pair is an ordinary character.
    ok = call(backend, "POST", "/v1/generate", content=rb'{"prompt": "a \ud83d\ude00"}')
    assert ok.status_code == 200 and backend.seen[0].prompt == "a \U0001f600"


def test_deeply_nested_json_is_a_400():
    response = call(FakeBackend(), "POST", "/v1/generate", content=b"[" * 8_000 + b"]" * 8_000)
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/v1/generate", 405, "method_not_allowed")],
)
def test_routing_errors_use_the_openai_body(method, path, status, code):
    assert_error(call(FakeBackend(), method, path), status, code)


def test_auth_guards_every_route_but_healthz():
    backend = FakeBackend()
    keys = "sk-a,sk-b"
    assert call(backend, "GET", "/healthz", keys).status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/generate"), ("GET", "/nope")]:
        assert_error(call(backend, method, path, keys), 401, "missing_api_key")
    wrong = {"Authorization": "Bearer sk-c"}
    assert_error(call(backend, "GET", "/v1/models", keys, headers=wrong), 401, "invalid_api_key")
    good = {"Authorization": "Bearer sk-b"}
    assert call(backend, "GET", "/v1/models", keys, headers=good).json()["data"][0]["id"] == "fake"
    assert backend.seen == []


def test_unexpected_exceptions_are_500s_with_an_openai_body():
    class Broken(FakeBackend):
        async def generate(self, requests):
            raise RuntimeError("secret internals")

    async def go():
        app = create_api(Broken())
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/generate", json={"prompt": "a"})

    error = assert_error(asyncio.run(go()), 500, "server_error")
    assert "error id" in error["message"]
    assert "secret" not in error["message"] and "RuntimeError" not in error["message"]


def test_load_generator_is_bounded_and_reads_the_serving_headers():
    from serve_load import (
        batching_gain,
        request_bodies,
        round_order,
        run_load,
        summarize,
    )

    transport = httpx.ASGITransport(app=create_api(FakeBackend()))
    bodies = request_bodies(3, width=64, height=64, steps=2)
    run = asyncio.run(
        run_load(
            "http://test/v1/images/generations",
            bodies,
            concurrency=4,
            requests=10,
            time_limit_s=60,
            transport=transport,
        )
    )
    assert len(run.samples) == 10 and {s.status for s in run.samples} == {200}
    summary = summarize([run, run])
    assert summary["requests"] == 20 and summary["ok"] == 20 and summary["failed"] == {}
    assert summary["engine_ms_p50"] == 10.0 and summary["mean_batch_size"] == 1
    latency = summary["latency_ms"]
    assert latency["p50"] <= latency["p95"] <= latency["p99"]
    rows = [
        {"mode": "on", "concurrency": 4, "throughput_rps": 3.0},
        {"mode": "off", "concurrency": 4, "throughput_rps": 2.0},
    ]
    assert batching_gain(rows, "on", "off") == {"4": 1.5}
    assert round_order(["on", "off"], 3) == ["on", "off", "off", "on", "on", "off"]
    path = summary["serve_path_ms"]
    assert path["p50"] is not None and path["p50"] <= summary["overhead_ms"]["p50"]
    stopped = asyncio.run(
        run_load(
            "http://test/v1/images/generations",
            bodies,
            concurrency=1,
            requests=10**6,
            time_limit_s=0.2,
            transport=transport,
        )
    )
    assert 0 < len(stopped.samples) < 10**6
