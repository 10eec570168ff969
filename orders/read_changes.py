"""The projector's announcements of its commits: the contract between the projector, which publishes one
on core NATS after every commit (and one a second while idle), and query services on streaming
replicas of the read database, which cannot LISTEN (PostgreSQL refuses LISTEN on a hot standby).

An announcement names what the commit changed (the entries of the primary's NOTIFY payload:
[kind, key, version, stream_seq, customer_id]) and `lsn`, a WAL position read on the primary *after*
COMMIT returned, so at or past the commit record. A standby whose `pg_last_wal_replay_lsn()` has reached
`lsn` shows that commit to every new snapshot; a query service there acts on an announcement only then.

Core NATS keeps nothing: a message sent while a query service is disconnected is lost to it. So
announcements are sent in commit order by each projector, and a query service that lost some (it
reconnected, or fell too far behind) re-reads everything once it has replayed the next one it gets:
that one's `lsn` is past every lost commit. A projector that failed to publish one sets `resync` on
its next. The idle announcements bound how late that re-read can come.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SUBJECT_PREFIX = "orders.v1.read.changes"
IDLE_INTERVAL = 1.0  # seconds: a projector that committed nothing for this long announces its position


def subject(stream: str) -> str:
    """The subject of the announcements of the read model projected from stream (one system's)."""
    return f"{SUBJECT_PREFIX}.{stream}"


def parse_lsn(text: str) -> int:
    """PostgreSQL's pg_lsn text form (hex 'high/low') as an integer byte position."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not a WAL position: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


WAL_PAGE_BYTES = 8192
WAL_LONG_PAGE_HEADER_BYTES = 40  # the first page of a segment; other pages' headers are shorter


def replayed_enough(replayed: int, lsn: int) -> bool:
    """True when a standby that has replayed up to `replayed` shows every commit before position `lsn`.

    `lsn` is an insert position: just past a page header when the last record ended at the page's
    start, where the standby's replay position (the end of the last record) stays at that start.
    No record ends inside a page header, so the page's start is as good as `lsn` there.
    """
    in_page = lsn % WAL_PAGE_BYTES
    return replayed >= (lsn - in_page if in_page <= WAL_LONG_PAGE_HEADER_BYTES else lsn)


def format_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Announcement:
    lsn: int  # WAL position at or past the commit
    changes: list[list[Any]] = field(default_factory=list)  # [kind, key, version, stream_seq, customer_id]
    resync: bool = False  # announcements were lost before this one: re-read everything at lsn

    def encode(self) -> bytes:
        return json.dumps({"lsn": format_lsn(self.lsn), "changes": self.changes, "resync": self.resync}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        """The announcement in data; ValueError when it is not one."""
        try:
            fields = json.loads(data)
            changes = fields["changes"]
            if not isinstance(changes, list) or not all(isinstance(c, list) and len(c) == 5 for c in changes):
                raise ValueError("changes must be a list of [kind, key, version, stream_seq, customer_id]")
            return cls(parse_lsn(str(fields["lsn"])), changes, bool(fields.get("resync", False)))
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an announcement of read-model changes: {exc}") from None
