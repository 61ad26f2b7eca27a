"""Shared fixtures: a hermetic model cache, the tiny engine, a local Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# pipelines/ is not a package: the benchmark tools the tests exercise are imported from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))


TESTS = Path(__file__).resolve().parent
# Fixtures that start a Ray cluster or real servers: integration tests only.
CLUSTER_FIXTURES = {"ray_cluster", "sdray_env"}


def pytest_collection_modifyitems(config, items):
    """The tiers: every test under tests/integration is marked `integration` (so `-m "not
    integration"` is the fast tier, `make test-fast`); a test under tests/unit that asks for a
    Ray cluster is an error, not a slow unit test."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if (TESTS / "integration") in path.parents:
            item.add_marker(pytest.mark.integration)
        elif CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(
                f"{item.nodeid} starts a Ray cluster: it belongs in tests/integration"
            )


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Every test builds and reads models in a private cache, never the user's."""
    cache = tmp_path_factory.mktemp("sdray-cache")
    os.environ["SDRAY_CACHE_DIR"] = str(cache)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    return cache


@pytest.fixture(scope="session")
def tiny_engine(model_cache):
    """The embedded tiny model, loaded once for the unit tests."""
    from sdray.config import ModelConfig
    from sdray.engine import DiffusionEngine

    return DiffusionEngine.from_config(ModelConfig(source="tiny", device="cpu"), max_batch_size=8)


@pytest.fixture(scope="session")
def ray_cluster(model_cache):
    """A local Ray cluster for the whole session; its address lets subprocesses join it."""
    import ray

    from sdray.batch.cluster import local_ray_settings

    with local_ray_settings(cpus=2):  # as sdray starts a local Ray for itself
        context = ray.init(
            address="local",  # never join a cluster some earlier process left behind
            num_cpus=2,
            include_dashboard=False,
            logging_level="WARNING",
            object_store_memory=1_500_000_000,
        )
    address = context.address_info["address"]
    try:
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def sdray_env(ray_cluster) -> dict[str, str]:
    """Environment for running the `sdray` CLI as a subprocess against the test cluster."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster
    env["PYTHONUNBUFFERED"] = "1"
    return env
