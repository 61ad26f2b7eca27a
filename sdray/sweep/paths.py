"""Where a sweep's own outputs live in OUTPUT, and how files a browser fetches are written."""

from __future__ import annotations

import hashlib
from typing import Any

SWEEP_TABLE = "sweep.parquet"
SWEEP_RECORD = "sweep.json"
SHEETS_DIR = "contact_sheets"
SHEETS_INDEX = f"{SHEETS_DIR}/index.json"
GALLERY_DIR = "gallery"
THUMBS_DIR = f"{GALLERY_DIR}/thumbs"
GALLERY_PAGE = "index.html"
# Top-level entries of OUTPUT that a sweep writes itself, besides what the batch job writes.
SWEEP_OWNED = (SWEEP_TABLE, SWEEP_RECORD, SHEETS_DIR, GALLERY_DIR, GALLERY_PAGE)
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".json": "application/json",
}


def format_value(value: Any) -> str:
    """A value as labels and ids show it: ints plain, floats by repr (7.5, 1.0), text as is."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def display_value(value: Any) -> str:
    """A value as sheets, captions and gallery filters show it: as in ids, but an empty text
    as `""` (an empty filter value means "all")."""
    return '""' if value == "" else format_value(value)


def id_digest(row_id: str) -> str:
    """A row id's SHA-256 hex digest: names its thumbnail and ranks it in the gallery sample."""
    return hashlib.sha256(row_id.encode()).hexdigest()


def thumbnail_path(row_id: str) -> str:
    """Where a row's gallery thumbnail lives, relative to OUTPUT (never named by the raw id)."""
    key = id_digest(row_id)[:32]
    return f"{THUMBS_DIR}/{key[:2]}/{key}.jpg"


def strip_path(row_id: str) -> str:
    """Where a copy of a row's filmstrip lives for the gallery, relative to OUTPUT."""
    key = id_digest(row_id)[:32]
    return f"{THUMBS_DIR}/{key[:2]}/{key}.strip.png"


def write_web_file(fs, path: str, data: bytes) -> None:
    """Write a file a browser will fetch: atomically, with its Content-Type on object stores, so
    that a bucket website serves the page as a page, not as a download."""
    from sdray.storage import write_bytes_atomic

    content_type = next((t for s, t in CONTENT_TYPES.items() if path.endswith(s)), None)
    write_bytes_atomic(fs, path, data, content_type)
