#!/bin/bash
# Measurements of the final code on a quiet machine (no builds, no other runs).
set -u
B=/work/main/target/release/shuffle-bench
O=/work/notes/m-final
cd /work/main
log() { echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
log start
# Cluster: W1 10M, standalone daemon vs 3 workers with 1 and 2 copies, over QUIC and the default (Unix socket on this host)
for t in quic auto; do
  for mode in hash sort hybrid; do
    log "cluster $t $mode"
    $B exchange --mode $mode --records 10000000 --repeat 3 --server daemon --transport $t --json $O/cluster.jsonl 2>&1 | tail -1 | tee -a $O/cluster.txt
    for r in 1 2; do
      $B exchange --mode $mode --records 10000000 --repeat 3 --cluster 3 --replication $r --transport $t --json $O/cluster.jsonl 2>&1 | tail -1 | tee -a $O/cluster.txt
    done
  done
done
# W4 checkpoint overhead at a fixed rate, WORKLOADS.md's length (5 s + 30 s), median of 3
for ck in none 1000; do
  log "W4 checkpoints $ck"
  extra=""; [ $ck != none ] && extra="--checkpoint-interval-ms $ck"
  $B stream --rate 1000000 --seconds 30 --warmup 5 --repeat 3 $extra --json $O/w4.jsonl 2>&1 | tail -3 | tee -a $O/w4.txt
done
log "suite"
$B suite --report benches/report ${SUITE_PEERS:---peers-file target/peers/peers.jsonl} > $O/suite.txt 2>&1
log done
