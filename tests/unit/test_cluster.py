"""The multi-node helpers of a job: forwarded variables, path descriptions, per-node figures."""

from __future__ import annotations

import os

from ray import cloudpickle

from sdray.batch.cluster import (
    WORKER_POOL_ENV,
    describe_path,
    forwarded_env,
    local_path,
    local_ray_settings,
    runtime_env_for_driver,
    summarize,
    worker_pool_size,
    worker_setup_hook,
)


def test_forwarded_env_keeps_storage_and_sdray_settings_but_not_node_local_ones():
    environ = {
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": "http://x",
        "SDRAY_TEST_CRASH_ONCE": "/tmp/m",
        "SDRAY_CACHE_DIR": "/driver/cache",  # each node keeps its own cache
        "SDRAY_API_KEYS": "k",  # serving's, never a batch worker's
        "HOME": "/root",
        "PATH": "/bin",
    }
    assert forwarded_env(environ) == {
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": "http://x",
        "SDRAY_TEST_CRASH_ONCE": "/tmp/m",
    }


def test_the_setup_hook_carries_values_that_the_runtime_env_does_not_show(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value-123")
    runtime_env = runtime_env_for_driver()
    hook = runtime_env["worker_process_setup_hook"]
    # What Ray writes to logs and job info is the runtime_env with the hook's name, not values.
    assert "secret-value-123" not in repr(
        {k: v for k, v in runtime_env.items() if k != "worker_process_setup_hook"}
    )
    assert hook.__name__ == "sdray_worker_env"
    # In a worker (another process: pickled by value, as Ray exports it), it sets the values.
    restored = cloudpickle.loads(cloudpickle.dumps(hook))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    restored()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret-value-123"


def test_no_hook_without_anything_to_forward(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("AWS_", "SDRAY_", "S3_", "HF_HUB_OFFLINE")):
            monkeypatch.delenv(key)
    assert runtime_env_for_driver() is None
    assert worker_setup_hook({})() is None


def test_describe_path_tells_missing_files_and_directories_apart(tmp_path):
    assert describe_path(str(tmp_path / "nothing")) is None
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    kind, size, _mtime = describe_path(str(tmp_path / "a.csv"))
    assert (kind, size) == ("file", 9)
    assert describe_path(str(tmp_path)) == ("dir", ("a.csv",))


def test_local_path_is_only_for_local_uris():
    assert local_path("/data/prompts.csv") == "/data/prompts.csv"
    assert local_path("file:///data/x") == "/data/x"
    for remote in ("s3://bucket/x", "gs://b/y", "tiny", None, ""):
        assert local_path(remote) is None


def test_summarize_gives_figures_per_node_and_per_actor():
    actors = [
        {"actor_id": "a1", "node_id": "n1", "host": "h", "images": 30, "errors": 0, "busy_s": 3.0},
        {"actor_id": "a2", "node_id": "n1", "host": "h", "images": 10, "errors": 2, "busy_s": 2.0},
        {"actor_id": "a3", "node_id": "n2", "host": "h", "images": 50, "errors": 0, "busy_s": 5.0},
    ]
    summary = summarize(actors)
    assert [(n["node_id"], n["actors"], n["images"], n["errors"]) for n in summary["nodes"]] == [
        ("n2", 1, 50, 0),
        ("n1", 2, 40, 2),
    ]
    assert summary["nodes"][1]["images_per_s"] == 15.0  # 10/s + 5/s, side by side
    assert [a["actor_id"] for a in summary["actors"]] == ["a3", "a1", "a2"]


def test_a_local_ray_keeps_room_for_idle_task_workers_and_the_environment_is_restored(
    monkeypatch,
):
    monkeypatch.delenv(WORKER_POOL_ENV, raising=False)
    with local_ray_settings(cpus=2):
        assert os.environ[WORKER_POOL_ENV] == "16" == str(worker_pool_size(2))
    assert WORKER_POOL_ENV not in os.environ
    monkeypatch.setenv(WORKER_POOL_ENV, "5")  # an operator's own setting wins
    with local_ray_settings(cpus=2):
        assert os.environ[WORKER_POOL_ENV] == "5"
    assert os.environ[WORKER_POOL_ENV] == "5"
