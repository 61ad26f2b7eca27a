"""One run per output: a lease object, renewed while a run lives, that a second run respects.

Two runs writing one output (a second `--resume` started while the first still runs) would
write some rows twice. A run therefore creates `OUTPUT/.sdray-lease.json` before it touches
anything, renews it every `HEARTBEAT_SECONDS`, and deletes it when done. Every change to the
lease is a compare-and-swap (see `_LeaseStore`), so of two runs racing for it exactly one wins.

A lease left by a run that died is taken over: at once when its process ran on this machine
(same host, boot and process namespace) and is gone; from elsewhere, once this process has
watched it go `STALE_AFTER_SECONDS` without renewal (by its own clock: the machines' clocks may
disagree), or at once when its last heartbeat is older than `ABANDONED_AFTER_SECONDS`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdray.errors import SdrayError
from sdray.storage import filesystem, is_local, join, with_retries, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE = ".sdray-lease.json"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 90.0
ABANDONED_AFTER_SECONDS = 3600.0


def is_lease_file(name: str) -> bool:
    """The lease, or a temporary file of one that a killed run left behind (`_link_new`'s, or
    `write_bytes_atomic`'s): none of them makes an output non-empty."""
    return name == LEASE or (
        name.endswith(".tmp") and (LEASE in name or name.endswith(".lease.tmp"))
    )


class OutputInUse(SdrayError):
    """Another live run holds the output."""


class LeaseLost(Exception):
    """A compare-and-swap found another lease than the one expected."""


# ---------------------------------------------------------------------------------------------
# Where the lease lives: compare-and-swap on local disk, S3, or (best effort) any other store.


def _link_new(path: str, data: bytes) -> None:
    """Create `path` holding `data`, atomically and only if it does not exist (FileExistsError).

    A hard link of a complete temporary file: readers never see it half-written, and the link
    fails if the lease exists, also from another machine on a shared filesystem. Filesystems
    without hard links get an exclusive create instead.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{uuid.uuid4().hex}.lease.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some FUSE and SMB mounts)
        with open(path, "xb") as handle:
            handle.write(data)
    finally:
        os.unlink(tmp)


class _LeaseStore:
    """Reads and compare-and-swap writes of one lease object.

    A lease is identified by its version: its bytes (local, generic) or its ETag (S3).
    `create` fails if any lease exists; `replace` and `delete` fail unless the lease is still
    the version given. Local disk: an exclusive hard link, and a per-machine file lock around
    read-compare-write. S3: conditional requests (If-None-Match / If-Match). Other stores:
    read, compare, write (not atomic; a race there is caught at the next renewal).
    """

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Local disk: one process of this machine at a time (the lock lives in the temporary
        directory, keyed by the lease's path, so outputs hold no lock files)."""
        if not is_local(self.fs):
            yield
            return
        import hashlib
        import tempfile

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

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """(record, version); (None, None) when there is no lease. Unreadable text is {}."""
        if self.s3:
            from fsspec.asyn import sync

            try:
                data, version = with_retries(
                    lambda: sync(self.fs.loop, self._get_object), f"reading {self.path}"
                )
            except FileNotFoundError:
                return None, None
        else:
            try:
                data = with_retries(lambda: self.fs.cat_file(self.path), f"reading {self.path}")
            except FileNotFoundError:
                return None, None
            version = data
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), version

    def create(self, record: dict[str, Any]) -> Any:
        """Write the lease if there is none (else FileExistsError); return its version."""
        data = json.dumps(record).encode()
        if self.s3:
            return self._put(data, IfNoneMatch="*")
        if not is_local(self.fs):
            self.fs.pipe_file(self.path, data, mode="create")  # fsspec: exists, then write
            return data
        with self._exclusive():
            _link_new(self.path, data)
        return data

    def replace(self, record: dict[str, Any], version: Any) -> Any:
        """Overwrite the lease if it is still `version` (else LeaseLost); return the new one."""
        data = json.dumps(record).encode()
        if self.s3:
            return self._put(data, IfMatch=version)
        with self._exclusive():
            if self.read()[1] != version:
                raise LeaseLost(self.path)
            self._write(data)
        return data

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still `version`; leave anyone else's alone."""
        with self._exclusive():
            if self.read()[1] == version:  # S3 has no conditional delete on every bucket kind
                self.fs.rm(self.path)

    def _write(self, data: bytes) -> None:
        write_bytes_atomic(self.fs, self.path, data)

    async def _get_object(self) -> tuple[bytes, str]:
        """The lease's bytes and their ETag, from one GET (never two versions mixed)."""
        bucket, key, _ = self.fs.split_path(self.path)
        reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with reply["Body"] as body:
            return await body.read(), reply["ETag"]

    def _put(self, data: bytes, **condition: str) -> str:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            reply = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as error:  # s3fs turns every S3 error into an OSError subclass
            if not _lost_condition(error):
                raise  # throttling, a network fault, access denied: not another run
            raise (FileExistsError if "IfNoneMatch" in condition else LeaseLost)(
                self.path
            ) from error
        return reply["ETag"]


def _lost_condition(error: BaseException) -> bool:
    """Whether an S3 error says the condition failed: 412 Precondition Failed, or 409 when a
    racing conditional write is in flight."""
    seen: BaseException | None = error
    while seen is not None:
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# ---------------------------------------------------------------------------------------------
# Who holds it, and whether they are alive.


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """A process's start time (Linux), which tells a live holder from a reused pid."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


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


def _on_this_machine(record: dict[str, Any]) -> bool:
    """Whether the record's pid names a process here (Linux and macOS; elsewhere every holder
    is watched as if remote)."""
    if os.name != "posix":
        return False
    here = _machine()
    return isinstance(record.get("pid"), int) and all(record.get(k) == v for k, v in here.items())


def _holder_gone(record: dict[str, Any]) -> bool:
    """On this machine: whether the holding process has exited (or its pid was reused)."""
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and stat.rsplit(")", 1)[1].split()[0] == "Z":
        return True  # exited, not yet reaped by its parent
    started = record.get("pid_start")
    return started is not None and _start_time(pid) not in (None, started)


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


def _alive(store: _LeaseStore, record: dict[str, Any], version: Any) -> bool | None:
    """Whether the holder of this lease lives; may watch it for up to STALE_AFTER_SECONDS.
    None: the lease changed while watched (renewed, released or taken): look at it again."""
    if _on_this_machine(record):
        return not _holder_gone(record)
    if not record or _age(record) > ABANDONED_AFTER_SECONDS:
        return False
    log.warning(
        "output held by %s; watching for up to %.0fs whether that run still renews it",
        _describe(record),
        STALE_AFTER_SECONDS,
    )
    deadline = time.monotonic() + STALE_AFTER_SECONDS
    while time.monotonic() < deadline:
        time.sleep(min(5.0, HEARTBEAT_SECONDS / 3))
        if store.read()[1] != version:
            return None
    return False


# ---------------------------------------------------------------------------------------------
# Holding it.


@contextmanager
def output_lease(
    output_uri: str, storage_options: dict[str, Any] | None = None, *, command: str = "sdray"
) -> Iterator[None]:
    """Hold `output_uri` for the duration of the block; refuse it while another run holds it."""
    fs, root = filesystem(output_uri, storage_options)
    if is_local(fs) and os.path.isfile(root):
        raise SdrayError(f"output {output_uri!r} is a file; give a directory")
    created_root = is_local(fs) and not os.path.exists(root)
    store = _LeaseStore(fs, join(root, LEASE))
    try:
        holder = _Holder(store, command)
        holder.acquire(output_uri)
        try:
            yield
        finally:
            holder.release()
    finally:
        if created_root:  # a run refused before writing leaves no empty output behind
            try:
                os.rmdir(root)
            except OSError:
                pass  # it holds what the run wrote


class _Holder:
    """This run's lease: acquired, renewed by a thread, released; all by compare-and-swap."""

    def __init__(self, store: _LeaseStore, command: str) -> None:
        self.store = store
        self.record = {
            "run": uuid.uuid4().hex[:12],
            "command": command,
            **_machine(),
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.version: Any = None
        self._lock = threading.Lock()  # renewal and release never interleave
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="sdray-lease", daemon=True)

    def acquire(self, output_uri: str) -> None:
        for _ in range(5):
            current, version = self.store.read()
            if current is not None and current.get("run") == self.record["run"]:
                self.version = version  # our write landed, though its reply was an error
                self._renewer.start()
                return
            try:
                alive = None if current is None else _alive(self.store, current, version)
                self.record["heartbeat"] = time.time()  # fresh when written, however long we waited
                if current is None:
                    self.version = self.store.create(self.record)
                elif alive:
                    raise _refusal(output_uri, current)
                elif alive is None:
                    watched = self.store.read()[0]
                    if watched is not None and watched.get("run") == current.get("run"):
                        raise _refusal(output_uri, watched)  # its holder renewed it: alive
                    continue  # released, or another run's now: look again
                else:
                    log.warning(
                        "taking over the lease of a run that is gone: %s", _describe(current)
                    )
                    self.version = self.store.replace(self.record, version)
            except (FileExistsError, LeaseLost):
                time.sleep(random.uniform(0.05, 0.5))  # another run changed it first
                continue
            self._renewer.start()
            return
        raise _refusal(output_uri, self.store.read()[0] or {})

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.record["heartbeat"] = time.time()
                    self.version = self.store.replace(self.record, self.version)
                except LeaseLost:
                    try:
                        current, version = self.store.read()
                    except Exception as error:  # noqa: BLE001 - try again next heartbeat
                        log.warning("could not read the output lease: %s", error)
                        continue
                    if current is not None and current.get("run") == self.record["run"]:
                        self.version = version  # a failed reply, not another run: go on
                        continue
                    log.error(
                        "this run's lease on the output was taken by %s; stop one of the runs",
                        _describe(current or {}),
                    )
                    return
                except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried
                    log.warning("could not renew the output lease: %s", error)

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            try:
                self.store.delete(self.version)
            except Exception as error:  # noqa: BLE001 - an expired lease is harmless
                log.warning("could not remove the output lease %s: %s", self.store.path, error)
