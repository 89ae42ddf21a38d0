#!/bin/bash
# L12: a complete --discard-source job restored after a restart (CompleteCloneExport): clients
# write, trim, zero and flush; kill -9; the flushed writes must be there; the (released) source
# must never be touched again (its bytes are compared before/after), and a second job may not
# take the served destination.
set -u; . "$(dirname "$0")/lib-live.sh"
N=4; mkdata $W/src 32; cp $W/src $W/src.orig
ldaemon
c start j --source $W/src --dest $W/dst --export --discard-source >/dev/null; c wait j --timeout 60s -q
stopd; cp $W/src $W/src.after-complete; ldaemon; say "restored: $(state j), export $(jst j | python3 -c 'import json,sys; print(bool(json.load(sys.stdin)["export"]))')"
nbdsh -u "$(uri j)" -c 'h.trim(1<<20, 0); h.zero(1<<20, 1<<20, flags=nbd.CMD_FLAG_FAST_ZERO); h.flush()' && say "trim + fast zero ok"
cp $W/dst $W/dst.base
for i in $(seq 0 $((N-1))); do python3 "$(dirname "$0")/py/flushstorm.py" "$(uri j)" $i $N $W/log.$i 1 2>>$W/writers.err & PIDS+=($!); done
sleep 3; kill9; sleep 0.5
ldaemon; nbdcopy "$(uri j)" $W/img
python3 "$(dirname "$0")/py/flushcheck.py" $W/img $W/dst.base $N $(for i in $(seq 0 $((N-1))); do echo $W/log.$i; done) && say HELD || say "DATA LOSS"
cmp -s $W/src $W/src.after-complete && say "source untouched after completion" || say "SOURCE TOUCHED after completion"
c start x --source $W/src.orig --dest $W/dst >/dev/null 2>$W/x.err; say "second job on the served destination: rc=$? $(head -c 120 $W/x.err)"
