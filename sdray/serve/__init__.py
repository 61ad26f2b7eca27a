"""Online serving on Ray Serve: the HTTP API, the replica deployment, and the app builder."""

from sdray.serve.server import build_app, build_application, run_server

__all__ = ["build_app", "build_application", "run_server"]
