"""One PostgreSQL role per service, each with only the privileges its service needs.

- orders_command: reads and writes the write database's tables; nothing in the read database (it
  cannot even connect there) and owns nothing anywhere.
- orders_projector: owns the read database's tables (a rebuild creates, swaps and drops them); no
  access to the write database.
- orders_query: SELECT on the read database's tables, including those a rebuild creates later
  (default privileges); cannot write or create anything.

`orders create-roles` applies this with the admin URLs of ORDERS_WRITE_DATABASE_URL and
ORDERS_READ_DATABASE_URL, after `orders migrate`; it can run again at any time (idempotent). The
services then connect with URLs naming their role.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from orders.config import Settings
from orders.db import libpq_url

COMMAND, PROJECTOR, QUERY = "orders_command", "orders_projector", "orders_query"


async def _ensure_role(conn: psycopg.AsyncConnection[Any], role: str, password: str) -> None:
    exists = await (await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))).fetchone()
    verb = "ALTER" if exists else "CREATE"
    statement = sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
    await conn.execute(statement.format(sql.Identifier(role), sql.Literal(password or None)))


async def _database(conn: psycopg.AsyncConnection[Any]) -> sql.Identifier:
    row = await (await conn.execute("SELECT current_database()")).fetchone()
    assert row is not None
    return sql.Identifier(row[0])


async def apply(settings: Settings) -> None:
    """Create or update the three roles and grant each exactly what its service needs."""
    command, projector, query = sql.Identifier(COMMAND), sql.Identifier(PROJECTOR), sql.Identifier(QUERY)
    # Roles belong to a PostgreSQL server, not to a database: each side's are made on its own server
    # (the write and read databases may live on two; on one, the second pass finds the roles made).
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.write_database_url), autocommit=True) as conn:
        await _ensure_role(conn, COMMAND, settings.command_db_password)
        database = await _database(conn)
        for statement in (
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            "GRANT CONNECT ON DATABASE {db} TO {command}",
            "GRANT USAGE ON SCHEMA public TO {command}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {command}",
            "REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {command}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {command}",
        ):
            await conn.execute(sql.SQL(statement).format(db=database, command=command))
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.read_database_url), autocommit=True) as conn:
        await _ensure_role(conn, PROJECTOR, settings.projector_db_password)
        await _ensure_role(conn, QUERY, settings.query_db_password)
        database = await _database(conn)
        tables = await (await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).fetchall()
        for statement in (
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            "GRANT CONNECT ON DATABASE {db} TO {projector}, {query}",
            "GRANT USAGE, CREATE ON SCHEMA public TO {projector}",
            "GRANT USAGE ON SCHEMA public TO {query}",
            "ALTER DEFAULT PRIVILEGES FOR ROLE {projector} IN SCHEMA public GRANT SELECT ON TABLES TO {query}",
        ):
            await conn.execute(sql.SQL(statement).format(db=database, projector=projector, query=query))
        for (table,) in tables:
            name = sql.Identifier(table)
            if table != "alembic_version":  # the schema's version stays the migrating admin's
                await conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(name, projector))
            else:
                await conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(name, projector))
            await conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(name, query))
