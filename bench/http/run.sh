#!/usr/bin/env bash
# HTTP ingress against nginx and the back end directly (see run.py).
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
cd "$ROOT"
need_debs nginx-light wrk curl openssl
[ -x "$VENV/bin/relayd" ] || setup_venv
exec "$PY" "$ROOT/bench/http/run.py" "$@"
