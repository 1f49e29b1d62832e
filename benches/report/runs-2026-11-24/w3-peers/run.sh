#!/bin/bash
exec 9>/tmp/cargo-build.lock; flock 9
cd /work/main
for r in 1 2; do
  echo "flink round $r start $(date -u +%H:%M:%S)"
  benches/peers/run.sh --only flink --workloads sort --out /tmp/w3/peers/peers.jsonl > /tmp/w3/peers/flink-round-$r.txt 2>&1
  echo "ours round $r start $(date -u +%H:%M:%S)"
  { /tmp/w3/head sort --mode sort --via client --repeat 3; /tmp/w3/head sort --via engine --repeat 3; } > /tmp/w3/peers/ours-round-$r.txt 2>&1
done
echo "end $(date -u +%H:%M:%S)"
