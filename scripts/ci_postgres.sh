#!/usr/bin/env bash
# Start a throw-away PostgreSQL on 127.0.0.1 for the service tests (idempotent, fast when running).
#
# Writes the SQLAlchemy URL to $BITALLOC_PG_URL_FILE (default /tmp/bitalloc_pg_url), which
# tests/service/conftest.py reads, and prints `export BITALLOC_TEST_PG_URL=...`.
# Installs Debian's postgresql with apt-get when no server binaries are found (root only).
# Never fails the CI run: without PostgreSQL the PG tests skip with a stated reason.
set -u
PORT="${BITALLOC_PG_PORT:-54329}"
DATA="${BITALLOC_PG_DATA:-/tmp/bitalloc_pg/data}"
SOCK="$(dirname "$DATA")"
URL_FILE="${BITALLOC_PG_URL_FILE:-/tmp/bitalloc_pg_url}"
DB=bitalloc_test
URL="postgresql+psycopg2://postgres@127.0.0.1:${PORT}/${DB}"

say() { echo "ci_postgres: $*" >&2; }

find_bin() {
    local d
    if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return 0; fi
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

BIN="$(find_bin)" || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing postgresql with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; }
    fi
    BIN="$(find_bin)" || { say "no PostgreSQL available; PG tests will skip"; rm -f "$URL_FILE"; exit 0; }
}

# initdb/postgres refuse to run as root: run them as the postgres user then.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; then
    :  # already running (second call in the same CI job)
else
    mkdir -p "$SOCK"
    [ "$(id -u)" = 0 ] && chown -R postgres "$SOCK"
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres --no-sync -E UTF8 >/dev/null \
            || { say "initdb failed; PG tests will skip"; rm -f "$URL_FILE"; exit 0; }
    fi
    # fsync off: the data dir is thrown away; speeds the test suite up.
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$SOCK/server.log" -w -t 30 \
        -o "-h 127.0.0.1 -p $PORT -k $SOCK -c fsync=off -c synchronous_commit=off -c max_connections=200" \
        start >/dev/null \
        || { say "server did not start (see $SOCK/server.log); PG tests will skip"; rm -f "$URL_FILE"; exit 0; }
fi

if ! as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "$URL" > "$URL_FILE"
echo "export BITALLOC_TEST_PG_URL=$URL"
