#!/usr/bin/env bash
# Quick A/B of relayd alone (no peers): conn/s, 64-byte round trips and one
# iperf3 stream through a fresh relay + agent on loopback. For iterating on a
# change; the side-by-side numbers come from run.sh. Needs iperf3 and the Go
# tools (built offline into bench/results/bin on first use).
#   TRANSPORT=wss bash bench/tunnel/quick.sh   # the agent link as WebSocket over TLS
set -euo pipefail
TRANSPORT="${TRANSPORT:-tls}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"; R="$ROOT/.venv/bin/relayd"
BIN="$ROOT/bench/results/bin"
[ -x "$BIN/rr" ] || "$PY" -c "import sys, pathlib; sys.path.insert(0, '$ROOT/bench/tunnel'); import gobuild; gobuild.build(pathlib.Path('$BIN'), pathlib.Path('$ROOT/bench/results/.gocache'))"
T=$(mktemp -d)
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AG=$(port); PUB=$(port); ECHO=$(port); IP=$(port); HTTPS=$(port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
"$BIN/rr" -mode echo -listen 127.0.0.1:$ECHO > "$T/echo.log" 2>&1 & pids+=($!)
"$R" serve --data "$T/r" --agents 127.0.0.1:$AG --https 127.0.0.1:$HTTPS --tcp bench=127.0.0.1:$PUB > "$T/relay.log" 2>&1 & pids+=($!)
sleep 1.5
TOKEN=$("$R" admin join-token --data "$T/r" --endpoint bench --transport "$TRANSPORT")
echo "agent link: $TRANSPORT"
"$R" agent --join "$TOKEN" --transport "$TRANSPORT" --data "$T/a" --endpoint bench=127.0.0.1:$ECHO > "$T/agent.log" 2>&1 & AP=$!; pids+=($AP)
sleep 1.5
"$BIN/rr" -mode connect -addr 127.0.0.1:$PUB -duration 5s -c 16
"$BIN/rr" -mode rr -addr 127.0.0.1:$PUB -n 20000
iperf3 -s -p $IP -1 -D; sleep 0.3
kill $AP; sleep 0.3
"$R" agent --transport "$TRANSPORT" --data "$T/a" --endpoint bench=127.0.0.1:$IP > "$T/agent2.log" 2>&1 & pids+=($!)
sleep 1.5
iperf3 -c 127.0.0.1 -p $PUB -t 4 -J | "$PY" -c "import json,sys; d=json.load(sys.stdin); print('iperf3 1 stream:', round(d['end']['sum_received']['bits_per_second']/1e9, 2), 'Gbit/s')"
