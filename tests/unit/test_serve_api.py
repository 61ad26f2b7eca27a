"""The FastAPI app over a fake backend, in process: routes, headers and server-side errors."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdray.config import config_from_dict
from sdray.images import read_infotext
from sdray.serve.api import BATCH_SIZE, ENGINE_MS, SEED, ImageOutcome, create_api
from sdray.serve.auth import api_key_digests


class FakeBackend:
    """Answers with a flat image per request, or fails/stalls as told."""

    def __init__(self, *, fail: str | None = None, stall_s: float = 0.0, loaded: bool = True):
        self.config = config_from_dict(
            {
                "generation": {"width": 64, "height": 64, "steps": 2},
                "serve": {"request_timeout_s": 0.2, "max_prompt_chars": 100},
            }
        )
        self.model_name = "fake"
        self.device = "cpu"
        self.load_seconds = 0.5
        self.loaded_at = time.time()
        self.fail = fail
        self.stall_s = stall_s
        self.loaded = loaded
        self.seen: list = []

    def ready(self) -> bool:
        return self.loaded

    async def generate(self, requests):
        self.seen.extend(requests)
        await asyncio.sleep(self.stall_s)
        return [
            ImageOutcome(
                image=None
                if self.fail
                else np.full((r.height, r.width, 3), r.seed % 256, np.uint8),
                error=self.fail,
                truncated=False,
                call_id=0,
                batch_size=len(requests),
                engine_seconds=0.01,
                queue_seconds=0.0,
            )
            for r in requests
        ]


def call(backend: FakeBackend, method: str, path: str, keys: str = "", **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_api(backend, api_key_digests(keys)))
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


def test_engine_failure_is_a_500_with_an_openai_body():
    response = call(FakeBackend(fail="boom"), "POST", "/v1/generate", json={"prompt": "a"})
    error = assert_error(response, 500, None)
    assert error["type"] == "server_error" and "boom" in error["message"]


def test_request_timeout_is_a_504():
    response = call(FakeBackend(stall_s=30), "POST", "/v1/generate", json={"prompt": "a"})
    assert assert_error(response, 504, "timeout")["type"] == "server_error"


def test_no_generation_before_the_model_is_loaded():
    backend = FakeBackend(loaded=False)
    assert call(backend, "GET", "/healthz").status_code == 503
    response = call(backend, "POST", "/v1/generate", json={"prompt": "a"})
    assert_error(response, 503, "model_loading")
    assert response.headers["retry-after"] == "1"
    assert backend.seen == []


def test_oversized_body_is_413_before_parsing():
    response = call(FakeBackend(), "POST", "/v1/generate", content=b"x" * 100_000)
    assert_error(response, 413, "body_too_large")


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
    assert "RuntimeError" in error["message"] and "secret" not in error["message"]


def test_load_generator_is_bounded_and_reads_the_serving_headers():
    from sdray.serve.loadgen import batching_gain, request_bodies, run_load, summarize

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
