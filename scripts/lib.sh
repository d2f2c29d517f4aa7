# Shared by scripts/run.sh and scripts/test.sh: a fresh Debian machine to a
# ready .venv. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELAYD_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# Install Debian packages that are not installed yet (root or sudo).
need_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing Debian packages: ${missing[*]}"
    # Packages such as tinyproxy or haproxy would start system daemons on
    # install; the tests start their own instances on loopback, so forbid it.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && made_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -n "$made_policy" ] && $sudo rm -f "$policy"
    return 0
}

# setup_npm DIR: the npm packages of DIR's package-lock.json, exactly (npm
# ci), unless they are installed from that very lock file already.
setup_npm() {
    local dir="$ROOT/$1" stamp sum
    stamp="$dir/node_modules/.relayd-lock.sha256"
    sum="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && return 0
    log "installing the npm packages of $1"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$sum" > "$stamp"
}

pick_python() {
    local c
    for c in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

# Create .venv and install relayd into it (editable: the Cython build runs
# and any compile error stops here). $1 = "test" adds the test extras.
setup_venv() {
    local extras="${1:-}" python
    command -v cc >/dev/null || need_debs build-essential
    python="$(pick_python)" || { need_debs python3 python3-venv python3-dev; python="$(pick_python)"; }
    if [ ! -x "$PY" ]; then
        log "creating $VENV with $python"
        "$python" -m venv "$VENV" 2>/dev/null || { need_debs python3-venv python3-dev; rm -rf "$VENV"; "$python" -m venv "$VENV"; }
    fi
    "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || need_debs python3-dev
    log "installing relayd (compiling the Cython core)"
    # Exact versions from requirements.lock, for the build environment too.
    export PIP_CONSTRAINT="$ROOT/requirements.lock"
    "$PY" -m pip install -q --upgrade pip setuptools wheel cython >/dev/null
    if [ "$extras" = test ]; then
        "$PY" -m pip install -q -e ".[test]"
    else
        "$PY" -m pip install -q -e .
    fi
    unset PIP_CONSTRAINT
}
