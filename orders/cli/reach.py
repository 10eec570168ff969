"""Whether the databases a command needs answer: one line naming what was tried, where its setting came
from and why it failed (exit status 3), instead of a stack trace."""

from __future__ import annotations

import argparse
import sys

import psycopg
from sqlalchemy.engine import make_url

from orders.config import Settings, masked, variable
from orders.db import libpq_url

EXIT_UNREACHABLE = 3


DATABASES = (("write_database_url", "write database"), ("read_database_url", "read database"))


def origin(args: argparse.Namespace, field: str) -> str:
    return f"{variable(field)} from {args.sources[field]}"


def hint(args: argparse.Namespace) -> str:
    """What to try, when no running `orders up` supplied the endpoints."""
    if any(source.startswith("endpoints file") for source in args.sources.values()):
        return ""
    return f"; no `orders up` runs in {args.data_dir or args.settings_data_dir} (see `orders settings`)"


def unreachable_database(args: argparse.Namespace, settings: Settings, *, server_only: bool = False) -> str | None:
    """None when both databases accept a connection (with server_only, their servers: the databases may
    not exist yet); else one line naming the first that does not, where its URL came from, and why."""
    for field, what in DATABASES:
        url = getattr(settings, field)
        target = make_url(url).set(database="postgres").render_as_string(hide_password=False) if server_only else url
        try:
            psycopg.connect(libpq_url(target), connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"cannot reach the {what} at {masked(field, url)} ({origin(args, field)}): {reason}{hint(args)}"
    return None


def refuse(problem: str) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return EXIT_UNREACHABLE
