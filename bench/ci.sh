#!/usr/bin/env bash
# CI's short benchmark (see ci.py): relayd against the Go tunnel, HAProxy and
# nginx in one run, judged only by ratios against the floors of
# bench/floors.toml. Installs the Debian packages it needs if missing, sets
# up the project's .venv if missing, then runs ci.py with every argument:
#   bash bench/ci.sh                      # JSON in bench/results/ci.json
#   bash bench/ci.sh --rounds 9 --out /tmp/ci.json
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"
need_debs iperf3 haproxy nginx-light wrk curl golang-go golang-github-hashicorp-yamux-dev
{ [ -x "$VENV/bin/relayd" ] && "$PY" -c 'import relayd, websockets' 2>/dev/null; } || setup_venv test
exec "$PY" "$ROOT/bench/ci.py" "$@"
