#!/usr/bin/env bash
# A/B of two relayd trees on iperf3 alone, alternating: each round starts a
# fresh relay + agent from tree A, runs iperf3 -c for each -P in STREAMS, then
# the same from tree B (the order flips every round, so drift hits both
# alike). A tree is a checkout with its extensions built in place (e.g. a
# `git worktree add /tmp/before REV` + `setup.py build_ext --inplace`); it is
# selected with PYTHONPATH. Prints Gbit/s (received) and peak RSS (VmHWM) of
# relay and agent per run, then the medians.
#   bash bench/tunnel/ab.sh /tmp/before /tmp/after 5 "1 8"
set -euo pipefail
A=$1; B=$2; ROUNDS=${3:-5}; STREAMS=${4:-"1 8"}; SECONDS_=${SECONDS_:-5}
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"; R="$ROOT/.venv/bin/relayd"
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$1/status; }
OUT=$(mktemp)
one() {  # tree label
    local T; T=$(mktemp -d); local AG PUB IP; AG=$(port); PUB=$(port); IP=$(port)
    iperf3 -s -p "$IP" -B 127.0.0.1 > "$T/iperf.log" 2>&1 & local IPS=$!
    PYTHONPATH=$1 "$R" serve --data "$T/r" --agents 127.0.0.1:$AG --tcp bench=127.0.0.1:$PUB > "$T/relay.log" 2>&1 & local RP=$!
    for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$AG) 2>/dev/null && break; sleep 0.2; done
    local TOKEN; TOKEN=$(PYTHONPATH=$1 "$R" admin join-token --data "$T/r" --endpoint bench --ttl 15m)
    PYTHONPATH=$1 "$R" agent --join "$TOKEN" --data "$T/a" --endpoint bench=127.0.0.1:$IP > "$T/agent.log" 2>&1 & local AP=$!
    sleep 3
    for p in $STREAMS; do
        echo 5 > /proc/$RP/clear_refs; echo 5 > /proc/$AP/clear_refs
        local g; g=$(iperf3 -c 127.0.0.1 -p "$PUB" -t "$SECONDS_" -P "$p" -J | "$PY" -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')
        echo "$2 P$p $g Gbit/s relay $(hwm $RP) agent $(hwm $AP) MiB" | tee -a "$OUT"
        sleep 1
    done
    kill $AP $RP $IPS; wait $AP $RP $IPS 2>/dev/null || true; rm -rf "$T"
}
for i in $(seq "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then one "$A" A; one "$B" B; else one "$B" B; one "$A" A; fi
done
"$PY" - "$OUT" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    tree, p, g = line.split()[:3]
    runs.setdefault((p, tree), []).append(float(g))
for (p, tree), gs in sorted(runs.items()):
    print(f"{p} {tree}: median {statistics.median(gs):.2f} Gbit/s of {len(gs)} ({', '.join(f'{g:.2f}' for g in gs)})")
EOF
rm -f "$OUT"
