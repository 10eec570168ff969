"""The outbox relay's report of what still waits in the command side's outbox: the contract between the
relay, which publishes it on core NATS every few seconds, and the projector, which counts it in the
projection lag (the projector cannot read the write database, and needs no access to it for this).

The report is not an event: it goes to a subject outside the event stream, is not stored, and a lost
report costs only freshness. A report older than STALE_AFTER seconds is not believed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

SUBJECT = "orders.v1.status.outbox"
INTERVAL = 2.0  # seconds between two reports of the leading relay
STALE_AFTER = 5 * INTERVAL


@dataclass(frozen=True)
class OutboxReport:
    backlog: int  # outbox rows not yet published
    oldest_seconds: float  # age of the oldest of them; 0 without backlog
    failing: str | None = None  # why the relay's last round failed, if it did
    at: float = 0.0  # wall-clock time of the measurement (time.time())

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> OutboxReport:
        """The report in data; ValueError when it is not one."""
        try:
            fields = json.loads(data)
            return cls(
                int(fields["backlog"]),
                float(fields["oldest_seconds"]),
                None if fields.get("failing") is None else str(fields["failing"]),
                float(fields["at"]),
            )
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an outbox report: {exc}") from None

    def fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.at <= STALE_AFTER
