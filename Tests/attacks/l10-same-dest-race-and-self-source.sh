#!/bin/bash
# L10: (1) two `clonectl start --export` racing for one destination (same path x20, then a path
# and a loop device over it); exactly one may win. (2) a job whose REMOTE source is the daemon's
# own NBD export of another job (nbd+unix:///j?socket=<own nbd.sock>), still hydrating, with a
# client writing to j: does the daemon deadlock on itself, does k get j's view?
# (3) a job whose destination is j's source reached through j's export URI is impossible; but a
# job whose destination is j's SOURCE path must be refused.
set -u; . "$(dirname "$0")/lib-live.sh"
mkdata $W/src 16; cp $W/src $W/src.orig; cp $W/src $W/src2
ldaemon
both=0
for t in $(seq 20); do
  c start a$t --source $W/src --dest $W/dst$t --export --no-hydration >/dev/null 2>&1 & p1=$!
  c start b$t --source $W/src2 --dest $W/dst$t --export --no-hydration >/dev/null 2>&1 & p2=$!
  wait $p1; r1=$?; wait $p2; r2=$?
  [ $r1 = 0 ] && [ $r2 = 0 ] && { both=$((both+1)); say "round $t: BOTH jobs own dst$t"; }
  c remove a$t >/dev/null 2>&1; c remove b$t >/dev/null 2>&1; rm -f $W/dst$t
done
say "same-path race: both won $both/20"
truncate -s 16M $W/dl; L=$(loop $W/dl); both=0
for t in $(seq 10); do
  c start la$t --source $W/src --dest $W/dl --export --no-hydration >/dev/null 2>&1 & p1=$!
  c start lb$t --source $W/src2 --dest $L --export --no-hydration >/dev/null 2>&1 & p2=$!
  wait $p1; r1=$?; wait $p2; r2=$?
  [ $r1 = 0 ] && [ $r2 = 0 ] && { both=$((both+1)); say "round $t: BOTH own the loop's bytes"; }
  c remove la$t >/dev/null 2>&1; c remove lb$t >/dev/null 2>&1
done
say "path/loop alias race: both won $both/10"
# (2)
c start j --source $W/src --dest $W/jdst --export --rate-limit 1M >/dev/null
nbdsh -u "$(uri j)" -c 'h.pwrite(b"J"*65536, 8<<20); h.flush()'
timeout 60 $BIN/clonectl --socket $SOCK start k --source "$(uri j)" --dest $W/kdst --export >/dev/null 2>$W/k.err; say "k (source = own export of j) start rc=$?: $(head -c 200 $W/k.err)"
timeout 60 $BIN/clonectl --socket $SOCK wait k --timeout 50s -q; say "k: $(state k)   j: $(state j)"
python3 - $W/kdst $W/src.orig <<'PY'
import sys
k = open(sys.argv[1],'rb').read(); s = bytearray(open(sys.argv[2],'rb').read()); s[8<<20:(8<<20)+65536] = b"J"*65536
print("HELD: k has j's view" if k == bytes(s) else "k differs from j's view")
PY
timeout 20 $BIN/clonectl --socket $SOCK status j >/dev/null && say "daemon responsive" || say "HANG: daemon not responsive"
# (3)
c start m --source $W/src2 --dest $W/src --export >/dev/null 2>$W/m.err; say "m (dest = j's source) rc=$?: $(head -c 150 $W/m.err)"
