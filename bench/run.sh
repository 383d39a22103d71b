#!/usr/bin/env bash
# Run the Skyhold API benchmark on SQLite and on a throwaway MariaDB server.
#
#   bench/run.sh [extra skyhold-bench args, e.g. --duration-secs 30 --json-out bench.json]
#   bench/run.sh cluster [extra skyhold-bench-cluster args, e.g. --rounds 20 --backend both]
#   bench/run.sh db [extra skyhold-bench-db args, e.g. --kills 20 --json-out db.json]
#   bench/run.sh ha [extra skyhold-bench-ha args, e.g. --backend both --vms 10,100 --runs 3]
#
# With `cluster` as the first argument it runs the failover and membership-load benchmark
# (skyhold-bench-cluster, MariaDB by default) instead of the API benchmark. With `db` it runs the
# database-HA benchmark (skyhold-bench-db: Galera node and replication primary kills, async-job
# throughput per backend); that one starts its own Galera cluster and replication pair (it needs
# galera-4 and rsync too) and uses the throwaway MariaDB as its single-MariaDB backend. With `ha`
# it runs the host-HA benchmark (skyhold-bench-ha: time from a host's death to its HA VMs Running
# elsewhere, storage-lease and IPMI fencing; SQLite unless `--backend mariadb|both`; the IPMI path
# needs ipmi_sim and ipmitool, Debian packages openipmi and ipmitool).
#
# Steps:
#   1. start a private MariaDB server with scripts/lib/mariadb.sh, as scripts/test.sh does: datadir
#      in /dev/shm, a random free port on 127.0.0.1, user skyhold/skyhold (it is stopped by PID and
#      deleted on exit)
#   2. cargo build --release -p skyhold -p skyhold-bench
#   3. target/release/skyhold-bench --backend both --mysql-url mysql://skyhold:skyhold@127.0.0.1:PORT "$@"
#      (or target/release/skyhold-bench-cluster --mysql-url ... "$@" with `cluster`,
#      target/release/skyhold-bench-db --mysql-url ... "$@" with `db`,
#      target/release/skyhold-bench-ha --mysql-url ... "$@" with `ha`)
#
# Needs mariadbd, mariadb and mariadb-install-db (Debian: apt-get install mariadb-server
# mariadb-client; scripts/test.sh installs them).
#
# Knobs (environment):
#   SKYHOLD_BENCH_SKIP_BUILD=1  use the binaries already in target/release
#   SKYHOLD_BENCH_MYSQL_URL     use this MariaDB/MySQL server instead of starting one
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

info() { printf '  %s\n' "$*"; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# ---------------------------------------------------------------------------------------------
# Cleanup: stop only the MariaDB server we started (by its PID) and remove its temp dir.
# ---------------------------------------------------------------------------------------------
MDB_PID=""
MDB_DIR=""
STEP_PID=""

# true if $1 is still the mariadbd we started (guards against PID reuse)
is_our_mariadbd() {
    local pid=$1
    [ -n "$pid" ] && [ -n "$MDB_DIR" ] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--datadir=$MDB_DIR/data"
}

stop_mariadb() {
    local pid=$MDB_PID i
    MDB_PID=""
    if is_our_mariadbd "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do # 30 s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if is_our_mariadbd "$pid"; then
            echo "MariaDB (pid $pid) did not stop within 30 s, sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    if [ -n "$pid" ]; then
        wait "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_mariadb
    if [ -n "$MDB_DIR" ] && [ -d "$MDB_DIR" ]; then
        rm -rf -- "$MDB_DIR"
    fi
    exit "$rc"
}
# INT/TERM go to the running step (the bench then cleans up its server and database) before
# MariaDB is stopped.
on_signal() {
    if [ -n "$STEP_PID" ]; then
        kill -INT "$STEP_PID" 2>/dev/null || true
        wait "$STEP_PID" 2>/dev/null || true
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# shellcheck source=../scripts/lib/mariadb.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/mariadb.sh"

run_step() {
    local rc=0
    echo "+ $*"
    "$@" &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    return $rc
}

# ---------------------------------------------------------------------------------------------
# 1. Throwaway MariaDB server (same settings as scripts/test.sh)
# ---------------------------------------------------------------------------------------------
start_mariadb() {
    for c in mariadbd mariadb mariadb-install-db; do
        command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] ||
            die "$c not found: apt-get install mariadb-server mariadb-client (or pass SKYHOLD_BENCH_MYSQL_URL)"
    done
    start_throwaway_mariadb skyhold-bench-mdb
    MYSQL_URL="mysql://skyhold:skyhold@127.0.0.1:$MDB_PORT"
}

if [ -n "${SKYHOLD_BENCH_MYSQL_URL:-}" ]; then
    MYSQL_URL=$SKYHOLD_BENCH_MYSQL_URL
    info "using the MariaDB server of SKYHOLD_BENCH_MYSQL_URL"
else
    start_mariadb
fi

# ---------------------------------------------------------------------------------------------
# 2. Release build, 3. the benchmark
# ---------------------------------------------------------------------------------------------
if [ "${SKYHOLD_BENCH_SKIP_BUILD:-}" != 1 ]; then
    run_step cargo build --release -p skyhold -p skyhold-bench
fi
if [ "${1:-}" = cluster ]; then
    shift
    run_step target/release/skyhold-bench-cluster --skyhold target/release/skyhold \
        --mysql-url "$MYSQL_URL" "$@"
elif [ "${1:-}" = db ]; then
    shift
    run_step target/release/skyhold-bench-db --skyhold target/release/skyhold \
        --mysql-url "$MYSQL_URL" "$@"
elif [ "${1:-}" = ha ]; then
    shift
    run_step target/release/skyhold-bench-ha --skyhold target/release/skyhold \
        --mysql-url "$MYSQL_URL" "$@"
else
    run_step target/release/skyhold-bench --skyhold target/release/skyhold \
        --backend both --mysql-url "$MYSQL_URL" "$@"
fi
