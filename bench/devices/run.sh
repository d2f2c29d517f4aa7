#!/usr/bin/env bash
# The device cloud on one relay node (see run.py): --quick, or 10,000 devices.
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
cd "$ROOT"
need_debs nginx-light wrk
[ -x "$VENV/bin/relayd" ] || setup_venv test
exec "$PY" "$ROOT/bench/devices/run.py" "$@"
