"""Start `sdray serve` as a subprocess on a free loopback port, wait for it, stop it by signal."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.integration.cli import SDRAY

START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 90


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServeProcess:
    """A running `sdray serve` and where to reach it."""

    proc: subprocess.Popen
    url: str
    port: int
    config_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig` to the server process only and wait (bounded) for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(
                f"sdray serve did not exit within {STOP_TIMEOUT_S}s of {sig.name}:\n"
                + self.log()[-4000:]
            ) from None

    def cleanup(self) -> None:
        """Make sure the process is gone and Serve is off the shared test cluster."""
        if self.proc.poll() is None:
            try:
                self.stop(signal.SIGTERM)
            except AssertionError:
                pass
        if self.proc.returncode != 0:
            from ray import serve

            serve.shutdown()


def launch_server(
    directory: Path, env: dict[str, str], config: dict[str, Any], api_keys: str | None
) -> ServeProcess:
    """Run `sdray serve --config ...` in the background; return at once."""
    config_path = directory / "sdray.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / "serve.log"
    port = free_port()
    env = dict(env)
    env.pop("SDRAY_API_KEYS", None)
    if api_keys is not None:
        env["SDRAY_API_KEYS"] = api_keys
    command = [SDRAY, "serve", "--config", str(config_path), "--host", "127.0.0.1"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return ServeProcess(proc, f"http://127.0.0.1:{port}", port, config_path, log_path)


def start_server(
    directory: Path, env: dict[str, str], config: dict[str, Any], api_keys: str | None
) -> ServeProcess:
    """Run `sdray serve --config ...` and return once /healthz answers 200."""
    server = launch_server(directory, env, config, api_keys)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(
                f"sdray serve exited with {server.proc.returncode}:\n{server.log()}"
            )
        try:
            if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.cleanup()
    raise AssertionError(f"sdray serve not healthy within {START_TIMEOUT_S}s:\n{server.log()}")


def wait_for_log(server: ServeProcess, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait (bounded) until the server's log holds `text`."""
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log of sdray serve:\n{server.log()}")
        time.sleep(0.2)


def accepts_connections(port: int) -> bool:
    """Whether anything listens on the loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
