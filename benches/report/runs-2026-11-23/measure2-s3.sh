#!/bin/bash
# W1 over QUIC against the daemon, against the QUIC baselines of the same run, and a profile of one run.
set -u
O=${O:-/tmp/m-s3}  # raw output goes here; the files beside this script were copied from it
B=$(cd "$(dirname "$0")/../../.." && pwd)/target/release/shuffle-bench
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
log "W1 QUIC daemon with baseline"
$B exchange --mode hash --records 10000000 --repeat 3 --server daemon --transport quic --baseline --json $O/w1-quic.jsonl > $O/w1-quic.txt 2>&1
log "perf of one W1 QUIC daemon run"
perf record -a -F 499 -o $O/perf-w1-quic.data -- $B exchange --mode hash --records 10000000 --repeat 1 --server daemon --transport quic > $O/perf-run.txt 2>&1
perf report -i $O/perf-w1-quic.data --no-children --sort comm,dso,symbol --stdio 2>/dev/null | head -80 > $O/perf-w1-quic-symbols.txt
perf report -i $O/perf-w1-quic.data --no-children --sort comm --stdio 2>/dev/null | head -30 > $O/perf-w1-quic-comm.txt
log done2
