#!/bin/bash
# Session 3 measurements: build release of HEAD, then W4 max-rate searches
# (2 more each, with and without checkpoints) and W6, then measure2-s3.sh.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
O=${O:-/tmp/m-s3}  # raw output goes here; the files beside this script were copied from it
mkdir -p "$O"
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
log "building release at $(git -C "$HERE" rev-parse --short HEAD)"
cd "$HERE/../../.." && cargo build --release -p shuffle-bench -p shuffle-server > $O/build.log 2>&1 || { log "build failed"; exit 1; }
B=$PWD/target/release/shuffle-bench
sleep 20
for i in 1 2; do for ck in none 1000; do
  extra=""; [ $ck != none ] && extra="--checkpoint-interval-ms $ck"
  log "W4 search $i checkpoints $ck"
  $B stream $extra --repeat 1 --json $O/w4-search.jsonl > $O/w4-search-$i-$ck.txt 2>&1
  grep "W4 " $O/w4-search-$i-$ck.txt | tee -a $O/progress.txt
done; done
log "W6"  # w6-b43a2b3.txt beside this script is this line run again on b43a2b3
$B failover --seed 20261123 --repeat 3 --json $O/w6.jsonl > $O/w6.txt 2>&1
log done; O=$O "$HERE/measure2-s3.sh"
