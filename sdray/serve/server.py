"""Build the Serve application from the sdray config, and run it in the foreground."""

import logging
import signal
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdray.config import SdrayConfig, config_from_dict, load_config
from sdray.errors import SdrayError
from sdray.serve.auth import API_KEYS_ENV, api_key_digests

APP_NAME = "sdray"


class ServeAppArgs(BaseModel):
    """`args` of the application in a Ray Serve config file (see configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    config: str | dict[str, Any] | None = Field(
        None, description="sdray config: a YAML path/URI, an inline mapping, or null (default)."
    )
    overrides: list[str] = Field(
        default_factory=list, description="`key.path=value` overrides, as with --set."
    )


def resolve_device(config: SdrayConfig) -> str:
    """`model.device`, with `auto` decided by whether the connected cluster has GPUs."""
    device = config.model.device
    if device == "auto":
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        device = "cuda" if gpus > 0 else "cpu"
    return device


def deployment_options(config: SdrayConfig, device: str) -> dict[str, Any]:
    """Ray Serve deployment options from the `serve` section: autoscaling, queues, resources."""
    settings = config.serve
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus_per_replica}
    if device == "cuda":
        actor["num_gpus"] = settings.num_gpus_per_replica
    return {
        "ray_actor_options": actor,
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": {
            "status_code": settings.overload_status_code,
            "retry_after_s": settings.retry_after_s,
        },
    }


def http_options(config: SdrayConfig, host: str, port: int) -> dict[str, Any]:
    """Serve's HTTP proxy options: where to listen, and the end-to-end request timeout."""
    return {"host": host, "port": port, "request_timeout_s": config.serve.request_timeout_s}


def build_application(config: SdrayConfig, key_digests: tuple[str, ...] = ()):
    """The bound Serve application (one ImageService deployment) for `config`."""
    from sdray.serve.app import ImageService

    device = resolve_device(config)
    data = config.model_dump(mode="json")
    data["model"]["device"] = device
    return ImageService.options(**deployment_options(config, device)).bind(data, key_digests)


def build_app(args: dict[str, Any]):
    """Application builder for `serve run` / `serve deploy` (import_path: sdray.serve:build_app).

    API keys come from $SDRAY_API_KEYS where the builder runs; replicas get only their digests.
    """
    parsed = ServeAppArgs.model_validate(args or {})
    if isinstance(parsed.config, dict):
        config = config_from_dict(parsed.config, parsed.overrides)
    else:
        config = load_config(parsed.config, parsed.overrides)
    return build_application(config, api_key_digests())


class ServerStopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to leave the serving loop."""


def _stop(signum, frame) -> None:
    # Later signals get the default behaviour, so a second Ctrl-C still interrupts a stuck exit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise ServerStopped(signal.Signals(signum).name)


def _say(message: str) -> None:
    print(f"sdray: {message}", file=sys.stderr, flush=True)


def run_server(config: SdrayConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the API on host:port until SIGINT/SIGTERM, then shut down Serve and Ray cleanly.

    Connects to the cluster in $RAY_ADDRESS, or starts a local one. If Serve already runs other
    applications there, they are left alone: only this one is deleted on the way out.
    """
    import ray
    from ray import serve

    digests = api_key_digests()
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    others = set(serve.status().applications)
    if APP_NAME in others:
        ray.shutdown()
        raise SdrayError(
            f"a Serve application named {APP_NAME!r} already runs on this Ray cluster; "
            "stop it first (serve shutdown) or use another cluster"
        )
    if others:
        _say(f"Serve already runs {', '.join(sorted(others))} here; its HTTP options stay in force")
    # After ray.init, which installs its own SIGTERM handler.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options=http_options(config, host, port))
        _say(f"deploying model {config.model.source!r}; waiting for replicas to load it")
        try:
            serve.run(build_application(config, digests), name=APP_NAME, route_prefix="/")
        except RuntimeError as error:  # Serve's "Deploying application ... failed"
            raise SdrayError(f"{error} The replicas' errors are in the log above.") from None
        auth = f"on ({len(digests)} keys from ${API_KEYS_ENV})" if digests else "off"
        _say(f"serving on http://{host}:{port} (auth {auth}); Ctrl-C or SIGTERM stops")
        while True:
            time.sleep(3600)
    except ServerStopped as stop:
        _say(f"{stop}: shutting down")
    finally:
        try:
            if others:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    _say("stopped")
