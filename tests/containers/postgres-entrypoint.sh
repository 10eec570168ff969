#!/bin/sh
# The containers test's stand-in for the entry point of the postgres image (which no registry can
# supply here): the parts of it docker-compose.yml relies on. On the first start (empty PGDATA) it
# makes a cluster whose superuser is POSTGRES_USER with POSTGRES_PASSWORD, password logins from
# anywhere, the database POSTGRES_DB, and runs /docker-entrypoint-initdb.d/*.sh; then, as user
# postgres, it runs the command (default: postgres) listening on every address, as the image does.
set -eu
export PGDATA="${PGDATA:-/var/lib/postgresql/18/docker}"
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown -R postgres:postgres /var/lib/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password_file" -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    psql -v ON_ERROR_STOP=1 -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
    for script in /docker-entrypoint-initdb.d/*.sh; do
        if [ -e "$script" ]; then . "$script"; fi
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
if [ "$#" = 0 ]; then set -- postgres; fi
exec "$@"
