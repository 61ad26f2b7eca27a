"""`sdray serve` over real HTTP on loopback: OpenAI client, determinism, online == offline
(text-to-image, image-to-image and inpainting), batching, every error path, auth, overload and
a clean SIGTERM shutdown.

One server (a subprocess joined to the session's Ray cluster) serves the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdray.images import read_infotext

from .pictures import masks, scene
from .serve_harness import ServeProcess, accepts_connections, start_server

pytestmark = pytest.mark.integration

API_KEY = "sk-sdray-test-7f3a9c1e5b"
SECOND_KEY = "sk-sdray-second-2d8e4f6a"
WRONG_KEY = "sk-sdray-wrong-9b1c3e5d"
RETRY_AFTER = 2
CONFIG = {
    "generation": {
        "width": 64,
        "height": 64,
        "steps": 2,
        "max_steps": 60,
        "max_width": 256,
        "max_height": 256,
    },
    "serve": {
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.25,
        "max_ongoing_requests": 4,
        "max_queued_requests": 4,
        "max_n": 4,
        "max_prompt_chars": 200,
        "max_upload_bytes": 65_536,  # /v1/generate takes up to ~105 kB (base64 images)
        "retry_after_s": RETRY_AFTER,
        "request_timeout_s": 120,
    },
}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(sdray_env, tmp_path_factory) -> ServeProcess:
    """`sdray serve` with two API keys, for the whole module."""
    directory = tmp_path_factory.mktemp("serve")
    process = start_server(directory, sdray_env, CONFIG, api_keys=f"{API_KEY}, {SECOND_KEY}")
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        yield http


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def psnr(a: bytes, b: bytes) -> float:
    mse = np.mean((pixels(a).astype(np.float64) - pixels(b).astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_same_image(a: bytes, b: bytes) -> None:
    """Same image across different batch compositions: the engine's contract (test_engine.py)
    is PSNR >= 40, since batched kernels may round a pixel differently; other seeds give ~10."""
    assert psnr(a, b) >= 40


def generate_png(client: httpx.Client, **body) -> httpx.Response:
    response = client.post("/v1/generate", json={"prompt": "a red cube", **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return response


def images(client: httpx.Client, **body) -> tuple[list[bytes], list[int], httpx.Response]:
    response = client.post("/v1/images/generations", json={"prompt": "a red cube", **body})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return [base64.b64decode(d["b64_json"]) for d in data], [d["seed"] for d in data], response


def test_healthz_is_open_and_reports_the_loaded_model(server):
    response = httpx.get(f"{server.url}/healthz", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model"] == "tiny"
    assert body["load_seconds"] > 0


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["family"]) for m in body["data"]] == [("tiny", "sd")]


def test_openai_client_works_unchanged(server):
    import openai

    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model = api.models.list().data[0].id
    result = api.images.generate(
        model=model,
        prompt="a red cube",
        n=2,
        size="64x64",
        response_format="b64_json",
        quality="standard",  # OpenAI-only settings are accepted and ignored
        style="vivid",
        extra_body={"seed": 1, "steps": 2},
    )
    assert len(result.data) == 2
    assert [item.seed for item in result.data] == [1, 2]
    for item, seed in zip(result.data, (1, 2), strict=True):
        png = base64.b64decode(item.b64_json)
        assert pixels(png).shape == (64, 64, 3)
        assert f"Seed: {seed}," in read_infotext(png)
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model=model, prompt="a red cube", size="65x64")
    assert caught.value.body["param"] == "size"


def test_seeds_are_reported_derived_and_reproducible(client):
    pngs, seeds, _ = images(client, n=2, seed=7)
    assert seeds == [7, 8]
    again, _, _ = images(client, n=2, seed=7)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(pngs, again, strict=True))
    # Image i of a request with seed S is the image of seed S + i on its own.
    alone = generate_png(client, seed=8)
    assert alone.headers["x-sdray-seed"] == "8"
    assert_same_image(alone.content, pngs[1])
    assert psnr(pngs[0], pngs[1]) < 40

    # Without a seed: a random one, reported, that reproduces the image.
    first = generate_png(client)
    second = generate_png(client)
    seed = int(first.headers["x-sdray-seed"])
    assert seed != int(second.headers["x-sdray-seed"])
    assert f"Seed: {seed}," in read_infotext(first.content)
    again = generate_png(client, seed=seed)
    assert np.array_equal(pixels(first.content), pixels(again.content))
    unseeded, seeds, _ = images(client, n=2)
    assert seeds[1] == seeds[0] + 1
    replay, _, _ = images(client, n=2, seed=seeds[0])
    assert np.array_equal(pixels(unseeded[1]), pixels(replay[1]))  # same batch: exact


OFFLINE_ROWS = [
    {"id": "a", "prompt": "a red cube", "seed": 11, "guidance_scale": 7.5, "scheduler": "ddim"},
    {
        "id": "b",
        "prompt": "a blue sphere",
        "negative_prompt": "blurry",
        "seed": 12,
        "steps": 3,
        "width": 96,
        "height": 64,
        "guidance_scale": 1.0,
        "scheduler": "euler",
    },
    {"id": "c", "prompt": "a green cone", "seed": 2**40 + 3, "scheduler": "dpmpp_2m"},
    # Image-to-image and inpainting from files beside the table; online they are sent as base64.
    {"id": "i2i", "prompt": "a kite", "init_image": "scene.png", "strength": 0.6, "seed": 5},
    {
        "id": "inpaint",
        "prompt": "a moon",
        "init_image": "scene.png",
        "mask_image": "mask.png",
        "seed": 6,
        "steps": 5,
        "scheduler": "euler",
    },
]


def test_online_equals_offline(client, server, ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from sdray.batch import run_generate
    from sdray.config import load_config

    files = {"scene.png": scene(), "mask.png": masks()[1]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in OFFLINE_ROWS))
    output = tmp_path / "out"
    config = load_config(server.config_path, ["batch.min_actors=1", "batch.max_actors=1"])
    run_generate(str(source), str(output), config, overwrite=True, progress=False)
    metadata = {row["id"]: row for row in pq.read_table(output / "metadata").to_pylist()}
    assert {row["status"] for row in metadata.values()} == {"ok"}

    for row in OFFLINE_ROWS:
        offline = (output / metadata[row["id"]]["image_path"]).read_bytes()
        body = {k: v for k, v in row.items() if k != "id"}
        for name in ("init_image", "mask_image"):
            if name in body:
                body[name] = base64.b64encode(files[body[name]]).decode()
        online = generate_png(client, **body).content
        assert np.array_equal(pixels(online), pixels(offline)), row["id"]
        assert read_infotext(online) == read_infotext(offline)
    # An OpenAI edit of the same picture is the same image-to-image row.
    edit = client.post(
        "/v1/images/edits",
        data={"prompt": "a kite", "seed": "5", "strength": "0.6"},
        files={"image": ("scene.png", files["scene.png"], "image/png")},
    )
    assert edit.status_code == 200, edit.text
    edited = base64.b64decode(edit.json()["data"][0]["b64_json"])
    offline = (output / metadata["i2i"]["image_path"]).read_bytes()
    assert np.array_equal(pixels(edited), pixels(offline))
    (online,), _, _ = images(client, size="64x64", seed=11, guidance_scale=7.5, scheduler="ddim")
    offline = (output / metadata["a"]["image_path"]).read_bytes()
    assert np.array_equal(pixels(online), pixels(offline))


async def _post_all(url: str, bodies: list[dict], timeout: float = 120) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(headers=AUTH, timeout=timeout, limits=limits) as http:
        return await asyncio.gather(*(http.post(url, json=body) for body in bodies))


def test_the_n_images_of_a_request_share_one_engine_call(client):
    _, _, response = images(client, n=4, seed=100)
    assert response.headers["x-sdray-batch-size"] == "4"
    assert float(response.headers["x-sdray-engine-ms"]) > 0


def test_concurrent_compatible_requests_are_batched(server):
    url = f"{server.url}/v1/images/generations"
    bodies = [{"prompt": f"prompt {i}", "seed": i} for i in range(4)]
    sizes: list[int] = []
    for _ in range(3):  # arrival is up to the OS; a few bursts make a shared batch certain
        responses = asyncio.run(_post_all(url, bodies))
        assert [r.status_code for r in responses] == [200] * 4
        sizes = [int(r.headers["x-sdray-batch-size"]) for r in responses]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, f"four concurrent requests never shared an engine call: {sizes}"


def test_incompatible_requests_are_never_forced_together(client, server):
    one = {"prompt": "a red cube", "n": 2, "seed": 500, "steps": 2}
    other = {"prompt": "a red cube", "n": 2, "seed": 600, "steps": 3}
    alone = {
        500: images(client, n=1, seed=501, steps=2)[0][0],
        600: images(client, n=1, seed=601, steps=3)[0][0],
    }
    url = f"{server.url}/v1/images/generations"
    responses = asyncio.run(_post_all(url, [one, other]))
    for body, response in zip((one, other), responses, strict=True):
        assert response.status_code == 200, response.text
        # Four images arrived together; only the two that share steps may share a call.
        assert int(response.headers["x-sdray-batch-size"]) <= 2
        second = base64.b64decode(response.json()["data"][1]["b64_json"])
        assert_same_image(second, alone[body["seed"]])


IMAGES, ONE = "/v1/images/generations", "/v1/generate"
BAD_REQUESTS = [
    # (route, raw body or JSON, status, param, code)
    (IMAGES, b"{not json", 400, None, "invalid_json"),
    (IMAGES, b"", 400, None, "invalid_json"),
    (IMAGES, b"[1, 2]", 400, None, "invalid_json"),
    (IMAGES, {}, 400, "prompt", "missing_parameter"),
    (IMAGES, {"prompt": None}, 400, "prompt", "invalid_type"),
    (IMAGES, {"prompt": ""}, 400, "prompt", "invalid_value"),
    (IMAGES, {"prompt": "a", "n": "2"}, 400, "n", "invalid_type"),
    (IMAGES, {"prompt": "a", "steps": "2"}, 400, "steps", "invalid_type"),
    (IMAGES, {"prompt": "a", "seed": 1.5}, 400, "seed", "invalid_type"),
    (IMAGES, {"prompt": "a", "guidance_scale": "x"}, 400, "guidance_scale", "invalid_type"),
    (IMAGES, {"prompt": "a", "size": "65x64"}, 400, "size", "invalid_value"),
    (IMAGES, {"prompt": "a", "size": "64"}, 400, "size", "invalid_value"),
    (IMAGES, {"prompt": "a", "size": "512x64"}, 400, "size", "invalid_value"),
    (IMAGES, {"prompt": "a", "n": 5}, 400, "n", "above_limit"),
    (IMAGES, {"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    (IMAGES, {"prompt": "a", "steps": 61}, 400, "steps", "invalid_value"),
    (IMAGES, {"prompt": "x" * 201}, 400, "prompt", "above_limit"),
    (IMAGES, {"prompt": "a", "negative_prompt": "x" * 201}, 400, "negative_prompt", "above_limit"),
    (IMAGES, {"prompt": "a", "scheduler": "nope"}, 400, "scheduler", "invalid_value"),
    (IMAGES, {"prompt": "a", "seed": -1}, 400, "seed", "invalid_value"),
    (IMAGES, {"prompt": "a", "seed": 2**63}, 400, "seed", "invalid_value"),
    (IMAGES, {"prompt": "a", "response_format": "url"}, 400, "response_format", "invalid_value"),
    (IMAGES, {"prompt": "a", "stlye": "vivid"}, 400, "stlye", "unknown_parameter"),
    (IMAGES, {"prompt": "a", "model": "gpt-image-1"}, 404, "model", "model_not_found"),
    (ONE, b"{", 400, None, "invalid_json"),
    (ONE, {"seed": 1}, 400, "prompt", "missing_parameter"),
    (ONE, {"prompt": "a", "width": 65}, 400, "width", "invalid_value"),
    (ONE, {"prompt": "a", "height": 264}, 400, "height", "invalid_value"),
    (ONE, {"prompt": "a", "width": "64"}, 400, "width", "invalid_type"),
    (ONE, {"prompt": "a", "steps": 0}, 400, "steps", "invalid_value"),
    (ONE, {"prompt": "a", "scheduler": "nope"}, 400, "scheduler", "invalid_value"),
    (ONE, {"prompt": "a", "n": 2}, 400, "n", "unknown_parameter"),
    (ONE, b"x" * 200_000, 413, None, "body_too_large"),
    (IMAGES, b"x" * 20_000, 413, None, "body_too_large"),
    # Lone surrogates are legal JSON escapes but not text: each is its sender's 400, never a
    # failure of the batch it would have joined.
    (IMAGES, rb'{"prompt": "a \ud800 cube"}', 400, "prompt", "invalid_value"),
    (
        ONE,
        rb'{"prompt": "a", "negative_prompt": "\udfff"}',
        400,
        "negative_prompt",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "code"),
    BAD_REQUESTS,
    ids=[
        f"{route.rsplit('/', 1)[1]}-{param or code}-{i}"
        for i, (route, _, _, param, code, *_) in enumerate(BAD_REQUESTS)
    ],
)
def test_bad_requests_get_4xx_openai_errors_naming_the_parameter(
    client, route, body, status, param, code
):
    if isinstance(body, bytes):
        response = client.post(route, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(route, json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param
    assert payload["error"]["code"] == code
    assert payload["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/nope", 404), ("GET", "/v1/generate", 405)]
)
def test_routing_errors_use_the_openai_body(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_auth_guards_every_route_but_healthz(server):
    routes = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/generate", {"prompt": "a"}),
        ("POST", "/v1/images/generations", {"prompt": "a"}),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        for method, path, body in routes:
            for headers in (
                {},
                {"Authorization": f"Bearer {WRONG_KEY}"},
                {"Authorization": API_KEY},
            ):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
                assert response.headers["www-authenticate"].startswith("Bearer")
        second = {"Authorization": f"Bearer {SECOND_KEY}"}
        assert http.get("/v1/models", headers=second).status_code == 200


def test_a_large_body_is_refused_by_its_content_length(client):
    body = b'{"prompt": "' + b"x" * 8_000_000 + b'"}'
    response = client.post(ONE, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert "8000014 bytes" in response.json()["error"]["message"]
    assert client.get("/v1/models").status_code == 200


def test_a_large_chunked_body_is_refused_while_streaming(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 65_536

    response = client.post(IMAGES, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_api_keys_never_reach_the_logs(server, ray_cluster):
    """Keys come from the server's environment (never runtime_env), and neither sdray nor Ray
    writes them anywhere in the session directory, whatever clients send."""
    import ray

    attempts = [
        {"Authorization": f"Bearer {API_KEY}"},
        {"Authorization": f"Bearer {SECOND_KEY}"},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"Authorization": API_KEY},  # no scheme
        {"Authorization": f"Basic {API_KEY}"},
        {},
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        statuses = [
            http.post("/v1/generate", json={"prompt": "a"}, headers=headers).status_code
            for headers in attempts
        ]
        assert statuses == [200, 200, 401, 401, 401, 401]
        http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    session = Path(ray._private.worker._global_node.get_session_dir_path())

    def read_session() -> tuple[list[Path], list[str]]:
        files = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]
        return files, [path.read_bytes().decode(errors="ignore") for path in files]

    # Wait (bounded) until Ray has flushed the replica's and the proxy's logs of these
    # requests, so the logs are there to look at.
    deadline = time.monotonic() + 60
    while True:
        files, texts = read_session()
        logs = "".join(t for p, t in zip(files, texts, strict=True) if "logs" in p.parts)
        if ("/v1/generate" in logs and "401" in logs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "/v1/generate" in logs and "401" in logs
    for key in (API_KEY, SECOND_KEY, WRONG_KEY):
        leaks = [str(p) for p, t in zip(files, texts, strict=True) if key in t]
        assert key not in server.log() and not leaks, f"{key} found in {leaks or 'the server log'}"


def test_overload_gets_only_200s_and_503s_with_retry_after_and_server_stays_healthy(server):
    url = f"{server.url}/v1/images/generations"
    bodies = [{"prompt": f"burst {i}", "seed": i, "steps": 4} for i in range(32)]
    responses = asyncio.run(_post_all(url, bodies))  # raises on any dropped connection
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == str(RETRY_AFTER)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/v1/generate", json={"prompt": "after the burst"}).status_code == 200


def test_requests_past_the_proxy_timeout_get_408(client):
    # Serve's proxy enforces the end-to-end timeout; a client may lower it for itself.
    response = client.post(
        "/v1/generate",
        json={"prompt": "slow", "steps": 60, "width": 256, "height": 256},  # seconds of work
        headers={"x-request-timeout-seconds": "0.2"},
    )
    assert response.status_code == 408
    assert client.get("/healthz").status_code == 200


def test_sigterm_shuts_down_cleanly(server):
    """Last in the module: stops the shared server."""
    assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]
    assert "stopped" in server.log()
    assert not accepts_connections(server.port)
