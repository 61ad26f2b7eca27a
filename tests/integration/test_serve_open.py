"""`sdray serve` without SDRAY_API_KEYS and with a short timeout: open access, the replica's
own 504, and a clean SIGINT shutdown."""

from __future__ import annotations

import signal

import httpx
import pytest

from .serve_harness import ServeProcess, accepts_connections, start_server

pytestmark = pytest.mark.integration

TIMEOUT_S = 1
CONFIG = {
    "generation": {"width": 64, "height": 64, "steps": 2},
    "serve": {"request_timeout_s": TIMEOUT_S, "batch_wait_timeout_s": 0.01},
}


@pytest.fixture(scope="module")
def server(sdray_env, tmp_path_factory) -> ServeProcess:
    """An open `sdray serve` (no API keys) for this module."""
    directory = tmp_path_factory.mktemp("serve-open")
    process = start_server(directory, sdray_env, CONFIG, api_keys=None)
    try:
        yield process
    finally:
        process.cleanup()


def test_without_api_keys_every_route_is_open(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/v1/models").status_code == 200
        response = http.post("/v1/generate", json={"prompt": "a red cube", "seed": 3})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"


def test_replica_enforces_the_timeout_even_if_the_client_lifts_the_proxys(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        response = http.post(
            "/v1/images/generations",
            json={"prompt": "slow", "n": 4, "size": "128x128", "steps": 60},
            headers={"x-request-timeout-seconds": "600"},
        )
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "timeout" and error["type"] == "server_error"
        assert http.get("/healthz").status_code == 200


def test_sigint_shuts_down_cleanly(server):
    """Last in the module: stops the server."""
    assert server.stop(signal.SIGINT) == 0, server.log()[-4000:]
    assert "stopped" in server.log()
    assert not accepts_connections(server.port)
