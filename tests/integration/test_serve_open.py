"""`sdray serve` without SDRAY_API_KEYS and with a short timeout: open access, the replica's
own 504, a clean SIGINT shutdown, a stop while still deploying, keys set but empty, and the HAProxy
ingress."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from .serve_harness import (
    SDRAY,
    ServeProcess,
    accepts_connections,
    free_port,
    launch_server,
    start_server,
    wait_for_log,
)

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
            # About 5 s of work here, far past the 1 s timeout on any machine that runs CI
            # (128x128 at 60 steps took 0.8 s on a quiet one: too close).
            json={"prompt": "slow", "n": 4, "size": "256x256", "steps": 100},
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


def test_sigterm_while_deploying_stops_cleanly(sdray_env, tmp_path):
    """After the module's server is gone: a signal before the replicas are up still stops the
    server cleanly (the handler only sets an event; the main thread does the shutdown)."""
    server = launch_server(tmp_path, sdray_env, CONFIG, api_keys=None)
    try:
        wait_for_log(server, "deploying model")
        assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]
        assert "SIGTERM: shutting down" in server.log() and "stopped" in server.log()
        assert "Traceback" not in server.log()
        assert not accepts_connections(server.port)
    finally:
        server.cleanup()


def test_a_port_in_use_is_one_line_not_a_traceback(sdray_env):
    """With no Serve on the cluster (the module's server is gone), a taken port fails the
    proxy's start: the user gets the reason in one line."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [SDRAY, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=sdray_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 2, done.stderr[-4000:]
    assert f"cannot listen on 127.0.0.1:{port}: the address is in use" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("keys", [" , ", ""])
def test_api_keys_set_but_empty_refuse_to_start(sdray_env, keys):
    env = {**sdray_env, "SDRAY_API_KEYS": keys}
    done = subprocess.run(
        [SDRAY, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "SDRAY_API_KEYS is set but holds no API key" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_benchmark_deploys_one_app_at_a_time_and_deletes_only_its_own(ray_cluster):
    """On a cluster where Serve already runs another app, the load benchmark deploys batching
    on, then off (never both: one GPU holds one replica), and leaves the other app running."""
    from ray import serve
    from serve_load import bench_serve

    from sdray.config import config_from_dict

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Keeper:
        def __call__(self, request) -> str:
            return "kept"

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(Keeper.bind(), name="keeper", route_prefix="/keeper")
        config = config_from_dict({**CONFIG, "model": {"device": "cpu"}})
        results = bench_serve(
            config, concurrencies=(2,), rounds=1, requests=4, time_limit_s=60, port=port
        )
        levels = {row["mode"]: row for row in results["levels"]}
        assert set(levels) == {f"batch={config.serve.max_batch_size}", "batch=1"}
        assert all(row["ok"] == 4 for row in levels.values()), levels
        assert set(serve.status().applications) == {"keeper"}
        assert httpx.get(f"http://127.0.0.1:{port}/keeper", timeout=30).text == "kept"
    finally:
        serve.shutdown()  # the next `sdray serve` starts Serve with its own HTTP options


def test_haproxy_ingress_answers_with_no_python_proxy_in_the_path(sdray_env, tmp_path):
    """`serve.ingress: haproxy`, on a Ray that `sdray serve` starts itself: HAProxy, not Ray
    Serve's Python proxy, listens on the port and hands requests straight to the replica's own
    HTTP server."""
    import psutil

    env = {key: value for key, value in sdray_env.items() if key != "RAY_ADDRESS"}
    # Direct-ingress replicas drain 30 s by default (for load balancers); none here to wait for.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    config = {**CONFIG, "serve": {**CONFIG["serve"], "ingress": "haproxy", "request_timeout_s": 60}}
    server = start_server(tmp_path, env, config, api_keys=None)
    try:
        listening = {
            psutil.Process(connection.pid).name()
            for connection in psutil.net_connections("tcp")
            if connection.status == psutil.CONN_LISTEN
            and connection.laddr.port == server.port
            and connection.pid is not None
        }
        assert listening == {"haproxy"}, listening
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = http.post("/v1/generate", json={"prompt": "a red circle", "seed": 3})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert server.stop(signal.SIGINT) == 0, server.log()[-4000:]
        assert not accepts_connections(server.port)
    finally:
        server.cleanup()
