#!/usr/bin/env bash
# Side-by-side TCP path benchmark (direct, HAProxy, Go yamux tunnel, relayd
# compiled and pure). Installs the Debian packages it needs if missing, sets
# up the project's .venv if missing (scripts/lib.sh), then runs run.py with
# it; every argument is passed through, e.g.
#   bash bench/tunnel/run.sh --seconds 5 --out bench/results/tunnel.json
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
cd "$ROOT"
# iperf3's postinst asks whether to start a system daemon: answer no.
if ! dpkg-query -W -f='${Status}' iperf3 2>/dev/null | grep -q "install ok installed"; then
    echo "iperf3 iperf3/start_daemon boolean false" | { [ "$(id -u)" = 0 ] && debconf-set-selections || sudo debconf-set-selections; } 2>/dev/null || true
fi
need_debs iperf3 haproxy golang-go golang-github-hashicorp-yamux-dev
{ [ -x "$VENV/bin/relayd" ] && "$PY" -c 'import relayd, cryptography' 2>/dev/null; } || setup_venv
exec "$PY" "$ROOT/bench/tunnel/run.py" --relayd "$VENV/bin/relayd" "$@"
