#!/bin/bash
set -u
O=/tmp/m-s7; rm -rf $O; mkdir -p $O
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
cd /work/main
log "building release at $(git rev-parse --short HEAD)"
flock /tmp/cargo-build.lock cargo build --release -p shuffle-bench -p shuffle-server -p shuffle-tests --bins > $O/build.log 2>&1 || { log "build failed"; exit 1; }
rm -rf /tmp/chaos-rel; mkdir -p /tmp/chaos-rel; cp target/release/shuffle-chaos target/release/shuffle-server-e2e /tmp/chaos-rel/
exec 9>/tmp/cargo-build.lock; flock 9
log "W6"
target/release/shuffle-bench failover --seed 20261123 --repeat 3 > $O/w6.txt 2>&1
exec 9>&-
log "chaos 80..160"
SHUFFLE_SERVER_BIN=/tmp/chaos-rel/shuffle-server-e2e /tmp/chaos-rel/shuffle-chaos --cluster --seeds 80..160 --verbose > $O/chaos-80-160.txt 2>&1
log done
