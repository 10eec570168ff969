#!/bin/sh
# Run once by the postgres image when it initialises the read database (docker-entrypoint-initdb.d):
# let the replica containers stream from it. The image's own pg_hba.conf admits replication
# connections from the container itself only.
set -eu
echo "host replication ${POSTGRES_USER} all scram-sha-256" >> "$PGDATA/pg_hba.conf"
