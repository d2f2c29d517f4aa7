#!/usr/bin/env bash
# Coverage-guided fuzzing of relayd's parsers with atheris (docs/fuzzing.md).
#
#   bash fuzz/run.sh --short                 each harness for a fixed number of runs from the
#                                            committed seeds, fixed seed: what CI runs
#   bash fuzz/run.sh --long [SECONDS]        each harness for SECONDS (default 3600), growing
#                                            its working corpus in fuzz/.work/<harness>/
#   bash fuzz/run.sh --short yamux preamble  only the harnesses named
#   bash fuzz/run.sh --long 600 -- -workers=2 -jobs=2   libFuzzer options after --
#
# Harnesses: yamux wsframe wsconn http_request http_response preamble http1 hcwire jws est ztsession
# policy ippacket usertoken acme tlshello. With RELAYD_NO_EXTENSIONS=1 the pure twins are fuzzed alone (no compiled oracle).
# Exits 1 if any harness finds a crash: the input is in fuzz/artifacts/<harness>/
# (replay it with `python fuzz/fuzz_<harness>.py FILE`), the log beside it.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
ALL=(yamux wsframe wsconn http_request http_response preamble http1 hcwire jws est ztsession policy ippacket usertoken
     acme tlshello)

# Runs per harness in --short: about 5-15 s each on one core with both builds.
declare -A SHORT_RUNS=([yamux]=30000 [wsframe]=40000 [wsconn]=20000 [http_request]=20000 [http_response]=15000 [preamble]=30000 [http1]=30000 [hcwire]=30000 [jws]=20000 [est]=60000 [ztsession]=200000 [policy]=80000 [ippacket]=40000 [usertoken]=40000
                   [acme]=40000 [tlshello]=25000)

mode="${1:-}"
shift || true
seconds=3600
if [ "$mode" = --long ] && [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    seconds="$1"; shift
fi
case "$mode" in
    --short|--long) ;;
    *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
harnesses=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    [[ " ${ALL[*]} " == *" $1 "* ]] || { echo "fuzz/run.sh: no harness '$1' (${ALL[*]})" >&2; exit 2; }
    harnesses+=("$1"); shift
done
[ "${1:-}" = -- ] && shift
extra=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=("${ALL[@]}")

"$PY" -c 'import atheris' 2>/dev/null || {
    echo "fuzz/run.sh: atheris is not installed for $PY (pip install -e '.[test]')" >&2; exit 2; }
build=$("$PY" -c 'from relayd._build import extensions_disabled as d; print("pure twin alone (RELAYD_NO_EXTENSIONS=1)" if d() else "compiled against pure")')
echo "fuzz: $mode, $build, python $("$PY" -c 'import platform; print(platform.python_version())')"

scratch=""
trap '[ -n "$scratch" ] && rm -rf "$scratch"' EXIT
if [ "$mode" = --short ]; then
    scratch="$(mktemp -d)"
    # Same inputs, same order, same outcome on every run.
    export PYTHONHASHSEED=0
fi

failed=()
for h in "${harnesses[@]}"; do
    art="$ROOT/fuzz/artifacts/$h"
    mkdir -p "$art"
    log="$art/last-${mode#--}.log"
    if [ "$mode" = --short ]; then
        work="$scratch/$h"
        opts=(-runs="${SHORT_RUNS[$h]}" -seed=1 -max_total_time=60)
    else
        work="$ROOT/fuzz/.work/$h"
        opts=(-max_total_time="$seconds" -use_value_profile=1)
    fi
    mkdir -p "$work"
    dict=()
    [ -f "$ROOT/fuzz/dict/$h.dict" ] && dict=(-dict="$ROOT/fuzz/dict/$h.dict")
    start=$(date +%s)
    # libFuzzer writes new inputs to the first directory only: the
    # committed seeds (the second) are read, never changed.
    "$PY" "$ROOT/fuzz/fuzz_$h.py" "${opts[@]}" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$art/" "${dict[@]}" "${extra[@]}" "$work" "$ROOT/fuzz/corpus/$h" \
        >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    if [ $rc -eq 0 ]; then
        printf 'fuzz: %-14s ok     %7s runs %6s exec/s %4ss\n' "$h" "${runs:-?}" "${speed:-?}" "$took"
    else
        failed+=("$h")
        printf 'fuzz: %-14s FAILED (exit %s) after %ss; log %s\n' "$h" "$rc" "$took" "$log"
        grep -E -A40 '^=== Uncaught Python exception|^==[0-9]+== ERROR' "$log" | head -60
        grep -E '^(Test unit written to|artifact_prefix)' "$log"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: no crash"
