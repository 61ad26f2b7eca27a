"""Bearer-key auth from SDRAY_API_KEYS: only sha256 digests of the keys ever leave the driver."""

from __future__ import annotations

import hashlib
import hmac
import os

from sdray.errors import ConfigError
from sdray.serve.protocol import ApiError

API_KEYS_ENV = "SDRAY_API_KEYS"


def key_digest(key: str) -> str:
    """Hex sha256 of one API key (what replicas hold and compare)."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_digests(value: str | None = None) -> tuple[str, ...]:
    """Digests of the comma-separated keys in `value` (default: $SDRAY_API_KEYS).

    () means open access, and only an unset variable gives it: a value that is set but holds no
    key (empty, commas, whitespace) is refused, since it most likely comes from a broken secret.
    """
    if value is None:
        value = os.environ.get(API_KEYS_ENV)
        if value is None:
            return ()
    keys = {key.strip() for key in value.split(",")} - {""}
    if not keys:
        raise ConfigError(
            f"${API_KEYS_ENV} is set but holds no API key (only commas or whitespace); "
            f"set it to key1,key2,... to require keys, or unset it to serve without auth"
        )
    return tuple(sorted(key_digest(key) for key in keys))


def check_authorization(header: str | None, digests: tuple[str, ...]) -> None:
    """Raise a 401 ApiError unless `header` is `Bearer <key>` for a configured key."""
    if not digests:
        return
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    presented = key_digest(token)
    # Compare against every digest so the time taken does not depend on which one matched.
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    if not matched:
        raise ApiError(
            401,
            "Incorrect API key provided.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
