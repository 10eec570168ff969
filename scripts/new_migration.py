"""Write a new Alembic revision for one database from the difference between the models and the schema.

Usage: .venv/bin/python -m scripts.new_migration write|read "what changed"

Starts a throwaway PostgreSQL, migrates a database to the current head, and lets Alembic's autogenerate
compare it with the SQLAlchemy tables (command_service/schema.py or orders/read_model.py). Review the
generated file before committing it: autogenerate does not see everything (renames, data changes).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from alembic import command

from orders import local_stack, migrations
from orders.db import ensure_database


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "read"):
        raise SystemExit(__doc__)
    location = migrations.WRITE if sys.argv[1] == "write" else migrations.READ
    with tempfile.TemporaryDirectory(prefix="new-migration-") as tmp:
        pg = local_stack.start_postgres(Path(tmp) / "postgres", durable=False)
        try:
            url = pg.url("schema")
            asyncio.run(ensure_database(url))
            migrations.upgrade(url, location)
            command.revision(migrations.config(url, location), message=sys.argv[2], autogenerate=True)
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
