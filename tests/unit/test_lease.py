"""The output lease: one live run per output; leases of dead runs are taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from sdray.batch import lease
from sdray.batch.lease import LEASE, OutputInUse, is_live, output_lease


def _write_lease(output, **fields):
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "run": "other",
        "command": "generate",
        "host": socket.gethostname(),
        "pid": 1,
        "started": "2026-01-01T00:00:00Z",
        "heartbeat": time.time(),
        **fields,
    }
    (output / LEASE).write_text(json.dumps(record))
    return record


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=10)


def test_lease_is_held_during_the_block_and_removed_after(tmp_path):
    output = tmp_path / "out"
    with output_lease(str(output), command="generate"):
        record = json.loads((output / LEASE).read_text())
        assert record["command"] == "generate" and is_live(record)
        with output_lease(str(output)):  # the same process nests (a sweep's job)
            pass
        assert (output / LEASE).exists()
    assert not output.exists()  # nothing was written: no empty output left behind


def test_a_live_run_holding_the_output_refuses_a_second(tmp_path, live_process):
    output = tmp_path / "out"
    _write_lease(output, pid=live_process)
    with pytest.raises(
        OutputInUse, match=rf"in use by another sdray run other .*pid {live_process}"
    ):
        with output_lease(str(output)):
            pass
    assert json.loads((output / LEASE).read_text())["run"] == "other"  # untouched


def test_a_lease_from_another_host_is_taken_once_stale_unless_renewed(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(lease, "STALE_AFTER_SECONDS", 1.0)
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.3)
    output = tmp_path / "out"
    # Its driver died elsewhere (a resubmitted job): the lease is watched, then taken over.
    _write_lease(output, host="elsewhere", pid=123)
    started = time.monotonic()
    with output_lease(str(output)):
        assert json.loads((output / LEASE).read_text())["run"] != "other"
    assert time.monotonic() - started >= 0.5

    # Its holder is alive and renews it: refused, however long ago the run started.
    stop = threading.Event()

    def renew():
        while not stop.wait(0.1):
            _write_lease(output, host="elsewhere", pid=123)

    _write_lease(output, host="elsewhere", pid=123)
    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(OutputInUse, match="host elsewhere"):
            with output_lease(str(output)):
                pass
    finally:
        stop.set()
        renewer.join(timeout=10)


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    output = tmp_path / "out"
    _write_lease(output, pid=process.pid)
    with output_lease(str(output)):
        assert json.loads((output / LEASE).read_text())["pid"] != process.pid
    assert not (output / LEASE).exists()


def test_the_heartbeat_renews_the_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    output = tmp_path / "out"
    with output_lease(str(output)):
        first = json.loads((output / LEASE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((output / LEASE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)


def test_an_output_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(lease.SdrayError, match="is a file; give a directory"):
        with output_lease(str(tmp_path / "out")):
            pass
