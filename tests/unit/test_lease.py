"""The output lease: one live run per output; leases of dead runs are taken over, by one run."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time

import pytest
from fsspec.implementations.local import LocalFileSystem

from sdray.batch import lease
from sdray.batch.lease import LEASE, OutputInUse, _LeaseStore, _machine, output_lease
from sdray.errors import SdrayError


def _record(**fields):
    return {
        "run": "other",
        "command": "generate",
        **_machine(),
        "pid": 1,
        "started": "2026-01-01T00:00:00Z",
        "heartbeat": time.time(),
        **fields,
    }


def _write_lease(output, **fields) -> None:
    """Another run's lease, written as a run writes it (atomically)."""
    from sdray.storage import write_bytes_atomic

    output.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(
        LocalFileSystem(), str(output / LEASE), json.dumps(_record(**fields)).encode()
    )


def _lease_of(output) -> dict:
    return json.loads((output / LEASE).read_text())


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def quick(monkeypatch):
    """Leases renewed every 0.1 s and watched for 1 s."""
    monkeypatch.setattr(lease, "STALE_AFTER_SECONDS", 1.0)
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.1)


def test_lease_is_held_during_the_block_and_removed_after(tmp_path):
    output = tmp_path / "out"
    with output_lease(str(output), command="generate"):
        record = _lease_of(output)
        assert record["command"] == "generate" and record["pid"] > 1
    assert not output.exists()  # nothing was written: no empty output left behind


def test_a_live_run_on_this_machine_refuses_a_second(tmp_path, live_process):
    output = tmp_path / "out"
    _write_lease(output, pid=live_process)
    with pytest.raises(
        OutputInUse, match=rf"in use by another sdray run other .*pid {live_process}"
    ):
        with output_lease(str(output)):
            pass
    assert _lease_of(output)["run"] == "other"  # untouched


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    output = tmp_path / "out"
    _write_lease(output, pid=process.pid)
    with output_lease(str(output)):
        assert _lease_of(output)["pid"] != process.pid
    assert "taking over the lease" in caplog.text
    assert "watching" not in caplog.text  # decided at once: the pid is gone
    assert not (output / LEASE).exists()


def test_a_reused_pid_does_not_keep_a_dead_lease_alive(tmp_path, live_process):
    output = tmp_path / "out"
    _write_lease(output, pid=live_process, pid_start="1")  # the pid now names another process
    with output_lease(str(output)):
        assert _lease_of(output)["run"] != "other"


def test_a_lease_from_elsewhere_is_taken_once_unrenewed_for_a_while(tmp_path, quick, caplog):
    output = tmp_path / "out"
    _write_lease(output, host="elsewhere", pid=123)  # its driver died on another machine
    started, wall = time.monotonic(), time.time()
    with output_lease(str(output)):
        taken = _lease_of(output)
        assert taken["run"] != "other"
        assert taken["heartbeat"] >= wall + 0.9  # stamped after the 1 s watch, not before it
    assert time.monotonic() - started >= 1.0  # watched, by this process's own clock
    assert "watching for up to 1s" in caplog.text
    caplog.clear()
    _write_lease(output, host="elsewhere", heartbeat=time.time() - 2 * 3600)
    with output_lease(str(output)):  # abandoned long ago: taken without watching
        pass
    assert "taking over the lease" in caplog.text and "watching" not in caplog.text


def test_a_lease_from_elsewhere_that_is_renewed_is_refused(tmp_path, quick):
    output = tmp_path / "out"
    stop = threading.Event()

    def renew():
        while not stop.wait(0.05):
            _write_lease(output, host="elsewhere", pid=123)

    _write_lease(output, host="elsewhere", pid=123, heartbeat=time.time() + 3600)  # clock ahead
    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(OutputInUse, match="host elsewhere"):
            with output_lease(str(output)):
                pass
    finally:
        stop.set()
        renewer.join(timeout=10)


def test_the_heartbeat_renews_the_lease_and_release_is_final(tmp_path, quick):
    output = tmp_path / "out"
    with output_lease(str(output)):
        first = _lease_of(output)["heartbeat"]
        deadline = time.monotonic() + 10
        while _lease_of(output)["heartbeat"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
    time.sleep(0.3)  # a renewal in flight at release must not bring the lease back
    assert not (output / LEASE).exists()


def test_compare_and_swap_on_local_disk(tmp_path):
    store = _LeaseStore(LocalFileSystem(), str(tmp_path / LEASE))
    version = store.create({"run": "a"})
    with pytest.raises(FileExistsError):
        store.create({"run": "b"})
    newer = store.replace({"run": "a2"}, version)
    with pytest.raises(lease.LeaseLost):
        store.replace({"run": "c"}, version)
    store.delete(version)  # not the current version: left alone
    assert store.read()[0] == {"run": "a2"}
    store.delete(newer)
    assert store.read() == (None, None)


def _take_over(output: str, results, refused) -> None:
    try:
        with output_lease(output):
            results.put("held")
            refused.wait(timeout=60)  # hold it until the other run has tried
    except OutputInUse:
        results.put("refused")
        refused.set()


def test_of_two_runs_taking_over_a_dead_lease_one_wins(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    output = tmp_path / "out"
    _write_lease(output, pid=process.pid)
    context = multiprocessing.get_context("spawn")
    results, refused = context.Queue(), context.Event()
    runs = [
        context.Process(target=_take_over, args=(str(output), results, refused)) for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=90)
    assert sorted(results.get(timeout=10) for _ in runs) == ["held", "refused"]


def test_leftovers_of_a_killed_lease_write_do_not_make_an_output_non_empty(tmp_path):
    from sdray.batch.job import output_entries

    for name in (LEASE, ".0a1b.lease.tmp", f".{LEASE}.9f8e.tmp", "manifest.json"):
        (tmp_path / name).write_text("x")
    assert output_entries(LocalFileSystem(), str(tmp_path)) == ["manifest.json"]


def test_a_lease_sdray_did_not_write_is_abandoned(tmp_path):
    _write_lease(tmp_path / "out", host="elsewhere", heartbeat="2026-01-01")
    with output_lease(str(tmp_path / "out")):
        assert _lease_of(tmp_path / "out")["run"] != "other"


def test_an_output_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SdrayError, match="is a file; give a directory"):
        with output_lease(str(tmp_path / "out")):
            pass


def test_other_fsspec_stores_hold_leases_too():
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/lease-{uuid.uuid4().hex}/out"
    with output_lease(f"memory://{root}"):
        assert json.loads(fs.cat(f"{root}/{LEASE}"))["pid"] > 1
        with pytest.raises(OutputInUse):
            with output_lease(f"memory://{root}"):
                pass
    assert not fs.exists(f"{root}/{LEASE}")


def test_a_zombie_holder_is_gone(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped yet
    deadline = time.monotonic() + 30
    while "Z" not in open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1][:3]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        _write_lease(tmp_path / "out", pid=process.pid)
        with output_lease(str(tmp_path / "out")):
            assert _lease_of(tmp_path / "out")["pid"] != process.pid
    finally:
        process.wait(timeout=10)


def test_a_lease_released_while_watched_is_taken_not_refused(tmp_path, quick):
    output = tmp_path / "out"
    _write_lease(output, host="elsewhere", pid=123)
    remover = threading.Timer(0.2, lambda: (output / LEASE).unlink())
    remover.start()
    try:
        with output_lease(str(output)):
            assert _lease_of(output)["run"] != "other"
    finally:
        remover.join(timeout=10)
