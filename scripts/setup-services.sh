#!/usr/bin/env bash
# Bring up the services the test suite uses (MariaDB, Redis, PostgreSQL) on this Debian machine and
# configure PostgreSQL for XA tests (max_prepared_transactions = 20). Idempotent; run as root.
set -euo pipefail

PG_PREPARED=20

log() { printf 'setup-services: %s\n' "$*" >&2; }

wait_for() {  # wait_for <description> <command...>: retry for up to ~30 s
    local what=$1; shift
    local i
    for i in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    log "$what did not come up"
    return 1
}

pg_version=$(ls /etc/postgresql | head -n 1)
pg_ready() { psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1'; }

# --- MariaDB -------------------------------------------------------------------------------------
if ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
wait_for "MariaDB" mysqladmin -h 127.0.0.1 -u root ping
mysql -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test'

# --- Redis ---------------------------------------------------------------------------------------
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for "Redis" redis-cli -h 127.0.0.1 -p 6379 ping

# --- PostgreSQL ----------------------------------------------------------------------------------
if ! pg_ready >/dev/null 2>&1; then
    log "starting PostgreSQL $pg_version"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
fi
wait_for "PostgreSQL" pg_ready

current=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show max_prepared_transactions')
if [ "$current" -lt "$PG_PREPARED" ]; then
    log "setting max_prepared_transactions = $PG_PREPARED (was $current) and restarting PostgreSQL"
    psql -h 127.0.0.1 -U postgres -d postgres -Atc "ALTER SYSTEM SET max_prepared_transactions = $PG_PREPARED"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main restart
    wait_for "PostgreSQL" pg_ready
fi
if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select count(*) from pg_database where datname = 'test'")" = 0 ]; then
    psql -h 127.0.0.1 -U postgres -d postgres -Atc 'CREATE DATABASE test'
fi
log "max_prepared_transactions = $(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show max_prepared_transactions')"
log "services ready"
