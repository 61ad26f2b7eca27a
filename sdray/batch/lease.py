"""One run per output: a lease object, renewed while a run lives, that a second run respects.

Two runs writing one output (a second `--resume` started while the first still runs) would
write some rows twice. A run therefore creates `OUTPUT/.sdray-lease.json` exclusively before it
touches anything (local disk: O_EXCL; S3: a conditional put), renews it every
`HEARTBEAT_SECONDS`, and deletes it when done. A lease left by a run that died is taken over:
at once when its process was on this host and is gone; from another host, the new run watches
the lease and takes it once its heartbeat is older than `STALE_AFTER_SECONDS` (a holder that
renews it meanwhile is alive, and the new run is refused).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdray.errors import SdrayError
from sdray.storage import filesystem, is_local, join, with_retries, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE = ".sdray-lease.json"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 90.0

_held: set[str] = set()  # outputs this process holds (a sweep's job runs inside its lease)
_held_lock = threading.Lock()


class OutputInUse(SdrayError):
    """Another live run holds the output."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def is_live(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run that wrote this lease record may still be running."""
    now = time.time() if now is None else now
    fresh = now - float(record.get("heartbeat", 0)) < STALE_AFTER_SECONDS
    if _on_this_host(record):
        return fresh and _pid_alive(record["pid"])
    return fresh


def _read(fs, path: str) -> dict[str, Any] | None:
    try:
        record = json.loads(with_retries(lambda: fs.cat_file(path), f"reading {path}"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: a lease torn by a crash on a store without atomic puts; stale
    return record if isinstance(record, dict) else {}


def _create(fs, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist; FileExistsError otherwise."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{uuid.uuid4().hex}.lease.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)  # atomic, and fails when the lease exists: never seen half-written
        finally:
            os.unlink(tmp)
    else:
        fs.pipe_file(path, data, mode="create")  # s3fs: a conditional put (If-None-Match)


def _describe(record: dict[str, Any], now: float) -> str:
    age = now - float(record.get("heartbeat", 0))
    return (
        f"run {record.get('run', '?')} ({record.get('command', 'sdray')}) on host "
        f"{record.get('host', '?')}, pid {record.get('pid', '?')}, started "
        f"{record.get('started', '?')}, last heartbeat {age:.0f}s ago"
    )


def _refusal(output_uri: str, record: dict[str, Any]) -> OutputInUse:
    return OutputInUse(
        f"output {output_uri!r} is in use by another sdray {_describe(record, time.time())}. "
        "Two runs on one output would write rows twice: wait for it to finish, or give this "
        f"run another --output. A lease whose run died expires {STALE_AFTER_SECONDS:.0f}s after "
        f"its last heartbeat (at once on the host it ran on); it is {LEASE} in the output."
    )


@contextmanager
def output_lease(
    output_uri: str, storage_options: dict[str, Any] | None = None, *, command: str = "sdray"
) -> Iterator[None]:
    """Hold `output_uri` for the duration of the block; refuse it while another run holds it."""
    fs, root = filesystem(output_uri, storage_options)
    path = join(root, LEASE)
    key = f"{fs.protocol}:{path}"
    with _held_lock:
        nested = key in _held
        _held.add(key)
    if nested:
        yield
        return
    try:
        record = {
            "run": uuid.uuid4().hex[:12],
            "command": command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heartbeat": time.time(),
        }
        if is_local(fs) and os.path.isfile(root):
            raise SdrayError(f"output {output_uri!r} is a file; give a directory")
        created_root = is_local(fs) and not os.path.exists(root)
        _acquire(fs, path, record, output_uri)
        stop = threading.Event()
        renewer = threading.Thread(
            target=_renew, args=(fs, path, record, stop), name="sdray-lease", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=HEARTBEAT_SECONDS)
            _release(fs, path, record)
            if created_root:  # a run refused before writing leaves no empty output behind
                try:
                    os.rmdir(root)
                except OSError:
                    pass  # it holds what the run wrote
    finally:
        with _held_lock:
            _held.discard(key)


def _on_this_host(record: dict[str, Any]) -> bool:
    return record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int)


def _still_renewed(fs, path: str, current: dict[str, Any]) -> bool:
    """Watch a fresh lease from another host until its holder renews it (True: alive) or it goes
    stale (False). A resubmitted job whose driver just died elsewhere then takes over, without
    anyone deleting the lease by hand."""
    log.warning(
        "output held by %s; waiting up to %.0fs to see whether that run is alive",
        _describe(current, time.time()),
        STALE_AFTER_SECONDS,
    )
    while is_live(current):
        time.sleep(min(5.0, HEARTBEAT_SECONDS / 3))
        latest = _read(fs, path)
        if latest is None:
            return False
        if latest.get("run") != current.get("run") or latest.get("heartbeat") != current.get(
            "heartbeat"
        ):
            return True
    return False


def _acquire(fs, path: str, record: dict[str, Any], output_uri: str) -> None:
    for _ in range(3):
        current = _read(fs, path)
        if current is not None:
            if is_live(current) and (_on_this_host(current) or _still_renewed(fs, path, current)):
                raise _refusal(output_uri, _read(fs, path) or current)
            log.warning(
                "taking over the lease of a run that is gone: %s", _describe(current, time.time())
            )
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
        try:
            _create(fs, path, json.dumps(record).encode())
            return
        except FileExistsError:
            continue  # another run got there first: look at its lease
    current = _read(fs, path) or {}
    raise _refusal(output_uri, current)


def _renew(fs, path: str, record: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            current = _read(fs, path)
            if current is not None and current.get("run") != record["run"]:
                log.error(
                    "this run's lease on the output was taken over by %s; stop one of them",
                    _describe(current, time.time()),
                )
                return
            record["heartbeat"] = time.time()
            write_bytes_atomic(fs, path, json.dumps(record).encode())  # never seen half-written
        except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried next time
            log.warning("could not renew the output lease: %s", error)


def _release(fs, path: str, record: dict[str, Any]) -> None:
    try:
        current = _read(fs, path)
        if current is not None and current.get("run") == record["run"]:
            fs.rm(path)
    except Exception as error:  # noqa: BLE001 - an expired lease is harmless
        log.warning("could not remove the output lease %s: %s", path, error)
