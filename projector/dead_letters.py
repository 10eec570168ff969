"""The dead-letter table: events the projector could not apply, and later events parked behind them.

Parking rule: an event of aggregate A is parked when A has a dead letter that it would skip, that is
one with a lower version, or one whose version is unknown (undecodable) that came earlier in the stream.
Applying it would skip a version, and the read model never does that. Replaying applies an
aggregate's dead and parked events in version order (the predecessor may have arrived since, or the
cause been fixed); discarding deletes them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from orders.events import SUBJECT_PREFIX, UndecodableEvent, parse_event
from projector.projections import Change, Item, NeverApplicable, Outcome, Tables, apply_events, check_applicable

DEAD = "dead"
PARKED = "parked"


@dataclass(frozen=True)
class DeadLetter:
    stream_seq: int
    subject: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int | None
    event_id: str | None
    status: str
    reason: str
    deliveries: int
    payload: bytes
    headers: dict[str, str]


def aggregate_of_subject(subject: str) -> tuple[str, str]:
    """orders.v1.events.<type>.<id>[.<partition>] → (type, id); what an undecodable event is filed under."""
    rest = subject.removeprefix(SUBJECT_PREFIX + ".")
    kind, _, ident = rest.partition(".")
    return (kind or "unknown"), (ident.partition(".")[0] or subject)


async def queue_open_letters(conn: AsyncConnection[Any], aggregates: Iterable[tuple[str, str]]) -> Any:
    """Send the query for the dead letters of the given aggregates (in pipeline mode it goes out with
    what follows); `open_letters` reads its answer."""
    pairs = sorted(set(aggregates))
    if not pairs:
        return None
    return await conn.execute(
        "SELECT aggregate_type, aggregate_id, stream_seq, aggregate_version FROM dead_letters "
        "WHERE (aggregate_type, aggregate_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([t for t, _ in pairs], [i for _, i in pairs]),
    )


async def open_letters(cursor: Any) -> dict[tuple[str, str], list[tuple[int, int | None]]]:
    """(stream_seq, version) of every dead letter that `queue_open_letters` asked for, by aggregate."""
    found: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
    for kind, ident, seq, version in await cursor.fetchall() if cursor is not None else []:
        found.setdefault((kind, ident), []).append((seq, version))
    return found


def blocked_by(letters: list[tuple[int, int | None]], seq: int, version: int) -> bool:
    """True when applying (seq, version) would skip a dead letter of the same aggregate."""
    return any(
        (dl_version is None and dl_seq < seq) or (dl_version is not None and dl_version < version)
        for dl_seq, dl_version in letters
    )


async def record(conn: AsyncConnection[Any], letters: list[DeadLetter]) -> None:
    if not letters:
        return
    rows = [
        {
            "stream_seq": dl.stream_seq,
            "subject": dl.subject,
            "aggregate_type": dl.aggregate_type,
            "aggregate_id": dl.aggregate_id,
            "aggregate_version": dl.aggregate_version,
            "event_id": dl.event_id,
            "status": dl.status,
            "reason": dl.reason,
            "deliveries": dl.deliveries,
            "payload": base64.b64encode(dl.payload).decode(),
            "headers": dl.headers,
        }
        for dl in letters
    ]
    await conn.execute(
        "INSERT INTO dead_letters (stream_seq, subject, aggregate_type, aggregate_id, aggregate_version, event_id,"
        " status, reason, deliveries, payload, headers) "
        "SELECT r.stream_seq, r.subject, r.aggregate_type, r.aggregate_id, r.aggregate_version, r.event_id,"
        " r.status, r.reason, r.deliveries, decode(r.payload, 'base64'), r.headers "
        "FROM jsonb_to_recordset(%s::jsonb) AS r(stream_seq bigint, subject text, aggregate_type text,"
        " aggregate_id text, aggregate_version bigint, event_id text, status text, reason text, deliveries int,"
        " payload text, headers jsonb) ON CONFLICT (stream_seq) DO NOTHING",
        (json.dumps(rows),),
    )


_COLUMNS = (
    "id, stream_seq, subject, aggregate_type, aggregate_id, aggregate_version, event_id, status, reason,"
    " deliveries, payload, headers, created_at"
)


async def list_letters(conn: AsyncConnection[Any], limit: int = 1000) -> list[tuple[Any, ...]]:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM dead_letters ORDER BY stream_seq LIMIT %s", (limit,))
    return list(await cur.fetchall())


async def get_letter(conn: AsyncConnection[Any], letter_id: int) -> tuple[Any, ...] | None:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = %s", (letter_id,))
    return await cur.fetchone()


async def lock_existing(conn: AsyncConnection[Any], ids: list[int]) -> list[int]:
    """Lock the given dead letters until the transaction ends; return the ids that do not exist."""
    cur = await conn.execute("SELECT id FROM dead_letters WHERE id = ANY(%s) FOR UPDATE", (ids,))
    found = {row[0] for row in await cur.fetchall()}
    return sorted(set(ids) - found)


async def discard(conn: AsyncConnection[Any], ids: list[int]) -> int:
    cur = await conn.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (ids,))
    return cur.rowcount


@dataclass(frozen=True)
class ReplayResult:
    applied: int  # applied now, or found already applied
    still_open: int  # still missing a predecessor, or still failing
    changes: list[Change]


async def replay(conn: AsyncConnection[Any], ids: list[int], tables: Tables | None = None) -> ReplayResult:
    """Re-apply the aggregates of the given dead letters: all their dead and parked events, in order.

    Events that apply (or turn out to be applied already) leave the table; the rest stay.
    """
    cur = await conn.execute(
        "SELECT DISTINCT aggregate_type, aggregate_id FROM dead_letters WHERE id = ANY(%s)", (ids,)
    )
    aggregates = [(kind, ident) for kind, ident in await cur.fetchall()]
    cur = await conn.execute(
        "SELECT id, stream_seq, payload FROM dead_letters WHERE (aggregate_type, aggregate_id) IN "
        "(SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY stream_seq FOR UPDATE",
        ([k for k, _ in aggregates], [i for _, i in aggregates]),
    )
    rows = await cur.fetchall()
    items: dict[int, Item] = {}
    for letter_id, seq, payload in rows:
        try:
            event = parse_event(bytes(payload))
            check_applicable(event)
        except (UndecodableEvent, NeverApplicable):
            continue
        items[letter_id] = Item(seq, event)
    changes = await apply_events(conn, list(items.values()), tables or Tables())
    done = [i for i, item in items.items() if item.outcome in (Outcome.APPLIED, Outcome.DUPLICATE)]
    await discard(conn, done)
    return ReplayResult(applied=len(done), still_open=len(rows) - len(done), changes=changes)
