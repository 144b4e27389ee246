#!/bin/sh
# First start: a cluster whose superuser is POSTGRES_USER with POSTGRES_PASSWORD, and the database POSTGRES_DB.
# Later starts use the volume as it is. Then PostgreSQL itself, as this container's main process.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set: put a password in .env (see .env.example)}"
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    # Passwords over the network; the socket inside the container needs none (only this container reaches it).
    initdb --username="$user" --pwfile="$password_file" --auth-host=scram-sha-256 --auth-local=trust \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$password_file"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    pg_ctl --wait --silent --options="-c listen_addresses=''" start
    if [ "$database" != postgres ]; then
        createdb --username="$user" "$database"
    fi
    pg_ctl --wait --silent --mode=fast stop
fi
exec postgres -c listen_addresses='*'
