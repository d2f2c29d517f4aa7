#!/usr/bin/env bash
# Hybrid connections side by side (see run.py). Needs root (the npm clients
# hard-code port 443), nginx-light, wrk, curl and node with the npm clients.
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
cd "$ROOT"
need_debs nginx-light wrk curl nodejs
[ -x "$VENV/bin/relayd" ] || setup_venv test
setup_npm tests/interop/hyco
exec "$PY" "$ROOT/bench/hybrid/run.py" "$@"
