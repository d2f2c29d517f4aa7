#!/usr/bin/env bash
# Quickstart 1: set up and run relayd's main job on embedded defaults.
# Today: a yamux session over a real loopback socket with an echo service
# behind it, data streamed through and checked. Extra args go to `relayd demo`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
setup_venv
"$VENV/bin/relayd" demo "$@"
