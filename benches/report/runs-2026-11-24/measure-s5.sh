#!/bin/bash
# Cluster W1 (10M) with 1 and 2 copies beside a standalone daemon (clients
# on the workers' Unix sockets, then over QUIC), and W6, on the code of the
# partition fault and its fixes. Medians of --repeat 3.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
O=${O:-/tmp/m-s5}  # raw output goes here; the files beside this script were copied from it
mkdir -p "$O"
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
cd "$HERE/../../.."
log "building release at $(git rev-parse --short HEAD)"
flock /tmp/cargo-build.lock cargo build --release -p shuffle-bench -p shuffle-server > $O/build.log 2>&1 || { log "build failed"; exit 1; }
B=$PWD/target/release/shuffle-bench
sleep 10
exec 9>/tmp/cargo-build.lock; flock 9  # no build while measuring
for t in auto quic; do for m in hash sort hybrid; do
  log "$m $t daemon"
  $B exchange --mode $m --records 10000000 --repeat 3 --server daemon --transport $t --json $O/w1.jsonl > $O/w1-$m-$t-daemon.txt 2>&1
  for r in 1 2; do
    log "$m $t cluster replication $r"
    $B exchange --mode $m --records 10000000 --repeat 3 --cluster 3 --replication $r --transport $t --json $O/w1.jsonl > $O/w1-$m-$t-r$r.txt 2>&1
  done
done; done
log "W6"
$B failover --seed 20261123 --repeat 3 > $O/w6.txt 2>&1
log done
