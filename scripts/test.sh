#!/usr/bin/env bash
# Quickstart 2: set up and run the whole test suite.
#
#  1. Debian packages the tests need (Go and hashicorp/yamux for the interop
#     tests, tinyproxy for the forward-proxy tests, Node.js for Microsoft's
#     hybrid-connection clients and the OpenID Connect provider), a .venv
#     with relayd built from source and the test tools, and the npm packages
#     at the versions of tests/interop/hyco/package-lock.json (Microsoft's
#     clients) and tests/interop/oidc/package-lock.json (oidc-provider).
#  2. The suite against the compiled build.
#  3. The suite against the pure-Python twins (RELAYD_NO_EXTENSIONS=1).
#  4. The core tests against a debug build (bounds checks, C asserts, -O0),
#     then the optimised build is restored.
#  5. The short benchmark (bench/ci.py, about 2 minutes): relayd against the
#     Go tunnel, HAProxy and nginx in one run; fails only when a ratio falls
#     below its floor in bench/floors.toml. JSON in bench/results/ci.json.
# Fails when any run fails or when a run collected no test. Extra args go to
# every pytest run (e.g. -x, -k yamux).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
need_debs golang-go golang-github-hashicorp-yamux-dev tinyproxy wrk curl openssl nodejs \
    strongswan-pki libstrongswan-extra-plugins libstrongswan-standard-plugins \
    redis-server \
    pebble  # EST clients; the Redis event bus (docs/device-cloud.md); ACME's test server (docs/acme.md)
command -v npm >/dev/null || need_debs npm
need_debs prometheus systemd  # Prometheus, promtool and systemd-analyze for configs/ (docs/operations.md)
need_debs podman runc debootstrap  # the container image's test (tests/ops/test_container.py)
need_debs iperf3 haproxy nginx-light  # the short benchmark's peers (bench/ci.py)
need_debs chromium chromium-driver libnss3-tools  # the web console in a browser (tests/ops/test_console_browser.py)
if [ "${RELAYD_ARM64:-}" = 1 ]; then need_debs qemu-user-static binfmt-support; fi  # tests/ops/test_arm64.py (docs/arm64.md)
setup_venv test
setup_npm tests/interop/hyco
setup_npm tests/interop/oidc

run_pytest() {
    local label="$1"; shift
    log "pytest: $label"
    set +e
    "$PY" -m pytest "$@"
    local rc=$?
    set -e
    if [ $rc -eq 5 ]; then
        echo "FAIL: $label collected no tests" >&2; exit 1
    elif [ $rc -ne 0 ]; then
        echo "FAIL: $label (pytest exit $rc)" >&2; exit $rc
    fi
}

"$VENV/bin/relayd" version
run_pytest "compiled build" -p no:cacheprovider --durations=15 "$@"
# Tests marked "once" (operations: the image, ACME, the console...) do not depend on the build.
RELAYD_NO_EXTENSIONS=1 run_pytest "pure-Python twins (RELAYD_NO_EXTENSIONS=1)" -p no:cacheprovider --durations=15 \
    -m "not once" "$@"

log "debug build of the extensions"
RELAYD_DEBUG_BUILD=1 "$PY" setup.py -q build_ext --inplace --force >/dev/null 2>&1 \
    || { RELAYD_DEBUG_BUILD=1 "$PY" setup.py build_ext --inplace --force; exit 1; }
run_pytest "debug build: core and HTTP ingress" -p no:cacheprovider tests/core tests/net/test_http_ingress.py tests/net/test_http_hostile.py "$@"
log "restoring the optimised build"
"$PY" setup.py -q build_ext --inplace --force >/dev/null 2>&1 || { "$PY" setup.py build_ext --inplace --force; exit 1; }
log "all test runs passed"
log "short benchmark: ratios against peers in the same run, floors in bench/floors.toml"
"$PY" bench/ci.py --out bench/results/ci.json
