#!/bin/bash
# L17: job A is a --hydrate-on-read live clone of a slow remote source (every read 2 s): clients
# read 16 unhydrated regions, queueing background hydrations; A is removed with --force at once,
# and job B starts on the SAME destination path from another (local) source and completes. Do A's
# queued hydration workers write A's source into B's finished clone afterwards?
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/srcA 16; mkdata $W/srcB 16
rm -f $W/r.sock; nbdkit -U $W/r.sock -e a -P $W/nk.pid file $W/srcA; sleep 0.3; NK=$(cat $W/nk.pid); PIDS+=($NK)
ldaemon
c start A --source "nbd+unix:///a?socket=$W/r.sock" --dest $W/dst --export --hydrate-on-read --no-hydration >/dev/null || exit 1
kill -9 $NK; sleep 0.2; rm -f $W/r.sock
nbdkit -U $W/r.sock -e a -P $W/nk.pid --filter=delay file $W/srcA rdelay=2; sleep 0.3; PIDS+=($(cat $W/nk.pid))
for k in $(seq 0 15); do timeout 10 nbdsh -u "$(uri A)" -c "h.pread(65536, $k<<20)" >/dev/null 2>&1 & PIDS+=($!); done
sleep 2.5   # the client reads are answered; the background copies have started (2 s each)
t0=$(date +%s.%N); c remove A --force >/dev/null; say "remove A --force rc=$? in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
c start B --source $W/srcB --dest $W/dst --export >/dev/null 2>$W/b.err; rc=$?; say "start B on the same destination: rc=$rc $(head -c 150 $W/b.err)"
if [ $rc = 0 ]; then
  c wait B --timeout 30s -q; say "B: $(state B)"; sleep 8
  cmp -s $W/dst $W/srcB && say "HELD: B's clone intact 8 s later" || { say "DATA LOSS: B's clone changed after completion: $(cmp $W/dst $W/srcB | head -1)"; }
fi
