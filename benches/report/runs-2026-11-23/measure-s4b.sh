#!/bin/bash
# Two more rounds of the cluster cells of measure-s4.sh with clients on the
# workers' Unix sockets (the release build measure-s4.sh made), alternating
# 1 and 2 copies.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
O=${O:-/tmp/m-s4}
B=$HERE/../../../target/release/shuffle-bench
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
for round in 2 3; do for m in hash sort hybrid; do for r in 1 2; do
  log "round $round $m auto cluster replication $r"
  $B exchange --mode $m --records 10000000 --repeat 3 --cluster 3 --replication $r --transport auto --json $O/w1.jsonl > $O/w1-$m-auto-r$r-round$round.txt 2>&1
done; done; done
log done
