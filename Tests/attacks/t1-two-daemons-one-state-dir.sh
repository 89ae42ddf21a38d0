#!/bin/bash
# T1: nothing stops a second hydrationd on the same state directory (e.g. a manual
# `hydrationd` as root next to the systemd one: both default to the same state dir). The second
# restores every job, opening its metadata READ-WRITE (recovery rewrites the superblock, may
# write a recovery superblock) while the first daemon is committing to it.
set -u; . "$(dirname "$0")/lib.sh"
mkdata $W/src.img 128; cp $W/src.img $W/src.orig
daemon
c start j1 --source $W/src.img --dest $W/dst.img --discard-source --rate-limit 32M --commit-interval 20ms --region-size 4K >/dev/null
sleep 0.5
for i in $(seq 12); do
  $BIN/hydrationd --state-dir $ST --socket $W/s2.sock >>$W/d2.log 2>&1 & P2=$!; PIDS+=($P2)
  for k in $(seq 30); do [ -S $W/s2.sock ] && break; sleep 0.05; done
  $BIN/clonectl --socket $W/s2.sock list 2>&1 | tail -1 | sed 's/^/   second daemon sees: /'
  kill -9 $P2; wait $P2 2>/dev/null; rm -f $W/s2.sock
done
say "first daemon: $(state j1)"
c wait j1 --timeout 60s -q; say "first daemon: $(state j1)"
$BIN/clonectl check $ST/jobs/j1.meta; echo "check rc=$?"
stopd; daemon; say "after restart of the first: $(state j1)"
if cmp -s $W/dst.img $W/src.orig; then say "HELD (clone ok)"; else say "DATA LOSS: $(cmp $W/dst.img $W/src.orig|head -1)"; fi
grep -i "error\|warn" $W/daemon.log | head -5
