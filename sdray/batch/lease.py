"""One run per output: a lease that a run holds while it lives, and checks before every commit.

A run creates `OUTPUT/.sdray-lease.json` (who it is, where, and a heartbeat time) before it
writes anything, rewrites it every `HEARTBEAT_SECONDS` and deletes it at the end. Every change
is a compare-and-swap on the lease's version (`_LeaseStore`), so of two runs racing for it
exactly one wins. Each shard commit first checks that the lease still names its run
(`check_held`): a run that lost the output, say a driver cut off from a cluster that went on
without it, commits nothing more.

A lease whose holder is gone is taken over: at once when it ran on this machine and its process
has exited; from elsewhere once this process has watched it go `STALE_AFTER_SECONDS` without
renewal (by its own clock: machines' clocks may disagree), or at once when its last heartbeat is
`ABANDONED_AFTER_SECONDS` old.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdray.errors import SdrayError
from sdray.storage import create_new, filesystem, is_local, join, put_if, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE = ".sdray-lease.json"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 90.0
ABANDONED_AFTER_SECONDS = 3600.0


class OutputInUse(SdrayError):
    """Another live run holds the output."""


class LeaseLost(SdrayError):
    """The lease is no longer the version (or the run) expected."""


def is_lease_file(name: str) -> bool:
    """The lease, or a temporary file of one that a killed write left: neither makes an output
    non-empty."""
    return name == LEASE or (name.endswith(".tmp") and (LEASE in name or ".lease." in name))


class _LeaseStore:
    """Reads and compare-and-swap writes of the lease. Its version is its bytes (S3: its ETag).

    Local disk: creation is a hard link (atomic, also between machines sharing the disk); a
    replace or delete compares and writes under a lock file of this machine. S3: conditional
    requests. Other stores: compare, then write (not atomic; a race shows at the next renewal).
    """

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """(record, version), or (None, None) when there is no lease; unreadable text is {}."""
        try:
            data, version = self._get()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), version

    def create(self, record: dict[str, Any]) -> Any:
        """Write the lease if there is none (else FileExistsError); return its version."""
        data = json.dumps(record).encode()
        if self.s3:
            version = put_if(self.fs, self.path, data, IfNoneMatch="*")
        else:
            version = data if create_new(self.fs, self.path, data) else None
        if version is None:
            raise FileExistsError(self.path)
        return version

    def replace(self, record: dict[str, Any], version: Any) -> Any:
        """Overwrite the lease if it is still `version` (else LeaseLost); return the new one."""
        data = json.dumps(record).encode()
        if self.s3:
            new = put_if(self.fs, self.path, data, IfMatch=version)
            if new is None:
                raise LeaseLost(self.path)
            return new
        with self._exclusive():
            if self.read()[1] != version:
                raise LeaseLost(self.path)
            write_bytes_atomic(self.fs, self.path, data)
        return data

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still `version`; leave anyone else's alone."""
        with self._exclusive():
            if self.read()[1] == version:  # S3 has no conditional delete on every bucket kind
                self.fs.rm(self.path)

    def _get(self) -> tuple[bytes, Any]:
        if not self.s3:
            data = self.fs.cat_file(self.path)
            return data, data
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:  # bytes and ETag from one GET, never two versions
            bucket, key, _ = self.fs.split_path(self.path)
            reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with reply["Body"] as body:
                return await body.read(), reply["ETag"]

        return sync(self.fs.loop, get)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Local disk: one process of this machine at a time (a lock file in the temporary
        directory, named after the lease's path, so the output holds no lock files)."""
        if not is_local(self.fs):
            yield
            return
        from filelock import FileLock

        locks = Path(tempfile.gettempdir()) / "sdray-leases"
        if not locks.is_dir():
            locks.mkdir(exist_ok=True)
            try:
                locks.chmod(0o1777)  # shared by every user of the machine, as /tmp is
            except OSError:
                pass
        name = hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()[:32]
        with FileLock(str(locks / f"{name}.lock"), timeout=60):
            yield


# ---------------------------------------------------------------------------------------------
# Who holds it, and whether they live.


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the process name (state first), or [] (Linux)."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split() if stat else []


def _machine() -> dict[str, Any]:
    """What makes a pid meaningful: host name, boot, and process namespace."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {
        "host": socket.gethostname(),
        "boot": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
    }


def _holder_alive_here(record: dict[str, Any]) -> bool | None:
    """Whether the holder lives, when it ran on this machine; None when it ran elsewhere."""
    pid = record.get("pid")
    if os.name != "posix" or not isinstance(pid, int):
        return None
    if any(record.get(k) != v for k, v in _machine().items()):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _stat(pid)
    if stat and stat[0] == "Z":
        return False  # exited, not yet reaped
    started = record.get("pid_start")
    return started is None or not stat or stat[19] == started  # else the pid was reused


def _age(record: dict[str, Any]) -> float:
    try:
        return time.time() - float(record.get("heartbeat", 0))
    except (TypeError, ValueError):
        return float("inf")  # not a lease sdray wrote: abandoned


def _describe(record: dict[str, Any]) -> str:
    return (
        f"run {record.get('run', '?')} ({record.get('command', 'sdray')}) on host "
        f"{record.get('host', '?')}, pid {record.get('pid', '?')}, started "
        f"{record.get('started', '?')}, last heartbeat {_age(record):.0f}s ago"
    )


def _refusal(output_uri: str, record: dict[str, Any]) -> OutputInUse:
    return OutputInUse(
        f"output {output_uri!r} is in use by another sdray {_describe(record)}. Two runs on "
        "one output would write rows twice: wait for it to finish, or give this run another "
        f"--output. The lease of a run that died is taken over at once on its machine, and "
        f"elsewhere after {STALE_AFTER_SECONDS:.0f}s without renewal; it is {LEASE} in the output."
    )


def _holder_gone(store: _LeaseStore, record: dict[str, Any], version: Any) -> bool | None:
    """Whether the lease's holder is gone; may watch it for up to STALE_AFTER_SECONDS.
    None: it was released or taken by another run while watched; look at it again."""
    alive = _holder_alive_here(record)
    if alive is not None:
        return not alive
    if not record or _age(record) > ABANDONED_AFTER_SECONDS:
        return True
    log.warning(
        "output held by %s; watching for up to %.0fs whether that run still renews it",
        _describe(record),
        STALE_AFTER_SECONDS,
    )
    deadline = time.monotonic() + STALE_AFTER_SECONDS
    while time.monotonic() < deadline:
        time.sleep(min(5.0, HEARTBEAT_SECONDS / 3, STALE_AFTER_SECONDS / 4))
        now, now_version = store.read()
        if now_version != version:
            return False if now and now.get("run") == record.get("run") else None  # renewed
    return True


# ---------------------------------------------------------------------------------------------
# Holding it, and checking it.


@contextmanager
def output_lease(
    output_uri: str, storage_options: dict[str, Any] | None = None, *, command: str = "sdray"
) -> Iterator[str]:
    """Hold `output_uri` for the duration of the block (which gets the run's id, for
    `check_held`); refuse it while another run holds it."""
    fs, root = filesystem(output_uri, storage_options)
    if is_local(fs) and os.path.isfile(root):
        raise SdrayError(f"output {output_uri!r} is a file; give a directory")
    created_root = is_local(fs) and not os.path.exists(root)
    holder = _Holder(_LeaseStore(fs, join(root, LEASE)), command)
    try:
        holder.acquire(output_uri)
        try:
            yield holder.record["run"]
        finally:
            holder.release()
    finally:
        if created_root:  # a run refused before writing leaves no empty output behind
            try:
                os.rmdir(root)
            except OSError:
                pass  # it holds what the run wrote


def lease_run(fs, root: str) -> str | None:
    """The run that holds the output's lease now, if any."""
    record, _ = _LeaseStore(fs, join(root, LEASE)).read()
    return (record or {}).get("run")


def check_held(fs, root: str, run: str | None) -> None:
    """Fencing, before a commit: raise LeaseLost unless the output's lease still names `run`
    (None: the caller keeps no lease)."""
    if run is None:
        return
    record, _ = _LeaseStore(fs, join(root, LEASE)).read()
    if (record or {}).get("run") != run:
        holder = _describe(record) if record else "no run"
        raise LeaseLost(
            f"run {run} no longer holds the output's lease ({holder} holds it now), so it "
            "commits nothing more; the run that holds it completes the output"
        )


class _Holder:
    """This run's lease: acquired, renewed by a thread, released; all by compare-and-swap."""

    def __init__(self, store: _LeaseStore, command: str) -> None:
        self.store = store
        self.record = {
            "run": uuid.uuid4().hex[:12],
            "command": command,
            **_machine(),
            "pid": os.getpid(),
            "pid_start": (_stat(os.getpid()) or [None] * 20)[19],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.version: Any = None
        self._lock = threading.Lock()  # a renewal and the release never interleave
        self._stop = threading.Event()

    def acquire(self, output_uri: str) -> None:
        """Create the lease, or take it over from a holder that is gone; refuse a live one."""
        for _ in range(5):  # each pass reads the lease afresh: another run may race us for it
            current, version = self.store.read()
            try:
                if current is None:
                    self.version = self.store.create(self._stamped())
                elif current.get("run") == self.record["run"]:
                    self.version = version  # our write landed, though its reply was an error
                else:
                    gone = _holder_gone(self.store, current, version)
                    if gone is None:
                        continue
                    if not gone:
                        raise _refusal(output_uri, current)
                    log.warning(
                        "taking over the lease of a run that is gone: %s", _describe(current)
                    )
                    self.version = self.store.replace(self._stamped(), version)
            except (FileExistsError, LeaseLost):
                time.sleep(random.uniform(0.05, 0.5))  # another run changed it first
                continue
            threading.Thread(target=self._renew, name="sdray-lease", daemon=True).start()
            return
        raise _refusal(output_uri, self.store.read()[0] or {})

    def _stamped(self) -> dict[str, Any]:
        self.record["heartbeat"] = time.time()  # fresh when written, however long we waited
        return self.record

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.version = self.store.replace(self._stamped(), self.version)
                    continue
                except LeaseLost:
                    pass
                except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried
                    log.warning("could not renew the output lease: %s", error)
                    continue
                try:
                    current, version = self.store.read()
                except Exception as error:  # noqa: BLE001 - look again at the next heartbeat
                    log.warning("could not read the output lease: %s", error)
                    continue
                if current is None or current.get("run") != self.record["run"]:
                    log.error("this run lost the output's lease to %s", _describe(current or {}))
                    return
                self.version = version  # our write landed, though its reply was an error

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            try:
                self.store.delete(self.version)
            except Exception as error:  # noqa: BLE001 - an expired lease is harmless
                log.warning("could not remove the output lease %s: %s", self.store.path, error)
