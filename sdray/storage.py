"""Every path goes through fsspec: local disk, s3:// and any other fsspec URI."""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return `(fs, path)` for a URI; `path` is what `fs` methods take."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


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


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write so that no reader sees a half-written file.

    Local disk: write a temporary file beside it, then rename. Object stores: an upload becomes
    visible only once complete, so a plain write is already atomic.
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
        with fs.open(path, "wb") as handle:
            handle.write(data)


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
