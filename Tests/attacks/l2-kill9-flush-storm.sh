#!/bin/bash
# L2: 8 connections write tagged blocks (partial-region 4K writes interleaved across connections,
# and whole-region writes) with FLUSHes, while the copier hydrates (rate limited) with
# --discard-source; hydrationd is killed with SIGKILL mid-storm (ROUNDS times, at random moments).
# After each restart every write replied to before a replied FLUSH must read back.
set -u; . "$(dirname "$0")/lib-live.sh"
N=${N:-8}; ROUNDS=${ROUNDS:-3}; MB=${MB:-64}
mkdata $W/src $MB; cp $W/src $W/src.orig
ldaemon
c start j --source $W/src --dest $W/dst --export --discard-source --rate-limit ${RATE:-8M} >/dev/null
verdict=HELD
for r in $(seq $ROUNDS); do
  WP=()
  for i in $(seq 0 $((N-1))); do
    python3 "$(dirname "$0")/py/flushstorm.py" "$(uri j)" $i $N $W/log.$i $r 2>>$W/writers.err & WP+=($!); PIDS+=($!)
  done
  sleep $(python3 -c "import random; print(round(random.uniform(1.0, 4.0),2))")
  say "round $r: $(state j); kill -9"
  kill9
  for p in "${WP[@]}"; do wait $p 2>/dev/null; done
  ldaemon
  say "round $r restarted: $(state j)"
  nbdcopy "$(uri j)" $W/img || { say "read back failed"; verdict="FAILED"; break; }
  python3 "$(dirname "$0")/py/flushcheck.py" $W/img $W/src.orig $N $(for i in $(seq 0 $((N-1))); do echo $W/log.$i; done) || verdict="DATA LOSS"
done
tail -3 $W/writers.err
c set j --rate-limit 0 >/dev/null; c wait j --timeout 120s -q; say "final: $(state j)"
cmp -s $W/dst $W/img || { nbdcopy "$(uri j)" $W/img2; cmp -s $W/dst $W/img2 && say "dest equals export" || say "LIE: dest differs from what the export serves"; }
say "$verdict"
