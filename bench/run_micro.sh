#!/usr/bin/env bash
# Microbenchmarks of the yamux core (compiled vs pure), pinned to one core.
# Writes bench/results/micro.json and prints the markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
mkdir -p bench/results
taskset -c 1 "$PY" -m pytest bench/test_micro.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-min-rounds=20 --benchmark-json=bench/results/micro.json "$@"
"$PY" bench/report_micro.py bench/results/micro.json
