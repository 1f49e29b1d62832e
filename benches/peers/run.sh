#!/usr/bin/env bash
# Runs the standard workloads (shared/WORKLOADS.md) on the peer systems,
# Apache Spark and Apache Flink, on this machine.
#
#   benches/peers/run.sh [--quick] [--out FILE] [--repeat K] [--only spark|flink] [--workloads LIST]
#
#   --quick          sizes divided by 10 (W4: 3 s measured after 1 s warm-up)
#   --out FILE       JSON lines are appended here (default target/peers/peers.jsonl)
#   --repeat K       measured runs per workload and mode (default 3), after one unmeasured warm-up run
#   --only SYSTEM    spark or flink only
#   --workloads L    comma-separated subset of exchange,groupby,sort,stream
#
# One JSON object per (system, workload, mode) is appended to FILE; a
# human-readable table of this run is printed at the end. A run that fails
# its verification prints no figure: its line says "verified": false.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PEERS=$ROOT/target/peers

QUICK=0
OUT=$PEERS/peers.jsonl
REPEAT=3
ONLY=""
WORKLOADS="exchange,groupby,sort,stream"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --workloads) WORKLOADS=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

START=$(date +%s)
"$HERE/install.sh" || { echo "install.sh failed" >&2; exit 1; }
# shellcheck source=/dev/null
source "$PEERS/env.sh"

SCALE=1
[[ $QUICK -eq 1 ]] && SCALE=10
W1_N=$((10000000 / SCALE))
W2_N=$((20000000 / SCALE))
W2_K=1000000
W3_N=$((10000000 / SCALE))
W4_SECONDS=$((30 / SCALE))
W4_WARMUP=$((5 / (SCALE < 5 ? SCALE : 5)))
HEAP=${PEERS_HEAP:-6g}

LOGS=$PEERS/logs
TMP=$PEERS/tmp
mkdir -p "$LOGS" "$TMP"
LABEL="run-$(date -u +%Y%m%dT%H%M%SZ)$([[ $QUICK -eq 1 ]] && echo -quick)"
LINES_BEFORE=$( [[ -f "$OUT" ]] && wc -l <"$OUT" || echo 0 )
export SPARK_LOCAL_IP=127.0.0.1
FAILED=0

wanted() { [[ ",$WORKLOADS," == *",$1,"* ]]; }

# run_one SYSTEM WORKLOAD MODE RECORDS MAPS PARTITIONS KEYS -- program args...
run_one() {
    local system=$1 workload=$2 mode=$3 records=$4 maps=$5 partitions=$6 keys=$7
    shift 8
    local log=$LOGS/$system-$workload-$mode.log
    echo "== $system $workload ($mode) ... log: ${log#"$ROOT"/}"
    rm -rf "$TMP" && mkdir -p "$TMP" # spill and shuffle files of the previous program
    # The program appends its JSON line to $OUT itself, only when every run verified.
    "$PEERS_JAVA" -Xmx"$HEAP" $PEERS_JVM_OPTS "$@" --out "$OUT" --label "$LABEL" 2>&1 >/dev/null |
        tee "$log" | grep --line-buffered -E "run [0-9]|warm-up|flink stream|VERIFICATION|Exception:" | sed 's/^/   /'
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        FAILED=$((FAILED + 1))
        echo "   FAILED (exit $rc): no figure recorded; see $log"
        printf '{"system": "%s", "workload": "%s", "mode": "%s", "records": %s, "maps": %s, "partitions": %s, "keys": %s, "seconds": [], "median_seconds": null, "verified": false, "error": "exit code %s, see %s", "label": "%s"}\n' \
            "$system" "$workload" "$mode" "$records" "$maps" "$partitions" "$keys" "$rc" "${log#"$ROOT"/}" "$LABEL" >>"$OUT"
    fi
}

COMMON=(--repeat "$REPEAT" --warmup-runs 1 --seed 42)

if [[ -z "$ONLY" || "$ONLY" == spark ]]; then
    SPARK=(-cp "$PEERS_SPARK_CP" peers.spark.SparkPeer --local-dir "$TMP/spark" "${COMMON[@]}")
    wanted exchange && run_one spark exchange sort-shuffle "$W1_N" 4 16 null -- \
        "${SPARK[@]}" --workload exchange --records "$W1_N" --maps 4 --partitions 16
    wanted groupby && run_one spark groupby sort-shuffle "$W2_N" 4 16 "$W2_K" -- \
        "${SPARK[@]}" --workload groupby --records "$W2_N" --keys "$W2_K" --maps 4 --partitions 16
    wanted sort && run_one spark sort sort-shuffle "$W3_N" 4 16 null -- \
        "${SPARK[@]}" --workload sort --records "$W3_N" --maps 4 --partitions 16
fi

if [[ -z "$ONLY" || "$ONLY" == flink ]]; then
    FLINK=(-cp "$PEERS_FLINK_CP" peers.flink.FlinkPeer --tmp-dir "$TMP/flink")
    for mode in blocking hybrid-full hybrid-selective streaming; do
        wanted exchange && run_one flink exchange "$mode" "$W1_N" 4 16 null -- \
            "${FLINK[@]}" "${COMMON[@]}" --mode "$mode" --workload exchange --records "$W1_N" --maps 4 --partitions 16
        wanted groupby && run_one flink groupby "$mode" "$W2_N" 4 16 "$W2_K" -- \
            "${FLINK[@]}" "${COMMON[@]}" --mode "$mode" --workload groupby --records "$W2_N" --keys "$W2_K" \
            --maps 4 --partitions 16
        wanted sort && run_one flink sort "$mode" "$W3_N" 4 16 null -- \
            "${FLINK[@]}" "${COMMON[@]}" --mode "$mode" --workload sort --records "$W3_N" --maps 4 --partitions 16
    done
    if wanted stream; then
        for bt in 100 1; do
            mode=streaming
            [[ $bt -ne 100 ]] && mode=streaming-${bt}ms
            run_one flink stream "$mode" 0 2 4 100000 -- \
                "${FLINK[@]}" --workload stream --seed 42 --keys 100000 --maps 2 --partitions 4 \
                --buffer-timeout-ms "$bt" --seconds "$W4_SECONDS" --warmup-seconds "$W4_WARMUP"
        done
    fi
fi

ELAPSED=$(($(date +%s) - START))
echo
"$PEERS_PYTHON" "$HERE/table.py" "$OUT" "$LINES_BEFORE"
echo
echo "results appended to ${OUT#"$ROOT"/} (label $LABEL); whole run took ${ELAPSED} s ($((ELAPSED / 60)) min $((ELAPSED % 60)) s)"
[[ $FAILED -eq 0 ]] || { echo "$FAILED run(s) failed"; exit 1; }
