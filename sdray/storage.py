"""Every path goes through fsspec: local disk, s3:// and any other fsspec URI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")
# Transient object store errors (throttling, resets, 5xx) are retried by the libraries: s3fs
# retries each call (its `retries`, 5 by default), botocore each request, here in its "standard"
# mode (exponential backoff with jitter) unless storage_options set `config_kwargs.retries`.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return `(fs, path)` for a URI; `path` is what `fs` methods take."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", S3_RETRIES)
        options["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def absolute_uri(uri: str) -> str:
    """A local path made absolute (Ray workers run elsewhere than the driver's working
    directory); URIs with a protocol as they are."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def open_uri(uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    """Open a URI for reading or writing."""
    fs, path = filesystem(uri, storage_options)
    return fs.open(path, mode)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join path parts with `/` whatever the filesystem."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# The keyword each object store's fsspec implementation takes for an object's Content-Type.
_CONTENT_TYPE_KEYWORDS = {"s3": "ContentType", "s3a": "ContentType", "gs": "content_type"}


def write_bytes_atomic(fs, path: str, data: bytes, content_type: str | None = None) -> None:
    """Write so that no reader sees a half-written file.

    Local disk: write a temporary file beside it, then rename. Object stores: one whole-object
    put (`pipe_file`), visible only once complete (the store's client retries transient
    errors, see `filesystem`); `content_type`
    sets the object's Content-Type where the store supports it (for pages a browser opens).
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        keyword = _CONTENT_TYPE_KEYWORDS.get(protocol)
        extra = {keyword: content_type} if keyword and content_type else {}
        fs.pipe_file(path, data, **extra)


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def put_if(fs, path: str, data: bytes, **condition: str) -> str | None:
    """S3: a conditional PUT (`IfNoneMatch="*"`: only if absent; `IfMatch=etag`: only if still
    that version). Returns the new ETag, or None when the condition failed (412, or 409 while a
    racing conditional write is in flight); any other error is raised."""
    bucket, key, _ = fs.split_path(path)
    try:
        reply = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as error:  # s3fs turns every S3 error into an OSError subclass
        seen: BaseException | None = error
        while seen is not None:
            code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            seen = seen.__cause__ or seen.__context__
        raise
    return reply["ETag"]


def create_new(fs, path: str, data: bytes) -> bool:
    """Write `path` only if nothing is there yet, so that of two writers exactly one wins; return
    whether this one did.

    Local disk: a complete temporary file hard-linked into place (the link fails if the path
    exists, also between machines sharing the filesystem; readers never see half a file).
    S3: a conditional PUT. Other stores: an existence check, then a write (not atomic).
    """
    if _is_s3(fs):
        return put_if(fs, path, data, IfNoneMatch="*") is not None
    if not is_local(fs):
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE and SMB mounts): an exclusive create
        try:
            with open(path, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    return True


def create_is_atomic(fs, directory: str) -> str | None:
    """Probe whether `create_new` is atomic in `directory` of this store: None if it is, else
    why not. Local disk and S3 are tried (S3-compatible stores that ignore a conditional PUT's
    `If-None-Match` accept the second write of the probe); other stores have no atomic
    create-if-absent in sdray."""
    if not (is_local(fs) or _is_s3(fs)):
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return f"sdray has no atomic create-if-absent on {protocol}:// stores"
    probe = f"{directory.rstrip('/')}/.sdray-probe-{uuid.uuid4().hex}"
    try:
        if not create_new(fs, probe, b"first"):
            return "a create-if-absent of a new object failed"
        if create_new(fs, probe, b"second"):
            return "a second create-if-absent of the same object succeeded (the store ignores If-None-Match)"
        return None
    finally:
        try:
            fs.rm(probe)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def upload(fs, path: str) -> Iterator[Any]:
    """A file to stream one object into, visible at `path` only once complete.

    Local disk: a temporary file beside it, renamed into place on success. Object stores: the
    store's own streaming upload (S3: multipart, in parts of a few MB; the object appears when
    the upload completes), so a shard never sits whole in memory.
    """
    if not is_local(fs):
        handle = fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            handle.discard()  # never publish half an object (S3: abort the multipart upload)
            raise
        handle.close()
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(fs, path: str) -> Any | None:
    """A JSON file's content, or None when it does not exist."""
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def is_nonempty(fs, path: str) -> bool:
    """Whether `path` exists and holds anything."""
    try:
        if not fs.exists(path):
            return False
        if fs.isfile(path):
            return True
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False
