# shellcheck shell=bash
# A throwaway MariaDB server for the test command (scripts/test.sh) and the benchmarks
# (bench/run.sh): data directory in /dev/shm (or $TMPDIR), a random free port on 127.0.0.1 (retried
# when another program takes it first), user skyhold/skyhold with every privilege.
#
# start_throwaway_mariadb PREFIX: the data directory is a new PREFIX.XXXXXX. Uses the caller's
# `info` and `die`. Sets the globals MDB_DIR, MDB_PID and MDB_PORT as soon as they are known, so
# the caller's exit trap can stop the server (by PID) and remove the directory.
start_throwaway_mariadb() {
    local MARIADBD TMP_BASE MDB_SOCK MDB_LOG MDB_USER port i up
    MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)
    TMP_BASE=/dev/shm
    [ -d "$TMP_BASE" ] && [ -w "$TMP_BASE" ] || TMP_BASE=${TMPDIR:-/tmp}
    MDB_DIR=$(mktemp -d "$TMP_BASE/$1.XXXXXX")
    MDB_SOCK="$MDB_DIR/mysqld.sock"
    MDB_LOG="$MDB_DIR/error.log"
    MDB_USER=$(id -un)
    local MYSQL=(mariadb --no-defaults --protocol=TCP -h127.0.0.1 -uroot --connect-timeout=2)

    if ! mariadb-install-db --no-defaults --datadir="$MDB_DIR/data" --user="$MDB_USER" \
        --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve \
        >"$MDB_DIR/install.log" 2>&1; then
        cat "$MDB_DIR/install.log" >&2
        die "mariadb-install-db failed"
    fi

    random_port() { echo $((20000 + (RANDOM * 32768 + RANDOM) % 40001)); }
    port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

    MDB_PORT=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        port=$(random_port)
        if port_in_use "$port"; then
            info "port $port is busy, picking another one"
            continue
        fi
        : >"$MDB_LOG"
        "$MARIADBD" --no-defaults --datadir="$MDB_DIR/data" --user="$MDB_USER" \
            --port="$port" --bind-address=127.0.0.1 --socket="$MDB_SOCK" \
            --pid-file="$MDB_DIR/mysqld.pid" --log-error="$MDB_LOG" \
            --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 --innodb-buffer-pool-size=128M \
            --max-connections=1000 --skip-name-resolve \
            --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
            </dev/null >"$MDB_DIR/stdout.log" 2>&1 &
        MDB_PID=$!
        up=""
        for ((i = 0; i < 600; i++)); do # 60 s
            if ! kill -0 "$MDB_PID" 2>/dev/null; then
                break
            fi
            # the server answering on this port must be ours (same socket path)
            if [ "$("${MYSQL[@]}" -P"$port" -N -B -e 'select @@socket' 2>/dev/null)" = "$MDB_SOCK" ]; then
                up=1
                break
            fi
            sleep 0.1
        done
        if [ -n "$up" ]; then
            MDB_PORT=$port
            break
        fi
        if ! kill -0 "$MDB_PID" 2>/dev/null &&
            grep -qE "Address already in use|Can't start server: Bind on TCP/IP port|Do you already have another .* running" "$MDB_LOG"; then
            info "port $port: bind failed, retrying with another port"
            wait "$MDB_PID" 2>/dev/null || true
            MDB_PID=""
            continue
        fi
        echo "----- MariaDB error log ($MDB_LOG) -----" >&2
        cat "$MDB_LOG" >&2 || true
        die "MariaDB did not come up on 127.0.0.1:$port within 60 s"
    done
    [ -n "$MDB_PORT" ] || die "could not find a free port for MariaDB"
    info "mariadbd pid $MDB_PID on 127.0.0.1:$MDB_PORT (datadir $MDB_DIR/data)"

    "${MYSQL[@]}" -P"$MDB_PORT" <<'SQL'
DELETE FROM mysql.global_priv WHERE User = '';
FLUSH PRIVILEGES;
CREATE USER 'skyhold'@'%' IDENTIFIED BY 'skyhold';
CREATE USER 'skyhold'@'localhost' IDENTIFIED BY 'skyhold';
GRANT ALL PRIVILEGES ON *.* TO 'skyhold'@'%' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO 'skyhold'@'localhost' WITH GRANT OPTION;
SQL
    mariadb --no-defaults --protocol=TCP -h127.0.0.1 -P"$MDB_PORT" -uskyhold -pskyhold -N -B \
        -e 'select concat("  connected as ", current_user(), " to MariaDB ", version())' ||
        die "cannot connect as skyhold"
}
