#!/usr/bin/env bash
# Microbenchmarks of the yamux core (compiled vs pure), pinned to one core.
# Sets up .venv with the test tools if needed, writes
# bench/results/micro.json and prints the markdown table for RESULTS.md.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"
"$PY" -c 'import pytest_benchmark, relayd.core._yamux_c' 2>/dev/null || setup_venv test
mkdir -p bench/results
taskset -c 1 "$PY" -m pytest bench/test_micro.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-min-rounds=20 --benchmark-json=bench/results/micro.json "$@"
"$PY" bench/report_micro.py bench/results/micro.json
