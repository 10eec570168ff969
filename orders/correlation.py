"""The request context that log lines and events carry: a correlation id and W3C trace context.

A gRPC call binds both for the task that handles it (from the x-correlation-id and traceparent metadata,
or fresh ones); the command service writes them into each event's envelope and NATS headers, and the
projector binds them again while it handles that event. Log records pick them up from here.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

CORRELATION_ID: ContextVar[str] = ContextVar("correlation_id", default="")
TRACEPARENT: ContextVar[str] = ContextVar("traceparent", default="")

MAX_CORRELATION_ID = 128
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def correlation_id_from(value: str | None) -> str:
    """The caller's id when it is 1-128 printable ASCII characters without spaces, else a fresh UUID."""
    if value and len(value) <= MAX_CORRELATION_ID and _PRINTABLE.fullmatch(value):
        return value
    return str(uuid.uuid4())


def child_traceparent(parent: str | None) -> str:
    """A traceparent for work done on behalf of parent: same trace and flags, a new span id.

    An absent or malformed parent (or an all-zero trace id) starts a new, sampled trace.
    """
    match = _TRACEPARENT.fullmatch((parent or "").strip().lower())
    if match and match.group(1) != "0" * 32:
        trace_id, flags = match.group(1), match.group(3)
    else:
        trace_id, flags = os.urandom(16).hex(), "01"
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


def trace_id_of(traceparent: str) -> str:
    match = _TRACEPARENT.fullmatch(traceparent)
    return match.group(1) if match else ""


@contextlib.contextmanager
def bound(correlation_id: str, traceparent: str) -> Iterator[None]:
    """Make correlation_id and traceparent the current ones for the enclosed code (this task only)."""
    tokens = CORRELATION_ID.set(correlation_id), TRACEPARENT.set(traceparent)
    try:
        yield
    finally:
        CORRELATION_ID.reset(tokens[0])
        TRACEPARENT.reset(tokens[1])
