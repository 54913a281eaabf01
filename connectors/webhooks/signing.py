"""Standard Webhooks 1.0 signatures: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
keyed with the base64-decoded part of the secret after ``whsec_``."""

from __future__ import annotations

import base64
import functools
import hmac
import secrets
from collections.abc import Iterable

PREFIX = "whsec_"
SECRET_BYTES = 32  # the standard asks for 24 to 64


def new_secret() -> str:
    """A fresh endpoint secret, ``whsec_`` + base64 of random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


@functools.lru_cache(maxsize=1024)
def key_of(secret: str) -> bytes:
    """The HMAC key of a secret (decoded once, not for every delivery)."""
    return base64.b64decode(secret.removeprefix(PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,…`` signature of ``body`` sent as ``msg_id`` at ``timestamp`` (Unix seconds)."""
    digest = hmac.digest(key_of(secret), f"{msg_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per valid secret, space-separated (during a
    rotation the new and the old secret both sign, so receivers can switch at their own pace)."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_)
