#!/bin/bash
B=/work/main/target/release/shuffle-bench
O=/work/notes/m-final
for i in 1 2 3; do for ck in none 1000; do
  extra=""; [ $ck != none ] && extra="--checkpoint-interval-ms $ck"
  echo "== run $i checkpoints $ck load $(cut -d' ' -f1 /proc/loadavg)" >> $O/w4-3.txt
  $B stream --rate 1000000 --seconds 30 --warmup 5 $extra --json $O/w4-3.jsonl 2>&1 | grep "W4 " >> $O/w4-3.txt
done; done
