# Start a throwaway PostgreSQL server on loopback for the store tests.
#
#   source .ci/postgres.sh      # then DERMALOOP_TEST_PG_URL is exported
#
# Installs Debian's postgresql when it is missing (needs root: CI runs as root),
# creates a cluster of its own under $DERMALOOP_PG_DATA (default /tmp/dermaloop-pg)
# listening on 127.0.0.1:$DERMALOOP_PG_PORT (default 55432) only, so it never
# clashes with a system cluster, then a role and the database `dermaloop_test`.
# Sourced, so it changes no shell option of the caller; on failure it says why,
# exports nothing and returns non-zero. Running it twice reuses the running server.
# The role's password is a fixed test value for a loopback-only throwaway server.

_dermaloop_pg_start() {
    local port="${DERMALOOP_PG_PORT:-55432}"
    local data="${DERMALOOP_PG_DATA:-/tmp/dermaloop-pg}"
    local bin run=()
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres.sh: PostgreSQL is not installed and installing it needs root" >&2
            return 1
        fi
        echo "postgres.sh: installing Debian's postgresql..."
        apt-get update -qq >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || {
            echo "postgres.sh: apt-get install postgresql failed" >&2
            return 1
        }
        bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    fi
    if [ "$(id -u)" = 0 ]; then
        run=(runuser -u postgres --)
    fi
    if [ ! -s "$data/PG_VERSION" ]; then
        mkdir -p "$data" && chmod 700 "$data"
        [ "$(id -u)" = 0 ] && chown postgres: "$data"
        "${run[@]}" "$bin/initdb" -D "$data" -U postgres --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$data.initdb.log" 2>&1 || {
            echo "postgres.sh: initdb failed (see $data.initdb.log)" >&2
            return 1
        }
    fi
    if ! "${run[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        "${run[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off -c max_connections=100" \
            start >/dev/null || {
            echo "postgres.sh: the server did not start (see $data/server.log)" >&2
            return 1
        }
    fi
    local psql=("${run[@]}" "$bin/psql" -h "$data" -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'dermaloop'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE dermaloop LOGIN PASSWORD 'dermaloop' CREATEDB" >/dev/null || return 1
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'dermaloop_test'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE dermaloop_test OWNER dermaloop" >/dev/null || return 1
    fi
    export DERMALOOP_TEST_PG_URL="postgresql+psycopg://dermaloop:dermaloop@127.0.0.1:$port/dermaloop_test"
    echo "postgres.sh: PostgreSQL ready on 127.0.0.1:$port, database dermaloop_test"
}

_dermaloop_pg_start
_dermaloop_pg_status=$?
unset -f _dermaloop_pg_start
# `source` returns the status; `bash .ci/postgres.sh` exits with it.
return $_dermaloop_pg_status 2>/dev/null || exit $_dermaloop_pg_status
