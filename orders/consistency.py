"""Consistency tokens: the opaque proof of a write that a query can wait for (read-your-writes).

A token names every aggregate a command changed with the version it reached, e.g.
{("order", "3f2…"): 1, ("product", "SKU-1"): 7}. The read model has caught up with the token when each
named read row is at that version or later. Tokens are base64url text so they travel in any client.
"""

from __future__ import annotations

import base64
import binascii
import json

from orders.events import ORDER, PRODUCT

Versions = dict[tuple[str, str], int]
_KIND = {ORDER: "o", PRODUCT: "p"}
_KIND_BACK = {v: k for k, v in _KIND.items()}
MAX_TOKEN_LENGTH = 16384


class InvalidToken(ValueError):
    """The text is not a consistency token made by this system."""


def encode(versions: Versions) -> str:
    body = [[_KIND[kind], ident, version] for (kind, ident), version in sorted(versions.items())]
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(token: str) -> Versions:
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        if not isinstance(body, list) or not body:  # every command changes at least one aggregate
            raise ValueError
        versions: Versions = {}
        for kind, ident, version in body:
            if kind not in _KIND_BACK or not isinstance(ident, str) or not ident or len(ident) > 128:
                raise ValueError
            if any(ord(ch) < 32 for ch in ident):  # no id holds control characters (nor can PostgreSQL: NUL)
                raise ValueError
            if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**63:
                raise ValueError
            versions[(_KIND_BACK[kind], ident)] = version
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidToken("not a consistency token returned by a command") from None
    return versions
