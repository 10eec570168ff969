#!/bin/sh
# A hot standby of the read database: copied with pg_basebackup on first start (which also writes
# standby.signal and the connection to the primary), then PostgreSQL as a streaming replica.
# Needs PRIMARY_HOST (and PRIMARY_PORT, 5432 by default), POSTGRES_USER and PGPASSWORD (the primary's
# credentials); runs as user postgres.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -h "$PRIMARY_HOST" -p "${PRIMARY_PORT:-5432}" -U "$POSTGRES_USER" -q; do sleep 1; done
    pg_basebackup -h "$PRIMARY_HOST" -p "${PRIMARY_PORT:-5432}" -U "$POSTGRES_USER" -D "$PGDATA" \
        --write-recovery-conf --wal-method=stream --checkpoint=fast
    chmod 700 "$PGDATA"
fi
exec postgres -D "$PGDATA" "$@"
