#!/bin/bash
# W6 and a span of cluster fault-suite seeds on the code at HEAD (release).
# Run as SEEDS=0..80 O=/tmp/m-s6 (on 5a94107) and SEEDS=80..160 O=/tmp/m-s7
# (on 0e57f43; its seeds 160..320 ran by hand with the same command).
set -u
SEEDS=${SEEDS:-0..80}
O=${O:-/tmp/m-s6}; rm -rf $O; mkdir -p $O  # raw output goes here; the files beside this script were copied from it
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a $O/progress.txt; }
cd "$(dirname "$0")/../../.."
log "building release at $(git rev-parse --short HEAD)"
flock /tmp/cargo-build.lock cargo build --release -p shuffle-bench -p shuffle-server -p shuffle-tests --bins > $O/build.log 2>&1 || { log "build failed"; exit 1; }
# The fault suite runs from copies, so that a build cannot replace them under it.
rm -rf /tmp/chaos-rel; mkdir -p /tmp/chaos-rel; cp target/release/shuffle-chaos target/release/shuffle-server-e2e /tmp/chaos-rel/
exec 9>/tmp/cargo-build.lock; flock 9  # no build while measuring
log "W6"
target/release/shuffle-bench failover --seed 20261123 --repeat 3 > $O/w6.txt 2>&1
exec 9>&-
log "chaos $SEEDS"
SHUFFLE_SERVER_BIN=/tmp/chaos-rel/shuffle-server-e2e /tmp/chaos-rel/shuffle-chaos --cluster --seeds $SEEDS --verbose > $O/chaos-${SEEDS/../-}.txt 2>&1
log done
