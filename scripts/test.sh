#!/usr/bin/env bash
# Skyhold test command: the single entry point for CI (.ci/run) and for humans.
#
#   scripts/test.sh [extra args for `cargo nextest run`]
#
# Steps:
#   1. apt: mariadb-server, mariadb-client, galera-4, rsync, ipmitool, openipmi (only if missing)
#   2. Python client environments under .venv-ci/ (cs from PyPI, cloudmonkey 5.3.3.1 on Python 2.7)
#   3. one throwaway MariaDB server on a random 127.0.0.1 port (stopped by PID on exit)
#   4. cargo fmt --check, clippy -D warnings, build --bins, nextest run, doc tests (if any)
#
# Exported for the tests:
#   SKYHOLD_TEST_MYSQL_URL    mysql://skyhold:skyhold@127.0.0.1:PORT   (no database: each test creates its own)
#   SKYHOLD_TEST_CS           absolute path of the `cs` CLI
#   SKYHOLD_TEST_CLOUDMONKEY  absolute path of the `cloudmonkey` CLI
#
# Knobs (environment):
#   SKYHOLD_TEST_SETUP_ONLY=1  do steps 1-3, print the exports, stop MariaDB and exit
#   SKYHOLD_TEST_SKIP_LINT=1   skip cargo fmt and clippy (local iteration)
#   SKYHOLD_TEST_PYTHON3       Python 3 used for the cs venv   (default: python3)
#   SKYHOLD_TEST_PYTHON2       Python 2.7 used for cloudmonkey (default: ~/.pyenv/versions/2.7.18/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

START_TS=$(date +%s)
elapsed() { echo $(($(date +%s) - START_TS)); }
section() { printf '\n===== [%5ss] %s =====\n' "$(elapsed)" "$*"; }
info() { printf '  %s\n' "$*"; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# cargo may not be on PATH in a non-login shell
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# ---------------------------------------------------------------------------------------------
# Cleanup: stop only the MariaDB server we started (by its PID) and remove its temp dir.
# ---------------------------------------------------------------------------------------------
MDB_PID=""
MDB_DIR=""
STEP_PID="" # the cargo command currently running (forwarded INT/TERM)

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
on_signal() {
    if [ -n "$STEP_PID" ]; then
        kill -TERM "$STEP_PID" 2>/dev/null || true
        wait "$STEP_PID" 2>/dev/null || true
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# shellcheck source=lib/mariadb.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/mariadb.sh"

# ---------------------------------------------------------------------------------------------
# 1. System packages
# ---------------------------------------------------------------------------------------------
section "apt packages"
# galera-4 and rsync: the 3-node Galera cluster of tests/db_ha.rs (rsync state transfer).
# ipmitool and openipmi (ipmi_sim): IPMI fencing against a simulated BMC (skyhold-core tests/fence_ipmi.rs).
APT_PACKAGES=(mariadb-server mariadb-client galera-4 rsync ipmitool openipmi)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    info "installing: ${missing[*]}"
    [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
    # wait for a concurrent apt/dpkg (up to 10 min) instead of failing on the lock
    APT_OPTS=(-o DPkg::Lock::Timeout=600)
    for attempt in 1 2 3; do
        if apt-get "${APT_OPTS[@]}" update -q; then break; fi
        [ "$attempt" = 3 ] && die "apt-get update failed"
        sleep 10
    done
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}"
else
    info "already installed: ${APT_PACKAGES[*]}"
fi
for c in mariadbd mariadb mariadb-install-db ipmitool ipmi_sim; do
    command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || die "$c not found after install"
done

# ---------------------------------------------------------------------------------------------
# 2. Python client environments (.venv-ci/py3: cs, .venv-ci/py2: cloudmonkey 5.3.3.1)
# ---------------------------------------------------------------------------------------------
section "python clients (cs, cloudmonkey)"
VENV_DIR="$ROOT/.venv-ci"
PY3_ENV="$VENV_DIR/py3"
PY2_ENV="$VENV_DIR/py2"
PYTHON3=${SKYHOLD_TEST_PYTHON3:-python3}
PYTHON2=${SKYHOLD_TEST_PYTHON2:-$HOME/.pyenv/versions/2.7.18/bin/python}
CLOUDMONKEY_VERSION=5.3.3.1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
mkdir -p "$VENV_DIR"

py3_ok() { "$PY3_ENV/bin/cs" --version >/dev/null 2>&1; }
py2_ok() {
    "$PY2_ENV/bin/cloudmonkey" --version >/dev/null 2>&1 &&
        [ "$("$PY2_ENV/bin/python" -c 'import pkg_resources; print(pkg_resources.get_distribution("cloudmonkey").version)' 2>/dev/null)" = "$CLOUDMONKEY_VERSION" ]
}

if py3_ok; then
    info "cs already installed: $("$PY3_ENV/bin/cs" --version)"
else
    info "creating $PY3_ENV with $("$PYTHON3" --version 2>&1)"
    rm -rf -- "$PY3_ENV"
    "$PYTHON3" -m venv "$PY3_ENV"
    "$PY3_ENV/bin/python" -m pip install -q cs
    py3_ok || die "cs does not work in $PY3_ENV"
    info "installed cs $("$PY3_ENV/bin/cs" --version)"
fi

if py2_ok; then
    info "cloudmonkey $CLOUDMONKEY_VERSION already installed"
else
    [ -x "$PYTHON2" ] || die "Python 2.7 not found at $PYTHON2 (set SKYHOLD_TEST_PYTHON2)"
    info "creating $PY2_ENV with $("$PYTHON2" --version 2>&1)"
    rm -rf -- "$PY2_ENV"
    # virtualenv 20.21 is the last release that can create Python 2.7 environments (it ships
    # pip/setuptools wheels for 2.7); it runs from the Python 3 venv.
    "$PY3_ENV/bin/python" -m pip install -q 'virtualenv<20.22'
    "$PY3_ENV/bin/python" -m virtualenv -q -p "$PYTHON2" "$PY2_ENV"
    "$PY2_ENV/bin/python" -m pip install -q --no-python-version-warning "cloudmonkey==$CLOUDMONKEY_VERSION"
    py2_ok || die "cloudmonkey $CLOUDMONKEY_VERSION does not work in $PY2_ENV"
    info "installed cloudmonkey $CLOUDMONKEY_VERSION"
fi
export SKYHOLD_TEST_CS="$PY3_ENV/bin/cs"
export SKYHOLD_TEST_CLOUDMONKEY="$PY2_ENV/bin/cloudmonkey"

# ---------------------------------------------------------------------------------------------
# 3. Throwaway MariaDB server (one for the whole run)
# ---------------------------------------------------------------------------------------------
section "MariaDB"
start_throwaway_mariadb skyhold-test-mdb
info "MariaDB ready after $(elapsed) s"

export SKYHOLD_TEST_MYSQL_URL="mysql://skyhold:skyhold@127.0.0.1:$MDB_PORT"

section "test environment"
for v in SKYHOLD_TEST_MYSQL_URL SKYHOLD_TEST_CS SKYHOLD_TEST_CLOUDMONKEY; do
    printf 'export %s=%q\n' "$v" "${!v}"
done

if [ "${SKYHOLD_TEST_SETUP_ONLY:-}" = 1 ]; then
    section "setup only (SKYHOLD_TEST_SETUP_ONLY=1): stopping MariaDB"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. Quality gates and tests. A failing step does not stop the later ones (except that a failed
#    build skips the tests); the script exits non-zero if any step failed.
# ---------------------------------------------------------------------------------------------
FAILED=()
SUMMARY=()
run_step() {
    local name=$1 t0 rc
    shift
    section "$name"
    echo "+ $*"
    t0=$(date +%s)
    # run in the background and wait, so that INT/TERM are handled at once (and forwarded)
    "$@" &
    STEP_PID=$!
    rc=0
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    SUMMARY+=("$(printf '%-28s %s (%ss)' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" $(($(date +%s) - t0)))")
    [ $rc = 0 ] || FAILED+=("$name")
    return $rc
}

if [ "${SKYHOLD_TEST_SKIP_LINT:-}" = 1 ]; then
    info "SKYHOLD_TEST_SKIP_LINT=1: skipping cargo fmt and clippy"
else
    run_step "cargo fmt --check" cargo fmt --all -- --check || true
    run_step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings || true
fi

if run_step "cargo build --bins" cargo build --workspace --bins; then
    run_step "cargo nextest run" env NEXTEST_PROFILE=ci \
        cargo nextest run --workspace --no-fail-fast "$@" || true

    # Doc tests: only when some doc comment contains a code block (rustdoc is slow to start).
    if grep -rqsE '^[[:space:]]*(///|//!)[[:space:]]*```' crates/*/src; then
        run_step "cargo test --doc" cargo test --workspace --doc || true
    else
        section "cargo test --doc"
        info "skipped: no code blocks in doc comments"
    fi
else
    info "build failed: skipping tests"
fi

section "summary"
printf '  %s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}" >&2
    exit 1
fi
echo "all steps passed in $(elapsed) s"
