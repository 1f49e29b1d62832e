#!/bin/bash
# Engine per-record work, before (a release build of 489cb3c) and after (53681e1), alternating;
# two rounds of --repeat 3 per cell. Output: engine-489cb3c-vs-53681e1.txt.
rm -f /tmp/e11-before.json /tmp/e11-after.json
for round in 1 2; do
for w in "exchange --mode hash" "sort"; do
  for via in engine client; do
    for b in before after; do
      flock /tmp/cargo-build.lock /tmp/e11-$b-bench $w --records 10000000 --via $via --repeat 3 --json /tmp/e11-$b.json 2>&1 | grep -E "^\| (exchange|sort) " | sed "s/^/$b /"
    done
  done
done
done
