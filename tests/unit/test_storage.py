"""Storage: transient object store errors are the clients' own to retry, configured here."""

from __future__ import annotations

from sdray.storage import S3_RETRIES, filesystem


def test_s3_filesystems_retry_with_botocore_standard_mode():
    fs, path = filesystem(
        "s3://bucket/key", {"key": "k", "secret": "s", "skip_instance_cache": True}
    )
    assert path == "bucket/key"
    assert fs.config_kwargs["retries"] == S3_RETRIES
    assert fs.retries >= 1  # s3fs's own retries of a call, on top of botocore's per request


def test_retry_settings_from_storage_options_win():
    mine = {"mode": "adaptive", "max_attempts": 3}
    options = {"config_kwargs": {"retries": mine}, "skip_instance_cache": True}
    fs, _ = filesystem("s3://bucket/key", options)
    assert fs.config_kwargs["retries"] == mine
    assert options == {"config_kwargs": {"retries": mine}, "skip_instance_cache": True}


def test_local_paths_get_no_object_store_options(tmp_path):
    fs, path = filesystem(str(tmp_path / "x"))
    assert path.endswith("/x")
    assert not getattr(fs, "config_kwargs", None)
